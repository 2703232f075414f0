"""Multi-process strategies with a frozen teacher: FSDP (teacher sharded or replicated) and DDP on 2 CPU
processes (gloo), and student export from the checkpoints of every strategy."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightningkd import ClassificationDistillationModule
from lightningkd.cli import main as cli_main
from lightningkd.distillers import KD, Distiller
from lightningkd.strategies import DistillationFSDPStrategy, _check_teacher_runs_whole
from tests.toys import toy_classifier

ROOT = Path(__file__).resolve().parents[1]
MULTI = ("ddp", "fsdp_shard", "fsdp_replicate")


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Run tests/scripts/strategy_fit.py once on 2 CPU processes: a checkpoint per strategy, a report per rank."""
    out = tmp_path_factory.mktemp("strategies")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "strategy_fit.py"), str(out)],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*MULTI, "fsdp_shard_resumed"])
def test_two_process_cpu_fit_keeps_the_teacher_frozen_and_out_of_the_optimizer(strategy_runs, name) -> None:
    _, reports = strategy_runs
    steps = 4 if name == "fsdp_shard_resumed" else 3
    for report in (r[name] for r in reports):
        assert report["world_size"] == 2 and report["global_step"] == steps
        # bit-identical teacher (gathered from its shards under teacher="shard"), eval mode, no gradients
        assert report["teacher_unchanged"] and report["teacher_eval"]
        assert report["teacher_grads"] == 0 and report["teacher_requires_grad"] == 0
        # the optimizer holds exactly the student's and FitNet's parameters (8 + 3 tensors)
        assert report["optimizer_teacher_params"] == 0 and report["optimizer_is_trainable"]
        assert report["optimizer_params"] == report["trainable_params"] == 11


@pytest.mark.slow
def test_checkpoints_of_every_strategy_export_the_same_bare_student(strategy_runs, tmp_path, capsys) -> None:
    from tests.scripts.strategy_fit import fit_single

    out, _ = strategy_runs
    checkpoints = {name: out / f"{name}.ckpt" for name in MULTI}
    checkpoints["single"] = tmp_path / "single.ckpt"
    fit_single(str(checkpoints["single"]))

    exported = {}
    for name, checkpoint in checkpoints.items():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        assert not [k for k in saved["state_dict"] if k.startswith("teacher.")], name
        # momentum buffers of the 11 trainable tensors only: none for the teacher
        assert len(saved["optimizer_states"][0]["state"]) == 11, name
        target = tmp_path / f"{name}_student.pt"
        cli_main(["export", str(checkpoint), str(target)])
        assert "wrote 11 student tensors" in capsys.readouterr().out  # 8 parameters + BatchNorm's 3 buffers
        exported[name] = torch.load(target, weights_only=True)
        toy_classifier(width=6).load_state_dict(exported[name], strict=True)  # loads into the bare student

    reference = exported["single"]
    initial = toy_classifier(width=6, seed=1).state_dict()
    assert sorted(reference) == sorted(initial)
    parameters = [k for k, _ in toy_classifier(width=6).named_parameters()]
    for name in MULTI:
        assert sorted(exported[name]) == sorted(reference)
        assert all(exported[name][k].shape == reference[k].shape for k in reference)
        # the same 3 SGD steps on the same halves of the data: the same weights up to the order of float sums
        for key in parameters:
            torch.testing.assert_close(exported[name][key], reference[key], rtol=1e-5, atol=1e-6)
    # ... and they did train: the weights moved from their initial values
    assert max((reference[k] - initial[k]).abs().max().item() for k in parameters) > 1e-3
    # BatchNorm running statistics: each rank's BN sees its own half, and rank 0 writes the checkpoint
    # (DDP broadcasts rank 0's buffers, FSDP keeps each rank's own), so DDP and FSDP agree; the single
    # process updates them with both halves, 2 micro-batches per step
    for name in ("fsdp_shard", "fsdp_replicate"):
        for key in ("stem.1.running_mean", "stem.1.running_var"):
            torch.testing.assert_close(exported[name][key], exported["ddp"][key], rtol=1e-5, atol=1e-6)
    assert {int(exported[name]["stem.1.num_batches_tracked"]) for name in MULTI} == {3}
    assert int(reference["stem.1.num_batches_tracked"]) == 6


def test_strategy_rejects_unknown_teacher_placement_and_sharded_state_dicts() -> None:
    with pytest.raises(ValueError, match="teacher must be 'shard' or 'replicate'"):
        DistillationFSDPStrategy(teacher="frozen")
    with pytest.raises(ValueError, match="state_dict_type 'sharded' is not supported: use 'full'"):
        DistillationFSDPStrategy(state_dict_type="sharded")
    assert DistillationFSDPStrategy().teacher == "replicate"


class _RunsTeacherLayers(Distiller):
    """A distiller that keeps the teacher to run its layers itself (as ScaleKD does)."""

    def attach_teacher(self, teacher: torch.nn.Module) -> None:
        self.teacher_head = [teacher.fc]  # a list: not registered as a submodule

    def forward(self, student, teacher, batch=None):
        return student["output"].sum() * 0


def _module(*distillers: Distiller) -> ClassificationDistillationModule:
    return ClassificationDistillationModule(
        toy_classifier(width=6), toy_classifier(width=10), list(distillers), num_classes=4
    )


def test_sharded_teacher_is_refused_where_something_runs_parts_of_it() -> None:
    _check_teacher_runs_whole(_module(KD()))  # KD reads the outputs of the whole teacher: fine
    with pytest.raises(ValueError, match="_RunsTeacherLayers: it runs the teacher's own layers.*'replicate'"):
        _check_teacher_runs_whole(_module(KD(), _RunsTeacherLayers()))
    grad = KD()
    grad.needs_teacher_grad = True
    with pytest.raises(ValueError, match="back-propagates through them"):
        _check_teacher_runs_whole(_module(grad))


FIXTURES = ROOT / "tests" / "fixtures"
DEEPSPEED = FIXTURES / "deepspeed_zero2"  # written by tests/scripts/make_deepspeed_checkpoint.py


def test_deepspeed_zero2_folder_exports_the_fp32_student_deepspeed_itself_recovers(tmp_path, capsys) -> None:
    target = tmp_path / "student.pt"
    cli_main(["export", str(DEEPSPEED), str(target)])
    assert "wrote 11 student tensors" in capsys.readouterr().out
    student = torch.load(target, weights_only=True)
    # the reference: DeepSpeed's own zero_to_fp32 converter, run when the fixture was made
    expected = torch.load(FIXTURES / "deepspeed_zero2_student.pt", weights_only=True)
    assert list(student) == list(toy_classifier(width=6).state_dict())
    assert sorted(student) == sorted(expected)
    for key, value in expected.items():
        assert student[key].dtype == value.dtype and torch.equal(student[key], value), key
    toy_classifier(width=6).load_state_dict(student, strict=True)
    # 2 training steps moved the weights (the 550 fp32 values were split over the 2 ranks' files)
    initial = toy_classifier(width=6, seed=1).state_dict()
    assert not torch.equal(student["fc.weight"], initial["fc.weight"])


def test_deepspeed_folder_with_a_missing_rank_file_is_refused(tmp_path, capsys) -> None:
    folder = tmp_path / "epoch=0-step=2.ckpt"
    shutil.copytree(DEEPSPEED, folder)
    (folder / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(SystemExit):
        cli_main(["export", str(folder), str(tmp_path / "student.pt")])
    assert "written by 2 processes but holds the optimizer files of ranks [0]" in capsys.readouterr().err
    assert not (tmp_path / "student.pt").exists()


def test_checkpoint_folders_are_named_when_a_file_is_expected(tmp_path) -> None:
    from lightningkd.checkpoint_io import load_checkpoint_file

    with pytest.raises(IsADirectoryError, match="is a DeepSpeed checkpoint folder.*lightningkd export"):
        load_checkpoint_file(DEEPSPEED)
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")  # the index file of a torch.distributed.checkpoint folder
    with pytest.raises(IsADirectoryError, match="sharded checkpoint folder.*DistillationFSDPStrategy"):
        load_checkpoint_file(sharded)


@pytest.mark.parametrize("fragment", ["fsdp.yaml", "deepspeed.yaml"])
def test_strategy_fragments_parse_with_their_documented_settings(fragment, tmp_path, capsys) -> None:
    from tests.test_cli import TINY_RECIPE

    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    recipe = ROOT / "recipes" / "trainer" / fragment
    with pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--config", str(tmp_path / "tiny.yaml"), "--config", str(recipe), "--print_config"])
    assert stop.value.code in (0, None)
    printed = capsys.readouterr().out
    if fragment == "fsdp.yaml":
        assert "class_path: lightningkd.strategies.DistillationFSDPStrategy" in printed
        assert "teacher: replicate" in printed
    else:
        assert "stage: 2" in printed and "exclude_frozen_parameters: true" in printed


@pytest.mark.slow
def test_fsdp_fragment_runs_a_recipe_on_two_cpu_processes_and_exports(tmp_path) -> None:
    from tests.test_cli import TINY_RECIPE, _lightningkd

    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true"]
    fragment = str(ROOT / "recipes" / "trainer" / "fsdp.yaml")
    run = _lightningkd(
        tmp_path, "fit", "--config", "tiny.yaml", "--config", fragment, *cpu,
        "--trainer.strategy.init_args.teacher", "shard",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    saved = torch.load(tmp_path / "ckpts" / "tiny.ckpt", weights_only=True)
    assert saved["global_step"] == 8 and not [k for k in saved["state_dict"] if k.startswith("teacher.")]
    run = _lightningkd(tmp_path, "export", "ckpts/tiny.ckpt", "student.pt")
    assert run.returncode == 0, run.stderr[-3000:]
    toy_classifier(width=6).load_state_dict(
        torch.load(tmp_path / "student.pt", weights_only=True), strict=True
    )


@pytest.mark.slow
def test_fsdp_resume_with_another_student_is_refused_before_loading(tmp_path) -> None:
    # one CPU process: FSDP loads the weights before the module's hook runs, so the strategy compares the
    # file's keys and shapes with the gathered module state itself
    from tests.scripts.strategy_fit import build, trainer
    from tests.toys import toy_loader

    environment = dict(os.environ)  # Lightning sets MASTER_PORT, LOCAL_RANK ... for its process group
    try:
        module, _, _ = build()
        run = trainer(DistillationFSDPStrategy(), devices=1, max_steps=1)
        run.fit(module, toy_loader(n=8, batch_size=4))
        run.save_checkpoint(tmp_path / "run.ckpt")
        other = ClassificationDistillationModule(
            toy_classifier(width=5), toy_classifier(width=10), [KD()], num_classes=4
        )
        with pytest.raises(
            RuntimeError, match=r"the student architecture changed.*\n.*shape differs: stem\.0\.weight"
        ):
            trainer(DistillationFSDPStrategy(), devices=1, max_steps=2).fit(
                other, toy_loader(n=8, batch_size=4), ckpt_path=tmp_path / "run.ckpt"
            )
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()  # later multi-process tests would take those for their own ranks
        os.environ.update(environment)
