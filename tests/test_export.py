"""Student export: safe reading, refusals that protect existing files, atomic writes."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from lightningkd import export as export_module
from lightningkd.checkpoint_io import CheckpointError, UnsafeCheckpointError
from lightningkd.export import export_student
from tests.test_checkpoint_io import ShellPayload
from tests.test_module import make_module, trainer
from tests.toys import toy_classifier, toy_loader


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A folder with ``last.ckpt``, the real Lightning checkpoint of a 1-step lightningkd fit."""
    folder = tmp_path_factory.mktemp("run")
    module = make_module()
    trainer(folder, max_steps=1).fit(module, toy_loader())
    shutil.copy(next((folder / "checkpoints").glob("*.ckpt")), folder / "last.ckpt")
    return folder, {k: v.clone() for k, v in module.student.state_dict().items()}


@pytest.fixture
def last_ckpt(run_folder, tmp_path) -> Path:
    """A private copy of ``last.ckpt`` (tests may try to overwrite it)."""
    return Path(shutil.copy(run_folder[0] / "last.ckpt", tmp_path / "last.ckpt"))


def test_export_writes_the_student_alone(run_folder, last_ckpt, tmp_path) -> None:
    count = export_student(last_ckpt, tmp_path / "out" / "student.pt")
    state = torch.load(tmp_path / "out" / "student.pt", weights_only=True)
    student = run_folder[1]
    assert count == len(student) == len(state)  # toy student: 11 tensors
    toy_classifier(width=6).load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], v) for k, v in student.items())


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_over_its_own_input_is_refused(last_ckpt, overwrite) -> None:
    before = last_ckpt.read_bytes()
    with pytest.raises(FileExistsError, match=r"over itself.*same file"):
        export_student(last_ckpt, last_ckpt, overwrite=overwrite)
    assert last_ckpt.read_bytes() == before


def test_other_spellings_and_symlinks_of_the_input_are_refused(last_ckpt, tmp_path, monkeypatch) -> None:
    before = last_ckpt.read_bytes()
    (tmp_path / "sub").mkdir()
    spellings = [tmp_path / "sub" / ".." / "last.ckpt", str(last_ckpt).replace("/", "//")]
    monkeypatch.chdir(tmp_path)
    spellings.append(Path("last.ckpt"))
    os.symlink(last_ckpt, tmp_path / "link.ckpt")
    spellings.append(tmp_path / "link.ckpt")
    for output in spellings:
        with pytest.raises(FileExistsError, match="same file"):
            export_student(last_ckpt, output, overwrite=True)
    assert last_ckpt.read_bytes() == before
    assert os.path.islink(tmp_path / "link.ckpt")


def test_another_lightning_checkpoint_is_never_overwritten(last_ckpt, tmp_path) -> None:
    other = Path(shutil.copy(last_ckpt, tmp_path / "epoch=3.ckpt"))
    before = other.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(
            FileExistsError, match=r"epoch=3\.ckpt.*Lightning checkpoint.*even with --overwrite"
        ):
            export_student(last_ckpt, other, overwrite=overwrite)
    assert other.read_bytes() == before
    # a dict with Lightning's keys counts too, without the version entry
    torch.save({"state_dict": {}, "loops": {}}, tmp_path / "handmade.ckpt")
    with pytest.raises(FileExistsError, match="Lightning checkpoint"):
        export_student(last_ckpt, tmp_path / "handmade.ckpt", overwrite=True)


def test_an_existing_file_needs_overwrite(run_folder, last_ckpt, tmp_path) -> None:
    target = tmp_path / "student.pt"
    target.write_text("an older export")
    with pytest.raises(FileExistsError, match=r"student\.pt.*already exists.*--overwrite"):
        export_student(last_ckpt, target)
    assert target.read_text() == "an older export"
    assert export_student(last_ckpt, target, overwrite=True) == len(run_folder[1])
    assert torch.equal(torch.load(target, weights_only=True)["fc.weight"], run_folder[1]["fc.weight"])


def test_a_folder_output_is_refused_with_a_file_suggestion(last_ckpt, tmp_path) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder.*" + re.escape(str(folder / "student.pt"))):
        export_student(last_ckpt, folder, overwrite=True)
    assert list(folder.iterdir()) == []


def test_a_failed_export_leaves_no_partial_file(last_ckpt, tmp_path, monkeypatch) -> None:
    def failing_save(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(export_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        export_student(last_ckpt, tmp_path / "new" / "student.pt")
    assert list((tmp_path / "new").iterdir()) == []
    (tmp_path / "old.pt").write_text("previous export")
    with pytest.raises(OSError, match="No space left"):
        export_student(last_ckpt, tmp_path / "old.pt", overwrite=True)
    assert (tmp_path / "old.pt").read_text() == "previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "new", "old.pt"]


def test_truncated_or_foreign_inputs_get_the_loader_message(last_ckpt, tmp_path) -> None:
    data = last_ckpt.read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.ckpt.*incomplete"):
        export_student(tmp_path / "half.ckpt", tmp_path / "student.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.txt.*text file"):
        export_student(tmp_path / "notes.txt", tmp_path / "student.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_student(tmp_path / "nope.ckpt", tmp_path / "student.pt")
    assert not (tmp_path / "student.pt").exists()


def test_malicious_input_is_refused_and_nothing_runs(tmp_path) -> None:
    marker = tmp_path / "marker"
    torch.save(
        {"state_dict": {"student.w": torch.ones(1)}, "x": ShellPayload(marker)}, tmp_path / "evil.ckpt"
    )
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt.*posix\.system"):
        export_student(tmp_path / "evil.ckpt", tmp_path / "student.pt")
    assert not marker.exists() and not (tmp_path / "student.pt").exists()


def test_a_checkpoint_without_the_prefix_names_the_prefixes_it_has(tmp_path) -> None:
    torch.save({"state_dict": {"module.fc.weight": torch.ones(1)}}, tmp_path / "ddp.pt")
    with pytest.raises(ValueError, match=r"prefix 'student\.'.*\['module\.'\]"):
        export_student(tmp_path / "ddp.pt", tmp_path / "student.pt")
    assert export_student(tmp_path / "ddp.pt", tmp_path / "student.pt", prefix="module.") == 1
