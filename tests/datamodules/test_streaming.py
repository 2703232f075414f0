"""LitData streams of ImageFolder trees: converter, ImageStreamDataset, ImageNetDataModule(stream_dir=...)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("litdata")
from litdata import StreamingDataset  # noqa: E402

from datamodules import CorruptFileError, ImageNetDataModule, read_image  # noqa: E402
from datamodules.classification.streaming import (  # noqa: E402
    ImageStreamDataset,
    convert_image_folder,
    convert_splits,
    main,
    read_stream_classes,
)

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["ant", "bee", "cow"]
N_TRAIN, N_VAL = 7, 3  # per class: 21 train and 9 val images, odd on purpose (uneven rank split)
SMALL = {"image_size": 8, "resize": 10, "batch_size": 4, "num_workers": 0}

pytestmark = [
    pytest.mark.filterwarnings("ignore:ImageNet-1k has 1000 classes"),
    # Lightning's generic note on iterable datasets; LitData sizes every worker's part itself
    pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined"),
]


def make_tree(root: Path) -> Path:
    """train/ and val/ with 3 class folders of small random JPEGs of varied sizes (one PNG)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(10, 20)), int(rng.integers(10, 20))
                ext = ".png" if (split, c, i) == ("train", "bee", 2) else ".jpg"
                cv2.imwrite(
                    str(root / split / c / f"{i:02d}{ext}"), rng.integers(0, 256, (h, w, 3), np.uint8)
                )
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def streams(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("streams") / "imagenet-stream"
    convert_splits(tree, out, chunk_bytes="4KB")  # tiny chunks: several per split, as on real data
    return out


def files_of(split_dir: Path) -> list[tuple[str, int]]:
    """Reference listing: (relative path, label), sorted per class as ImageFolder does."""
    return [
        (f"{c}/{p.name}", label) for label, c in enumerate(CLASSES) for p in sorted((split_dir / c).iterdir())
    ]


# ------------------------------------------------------------------------------------------------ converter


def test_convert_stores_file_bytes_labels_and_class_list(tree: Path, streams: Path) -> None:
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        info = json.loads((streams / split / "classes.json").read_text())
        assert info["classes"] == CLASSES and info["num_samples"] == 3 * n and info["skipped"] == []
        assert read_stream_classes(streams / split) == CLASSES
        assert len(list((streams / split).glob("chunk-*.bin"))) > 1
        raw = StreamingDataset(str(streams / split))
        assert len(raw) == 3 * n
        reference = files_of(tree / split)
        seen = set()
        for i in range(len(raw)):
            item = raw[i]
            rel, label = reference[item["index"]]
            assert os.fsdecode(bytes(item["path"])) == rel and item["label"] == label
            assert bytes(item["image"]) == (tree / split / rel).read_bytes()  # the encoded file, untouched
            seen.add(item["index"])
        assert seen == set(range(3 * n))


def test_stream_decodes_to_the_folder_pixels(tree: Path, streams: Path) -> None:
    raw = StreamingDataset(str(streams / "train"))
    decoded = ImageStreamDataset(streams / "train")  # no transform: RGB uint8
    reference = files_of(tree / "train")
    for i in range(len(decoded)):
        image, label = decoded[i]
        rel, ref_label = reference[raw[i]["index"]]
        assert label == ref_label
        np.testing.assert_array_equal(image, read_image(tree / "train" / rel))


def test_convert_refuses_an_existing_output_folder(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        convert_image_folder(tree / "train", out)
    with pytest.raises(FileExistsError, match="nothing is overwritten"):
        convert_splits(tree, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_convert_shows_the_expected_layout_on_a_wrong_folder(tmp_path: Path) -> None:
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    cv2.imwrite(str(flat / "a.jpg"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"no class sub-folders(.|\n)*DATA_DIR/(.|\n)*n01440764"):
        convert_image_folder(flat, tmp_path / "out1")
    with pytest.raises(FileNotFoundError, match=r"No 'val/' folder(.|\n)*DATA_DIR/"):
        convert_splits(tmp_path / "flat", tmp_path / "out2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_image_folder(tmp_path / "missing", tmp_path / "out3")
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out3").exists()


def test_convert_names_an_unreadable_file_or_skips_it(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    bad = root / "train" / "cow" / "03.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(CorruptFileError, match="03.jpg") as err:
        convert_image_folder(root / "train", tmp_path / "out", num_workers=2)
    assert err.value.path == str(bad)
    assert not (tmp_path / "out").exists()  # no half-written stream left under the name
    info = convert_image_folder(root / "train", tmp_path / "out", num_workers=2, skip_corrupt=True)
    assert info["skipped"] == [str(bad)] and info["num_samples"] == 3 * N_TRAIN - 1
    raw = StreamingDataset(str(tmp_path / "out"))
    indices = sorted(raw[i]["index"] for i in range(len(raw)))
    bad_index = files_of(root / "train").index(("cow/03.jpg", 2))
    assert indices == [i for i in range(3 * N_TRAIN) if i != bad_index]


def test_command_line(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tree), str(tmp_path / "s"), "--splits", "val", "--workers", "1"]) == 0
    assert "val: 9 images, 3 classes" in capsys.readouterr().out
    assert read_stream_classes(tmp_path / "s" / "val") == CLASSES
    assert main(["convert", str(tree), str(tmp_path / "s")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tree / "train"), str(tmp_path / "t")]) == 2  # not a tree with splits
    assert "DATA_DIR/" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ datamodule


def test_datamodule_stream_matches_the_folder_path(tree: Path, streams: Path) -> None:
    folder = ImageNetDataModule(tree, **SMALL)
    stream = ImageNetDataModule(stream_dir=str(streams), **SMALL)
    stream_with_tree = ImageNetDataModule(tree, stream_dir=str(streams), **SMALL)  # classes checked
    assert stream.classes == folder.classes == stream_with_tree.classes == CLASSES
    assert stream.num_classes == 3
    assert ImageNetDataModule(**stream.hparams).hparams == stream.hparams  # LightningCLI / checkpoint rebuild
    folder.setup("fit")
    stream.setup("fit")
    # the same albumentations pipelines
    assert repr(stream.train_set.transform.compose) == repr(folder.train_set.transform)
    assert repr(stream.val_set.transform.compose) == repr(folder.val_set.transform)
    # evaluation transform: the same tensors for the same files
    raw = StreamingDataset(str(streams / "val"))
    for i in range(len(raw)):
        image, label = stream.val_set[i]
        ref_image, ref_label = folder.val_set[raw[i]["index"]]
        assert label == ref_label
        torch.testing.assert_close(image, ref_image, rtol=0, atol=0)
    # loaders: every val image once, in full-size batches of the right shape and dtype
    val_batches = list(stream.val_dataloader())
    assert [len(b[1]) for b in val_batches] == [4, 4, 1]
    assert sorted(torch.cat([b[1] for b in val_batches]).tolist()) == sorted(
        l for _, l in files_of(tree / "val")
    )
    train_batches = list(stream.train_dataloader())
    assert len(train_batches) == len(stream.train_dataloader()) == 3 * N_TRAIN // 4  # full batches only
    for images, labels in train_batches:
        assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (4,) and labels.dtype == torch.int64
    assert stream.test_dataloader().dataset is stream.val_set


def test_distillation_fit_on_the_stream(streams: Path, tmp_path: Path) -> None:
    import functools

    import lightning as L

    from lightningkd import ClassificationDistillationModule
    from lightningkd.distillers import KD
    from tests.toys import toy_classifier

    module = ClassificationDistillationModule(
        toy_classifier(num_classes=3, width=4, seed=1),
        toy_classifier(num_classes=3, width=6, seed=2),
        [KD(temperature=2.0)],
        num_classes=3,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=ImageNetDataModule(stream_dir=str(streams), **SMALL))
    assert trainer.global_step == 2 * (3 * N_TRAIN // 4)  # every full batch of both epochs
    assert 0.0 <= float(trainer.callback_metrics["val/acc1"]) <= 1.0


def test_datamodule_reads_through_the_remote_path(streams: Path, tmp_path: Path) -> None:
    # LitData's "local:" mode goes through the same downloader and chunk cache as s3:// (no network here)
    dm = ImageNetDataModule(stream_dir=f"local:{streams}", stream_cache_dir=str(tmp_path / "cache"), **SMALL)
    assert dm.classes == CLASSES
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 8, 8) and labels.shape == (4,)
    assert any((tmp_path / "cache").rglob("*.bin"))  # chunks were fetched into the cache


def test_datamodule_stream_errors(tree: Path, streams: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Give data_dir .* or stream_dir"):
        ImageNetDataModule()
    with pytest.raises(FileNotFoundError, match="does not exist(.|\n)*streaming convert"):
        ImageNetDataModule(stream_dir=str(tmp_path / "missing"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no index.json"):
        ImageNetDataModule(stream_dir=str(tmp_path / "empty"))
    (tmp_path / "empty" / "train" / "index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no classes.json"):
        ImageNetDataModule(stream_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="skip_corrupt does not apply"):
        ImageNetDataModule(stream_dir=str(streams), skip_corrupt=True)
    other = make_tree(tmp_path / "other")
    (other / "train" / "cow").rename(other / "train" / "cat")
    with pytest.raises(ValueError, match="differ from the class list of the streams"):
        ImageNetDataModule(other, stream_dir=str(streams))
    with pytest.raises(ValueError, match="fewer samples per rank than batch_size=64"):
        ImageNetDataModule(
            stream_dir=str(streams), image_size=8, batch_size=64, num_workers=0
        ).train_dataloader()


# ------------------------------------------------------------------------------------------------ 2 processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ranks_see_their_own_samples_once_per_epoch(streams: Path, tmp_path: Path) -> None:
    configs = [(0, 3), (2, 2)]  # (workers per rank, batch size)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "stream_ddp.py"), str(streams), str(tmp_path)]
        + [str(free_port())]
        + [f"{w}:{b}" for w, b in configs],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_train, n_val, world = 3 * N_TRAIN, 3 * N_VAL, 2
    for workers, batch in configs:
        reports = [json.loads((tmp_path / f"w{workers}_b{batch}_rank{r}.json").read_text()) for r in (0, 1)]
        for epoch in range(2):
            # validation: every image exactly once across the ranks (no padding, nothing dropped)
            val = [r["val"][epoch] for r in reports]
            assert all(len(v) == len(set(v)) for v in val)
            assert not set(val[0]) & set(val[1])
            assert sorted(val[0] + val[1]) == list(range(n_val))
            # training: disjoint, no repeats, the same number of full batches on both ranks; what is left
            # out of the epoch is less than one global batch
            train = [r["train"][epoch] for r in reports]
            assert all(len(t) == len(set(t)) for t in train)
            assert not set(train[0]) & set(train[1])
            assert len(train[0]) == len(train[1]) and len(train[0]) % batch == 0
            assert 0 <= n_train - world * len(train[0]) < world * batch
            assert set(train[0] + train[1]) <= set(range(n_train))
            for r in reports:
                assert r["train_batch_sizes"][epoch] == [batch] * (len(train[0]) // batch)
                assert r["train_len"] == len(train[0]) // batch  # what Lightning's progress / limits use
        for r in reports:  # training is reshuffled every epoch
            assert r["train"][0] != r["train"][1]
