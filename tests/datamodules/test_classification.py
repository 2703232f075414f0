"""Classification datamodules: synthetic set, CIFAR pickles / ImageFolder, ImageNet folders, transforms."""

from __future__ import annotations

import inspect
import os
import pickle
import pickletools
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

import datamodules
from datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    SyntheticClassificationDataModule,
    cifar_eval_transform,
    cifar_train_transform,
    imagenet_eval_transform,
    imagenet_train_transform,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def unnormalise(image: torch.Tensor, mean, std) -> np.ndarray:
    """CHW normalised tensor -> HWC uint8 pixels."""
    pixels = (image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]) * 255
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_all_exports_exist() -> None:
    assert sorted(datamodules.__all__) == sorted(set(datamodules.__all__))
    for name in datamodules.__all__:
        assert hasattr(datamodules, name), name


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_dtypes_and_labels() -> None:
    dm = SyntheticClassificationDataModule(
        num_classes=5, image_size=16, train_size=100, val_size=30, batch_size=8
    )
    assert dm.num_classes == 5 and len(dm.classes) == 5 and len(dm.mean) == len(dm.std) == 3
    dm.setup("fit")
    assert len(dm.train_set) == 100 and len(dm.val_set) == 30
    loader = dm.train_dataloader()
    assert len(loader) == 100 // 8  # drop_last
    images, labels = next(iter(loader))
    assert isinstance(next(iter(loader)), tuple)
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (8,) and labels.dtype == torch.int64
    all_labels = dm.train_set.labels
    assert all_labels.min() >= 0 and all_labels.max() < 5 and len(all_labels.unique()) == 5
    val_images, _ = next(iter(dm.val_dataloader()))
    assert val_images.shape == (8, 3, 16, 16)
    assert len(dm.test_dataloader().dataset) == 30 and len(dm.predict_dataloader().dataset) == 30
    # Normalised with the module's mean/std: roughly zero mean, unit variance.
    assert abs(dm.train_set.images.mean().item()) < 0.1
    assert 0.8 < dm.train_set.images.std().item() < 1.2


def test_synthetic_is_deterministic_per_seed() -> None:
    def data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        dm = SyntheticClassificationDataModule(train_size=64, val_size=32, seed=seed)
        dm.setup("fit")
        return dm.train_set.images, dm.val_set.images

    a_train, a_val = data(0)
    b_train, b_val = data(0)
    c_train, _ = data(1)
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val)
    assert not torch.equal(a_train, c_train)
    assert not torch.equal(a_train[:32], a_val)  # validation images are new draws


def test_synthetic_defaults_generate_fast() -> None:
    dm = SyntheticClassificationDataModule()
    start = time.process_time()  # CPU time: robust to other jobs on a shared machine
    dm.setup("fit")
    assert time.process_time() - start < 2.0  # ~0.1 s on one idle core
    assert len(dm.train_set) == 2048 and len(dm.val_set) == 512


@pytest.fixture
def one_thread():
    """Intra-op threads fight each other on a busy 2-core CI machine (10x slower); use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_synthetic_is_learnable_by_a_small_cnn(one_thread) -> None:
    torch.manual_seed(0)
    dm = SyntheticClassificationDataModule(batch_size=64)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(2):
        for images, labels in dm.train_dataloader():
            loss = nn.functional.cross_entropy(net(images), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        correct = sum((net(x).argmax(1) == y).sum().item() for x, y in dm.val_dataloader())
    assert correct / len(dm.val_set) > 0.22  # chance is 0.1; measured 0.34


def test_synthetic_runs_in_trainer() -> None:
    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))

        def training_step(self, batch, batch_idx):
            images, labels = batch
            return nn.functional.cross_entropy(self.net(images), labels)

        def validation_step(self, batch, batch_idx):
            images, labels = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(images), labels))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = SyntheticClassificationDataModule(
        num_classes=3, image_size=8, train_size=32, val_size=16, batch_size=8
    )
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(Tiny(), datamodule=dm)
    assert trainer.global_step == 4 and "val_loss" in trainer.callback_metrics


def test_synthetic_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticClassificationDataModule(num_classes=1)
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticClassificationDataModule(batch_size=0)
    dm = SyntheticClassificationDataModule(train_size=10, batch_size=16)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        dm.train_dataloader()


# ------------------------------------------------------------------------------------- CIFAR python pickles


def _write_pickle(path: Path, obj: dict, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10_pickles(
    root: Path, per_batch: int = 3, n_test: int = 4, seed: int = 0, protocol: int = pickle.DEFAULT_PROTOCOL
) -> dict:
    """The official cifar-10-batches-py layout with tiny batches (bytes keys, as the real files load)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [n.encode() for n in CIFAR10_CLASSES]
    _write_pickle(
        folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch}, protocol
    )
    train_data, train_labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        _write_pickle(
            folder / f"data_batch_{i}",
            {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)]},
            protocol,
        )  # fmt: skip
        train_data.append(data)
        train_labels += labels
    test_data = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test).tolist()
    _write_pickle(folder / "test_batch", {b"labels": test_labels, b"data": test_data}, protocol)
    return {
        "train": (np.concatenate(train_data), np.array(train_labels)),
        "test": (test_data, np.array(test_labels)),
    }


def make_cifar100_pickles(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"fine_{i:03d}".encode() for i in range(100)]
    coarse = [f"coarse_{i:02d}".encode() for i in range(20)]
    _write_pickle(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        _write_pickle(
            folder / split,
            {b"data": data, b"fine_labels": labels, b"coarse_labels": [x // 5 for x in labels]},
        )
        out[split] = (data, np.array(labels))
    return out


def _pixel(data: np.ndarray, index: int, channel: int, y: int, x: int) -> int:
    """Official encoding: 1024 red, then 1024 green, then 1024 blue values, each 32x32 row-major."""
    return int(data[index, channel * 1024 + y * 32 + x])


@pytest.mark.parametrize("point_at_folder", [False, True])
def test_cifar10_pickles(tmp_path: Path, point_at_folder: bool) -> None:
    raw = make_cifar10_pickles(tmp_path)
    data_dir = tmp_path / "cifar-10-batches-py" if point_at_folder else tmp_path
    dm = CIFAR10DataModule(data_dir, batch_size=4, num_workers=0)
    assert dm.layout == "pickle" and dm.num_classes == 10 and dm.classes == CIFAR10_CLASSES
    dm.setup("fit")
    assert len(dm.train_set) == 15 and len(dm.val_set) == 4  # validation = official test batch
    np.testing.assert_array_equal(dm.train_set.labels, raw["train"][1])
    np.testing.assert_array_equal(dm.val_set.labels, raw["test"][1])
    data, labels = raw["test"]
    image, label = dm.val_set[2]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == labels[2]
    pixels = unnormalise(image, dm.mean, dm.std)
    assert pixels[5, 7, 0] == _pixel(data, 2, 0, 5, 7)  # red at row 5, column 7
    assert pixels[31, 0, 2] == _pixel(data, 2, 2, 31, 0)  # blue at row 31, column 0
    images, batch_labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and batch_labels.tolist() == labels.tolist()
    images, batch_labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and batch_labels.dtype == torch.int64


def test_cifar100_pickles_fine_labels(tmp_path: Path) -> None:
    raw = make_cifar100_pickles(tmp_path)
    dm = CIFAR100DataModule(tmp_path, batch_size=4, num_workers=0, augment=False)
    assert dm.layout == "pickle" and dm.num_classes == 100 and dm.classes[7] == "fine_007"
    dm.setup("fit")
    assert len(dm.train_set) == 12 and len(dm.val_set) == 5
    np.testing.assert_array_equal(dm.train_set.labels, raw["train"][1])
    data, labels = raw["train"]
    image, label = dm.train_set[4]  # augment=False: train split uses the eval transform
    assert label == labels[4]
    pixels = unnormalise(image, dm.mean, dm.std)
    assert pixels[10, 20, 1] == _pixel(data, 4, 1, 10, 20)
    np.testing.assert_array_equal(pixels, data[4].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_val_split_holds_out_train(tmp_path: Path) -> None:
    raw = make_cifar10_pickles(tmp_path, per_batch=4)  # 20 train images
    dm = CIFAR10DataModule(tmp_path, batch_size=4, num_workers=0, val_split=0.25, seed=3)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 15 and len(dm.val_set) == 5 and len(dm.test_set) == 4
    train_rows = {dm.train_set.images[i].tobytes() for i in range(15)}
    val_rows = {dm.val_set.images[i].tobytes() for i in range(5)}
    official = {raw["train"][0][i].reshape(3, 32, 32).transpose(1, 2, 0).tobytes() for i in range(20)}
    assert train_rows.isdisjoint(val_rows) and train_rows | val_rows == official
    again = CIFAR10DataModule(tmp_path, num_workers=0, val_split=0.25, seed=3)
    again.setup("fit")
    np.testing.assert_array_equal(again.val_set.images, dm.val_set.images)
    with pytest.raises(ValueError, match="val_split"):
        CIFAR10DataModule(tmp_path, val_split=1.0)


def test_cifar_incomplete_or_corrupt_pickles(tmp_path: Path) -> None:
    make_cifar10_pickles(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10DataModule(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    dm = CIFAR10DataModule(tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="data_batch_3"):
        dm.setup("fit")


# ----------------------------------------------------------------------------------------- ImageFolder


def make_image_folder(root: Path, splits: dict[str, int], classes: list[str], size=(32, 32), seed: int = 0):
    """``root/<split>/<class>/NNNN.png`` with random pixels; returns {split: [(path, class_index)]}."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[tuple[Path, int]]] = {}
    for split, per_class in splits.items():
        written[split] = []
        for index, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                path = root / split / name / f"{j:04d}.png"
                cv2.imwrite(str(path), rng.integers(0, 256, (*size, 3), dtype=np.uint8))
                written[split].append((path, index))
    return written


def test_cifar_image_folder_in_single_subfolder(tmp_path: Path) -> None:
    classes = sorted(CIFAR10_CLASSES, reverse=True)  # written in another order: labels follow sorting
    written = make_image_folder(tmp_path / "cifar10", {"train": 2, "test": 1}, classes)
    dm = CIFAR10DataModule(tmp_path, batch_size=4, num_workers=0, augment=False)
    assert dm.layout == "imagefolder" and dm.root == tmp_path / "cifar10" and dm.classes == CIFAR10_CLASSES
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 10
    assert sorted(np.bincount(dm.train_set.labels).tolist()) == [2] * 10
    path, class_index = next((p, i) for p, i in written["test"] if p.parent.name == "horse")
    index = [Path(dm.val_set.path(i)) for i in range(len(dm.val_set))].index(path)
    image, label = dm.val_set[index]
    assert label == CIFAR10_CLASSES.index("horse")
    bgr = cv2.imread(str(path))
    np.testing.assert_array_equal(unnormalise(image, dm.mean, dm.std), bgr[..., ::-1])
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


def test_cifar100_rejects_cifar10_folder(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 1, "test": 1}, CIFAR10_CLASSES)
    with pytest.raises(ValueError, match="100 classes"):
        CIFAR100DataModule(tmp_path)


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_cifar_wrong_folder_shows_both_layouts(tmp_path: Path, make) -> None:
    (tmp_path / "something_else").mkdir()
    data_dir = make(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10DataModule(data_dir)
    message = str(info.value)
    assert str(data_dir) in message
    for expected in ("cifar-10-batches-py/", "data_batch_5", "test_batch", "batches.meta", "train/<class>"):
        assert expected in message
    with pytest.raises(FileNotFoundError, match="cifar-100-python/"):
        CIFAR100DataModule(data_dir)


def test_image_folder_datamodule(tmp_path: Path) -> None:
    wnids = ["n02", "n01", "n03"]
    make_image_folder(tmp_path, {"train": 3, "val": 2}, wnids, size=(40, 50))
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    dm = ImageFolderDataModule(tmp_path, image_size=32, resize=36, batch_size=4, num_workers=0)
    assert dm.classes == ["n01", "n02", "n03"] and dm.num_classes == 3
    assert dm.mean == datamodules.IMAGENET_MEAN
    dm.setup("fit")
    assert len(dm.train_set) == 9 and len(dm.val_set) == 6
    assert dm.val_set.labels.tolist() == [0, 0, 1, 1, 2, 2]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    images, labels = next(iter(dm.predict_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]


def test_image_folder_missing_or_flat_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        ImageFolderDataModule(tmp_path / "nowhere")
    assert "n01440764" in str(info.value) and "train/" in str(info.value)
    make_image_folder(tmp_path, {"train": 1}, ["a", "b"])
    with pytest.raises(FileNotFoundError, match="No 'val/' folder"):
        ImageFolderDataModule(tmp_path)
    (tmp_path / "val").mkdir()
    cv2.imwrite(str(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="one folder per class"):
        ImageFolderDataModule(tmp_path)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 2, "val": 1}, ["a", "b"])
    bad = tmp_path / "val" / "b" / "0000.png"
    bad.write_bytes(b"\x89PNG this is not really an image")
    dm = ImageFolderDataModule(tmp_path, image_size=32, resize=32, batch_size=2, num_workers=0)
    with pytest.raises(OSError, match=re.escape(str(bad))):
        next(iter(dm.val_dataloader()))


def test_imagenet_warns_without_1000_classes(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 1, "val": 1}, ["n01", "n02"])
    with pytest.warns(UserWarning, match="1000 classes"):
        dm = ImageNetDataModule(tmp_path, num_workers=0)
    assert dm.num_classes == 2 and dm.batch_size == 256 and dm.resize == 256
    assert set(dm.hparams) == set(inspect.signature(ImageNetDataModule).parameters)  # rebuildable


def test_hparams_rebuild_the_datamodule(tmp_path: Path) -> None:
    make_cifar100_pickles(tmp_path)
    for dm in (
        SyntheticClassificationDataModule(noise=0.1, seed=4),
        CIFAR100DataModule(tmp_path, val_split=0.5, pad_mode="reflect"),
    ):
        assert type(dm)(**dm.hparams).hparams == dm.hparams


# ------------------------------------------------------------------------------------------ transforms


def test_cifar_transforms() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    train, evaluate = cifar_train_transform(), cifar_eval_transform()
    train.set_random_seed(0)
    outputs = [train(image=image)["image"] for _ in range(10)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outputs)
    reference = evaluate(image=image)["image"]
    assert torch.equal(reference, evaluate(image=image)["image"])  # eval is deterministic
    assert sum(not torch.equal(o, reference) for o in outputs) >= 5  # crops and flips change pixels
    np.testing.assert_array_equal(
        unnormalise(reference, datamodules.CIFAR10_MEAN, datamodules.CIFAR10_STD), image
    )
    reflect = cifar_train_transform(pad_mode="reflect")
    assert reflect(image=image)["image"].shape == (3, 32, 32)


def test_imagenet_transforms() -> None:
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    train, evaluate = imagenet_train_transform(size=64), imagenet_eval_transform(size=224, resize=256)
    assert train(image=image)["image"].shape == (3, 64, 64)
    out = evaluate(image=image)["image"]
    assert out.shape == (3, 224, 224) and torch.equal(out, evaluate(image=image)["image"])


def test_workers_get_different_augmentation_streams() -> None:
    """Forked workers must not replay the same albumentations random stream."""
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    dataset = datamodules.ArrayDataset(np.repeat(image, 8, 0), np.zeros(8), cifar_train_transform())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=1, num_workers=2, worker_init_fn=datamodules.datasets.seed_worker
    )
    torch.manual_seed(0)
    batches = [x for x, _ in loader]  # worker 0 yields samples 0, 2, 4, 6; worker 1 yields 1, 3, 5, 7
    same = [torch.equal(batches[i], batches[i + 1]) for i in range(0, 8, 2)]
    assert not all(same)


# ------------------------------------------------------------------------------------ real CIFAR-10 set


@pytest.fixture(scope="session")
def real_cifar10(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shared CIFAR-10 JPEG ImageFolder tar, extracted once per session and deleted afterwards.

    60,000 small files: in RAM (/dev/shm) they extract and delete in about 2 s, while on a busy shared
    disk deleting them can take minutes, a cost pytest's temp-dir retention would pass on to later runs.
    """
    archive = SHARED_DATA / "cifar10.tar.gz"
    if not archive.is_file():
        pytest.skip(
            f"real CIFAR-10 not available: {archive.resolve()} does not exist (see shared/data/README.md)"
        )
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2**30:
        dest = Path(tempfile.mkdtemp(prefix="lightningkd-cifar10-", dir=shm))
    else:
        dest = tmp_path_factory.mktemp("real_cifar10")
    try:
        if shutil.which("tar"):  # GNU tar: ~3x faster than tarfile on 60,000 small members
            subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest), "--no-same-owner"], check=True)
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


@pytest.mark.slow
def test_real_cifar10_image_folder(real_cifar10: Path) -> None:
    dm = CIFAR10DataModule(real_cifar10, batch_size=64, num_workers=2)
    assert dm.layout == "imagefolder" and dm.root.name == "cifar10"
    assert dm.classes == CIFAR10_CLASSES and dm.num_classes == 10
    dm.setup("fit")
    assert len(dm.train_set) == 50_000 and len(dm.val_set) == 10_000
    assert np.bincount(dm.train_set.labels).tolist() == [5000] * 10
    assert np.bincount(dm.val_set.labels).tolist() == [1000] * 10
    path = Path(dm.train_set.path(0))
    assert path.parent.name == "airplane" and dm.train_set.labels[0] == 0
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (64,) and labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() < 10
    assert abs(images.mean().item()) < 0.5  # normalised with the CIFAR-10 statistics


@pytest.mark.slow
def test_real_cifar10_distillation_steps(real_cifar10: Path, tmp_path: Path) -> None:
    """A few real KD + DKD training steps and a validation pass on CIFAR-10 through the Trainer."""
    import functools

    import lightning as L

    from lightningkd.distillers import DKD, KD
    from lightningkd.models import classifier
    from lightningkd.modules import ClassificationDistillationModule

    L.seed_everything(0)
    module = ClassificationDistillationModule(
        classifier("shufflenet_v2_x0_5", num_classes=10),
        classifier("resnet18", num_classes=10),
        [KD(temperature=4.0), DKD()],
        num_classes=10,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    )
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=8,
        limit_val_batches=2,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Record()],
    )
    trainer.fit(module, datamodule=CIFAR10DataModule(real_cifar10, batch_size=32, num_workers=2))
    assert trainer.global_step == 8 and len(losses) == 8
    assert all(np.isfinite(losses))
    assert {"train/kd/kd", "train/kd/dkd", "val/acc1", "val/teacher_acc1"} <= set(trainer.callback_metrics)


# ------------------------------------------------------------------ CIFAR pickles: labels and safe loading


def _py2_pickle(obj: Any) -> bytes:
    """``obj`` pickled the way Python 2's cPickle wrote the official CIFAR batches (protocol 2).

    Byte strings are ``SHORT_BINSTRING`` / ``BINSTRING`` (Python 2 ``str``, no ``_codecs.encode``) and numpy
    arrays use numpy 1.x's reduction: ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray`` and
    ``numpy.dtype`` with their version-1 / version-3 states. Handles what the CIFAR files hold: dicts,
    lists, tuples, byte strings, ints, bools, ``None`` and ``uint8`` arrays.
    """
    out = bytearray(b"\x80\x02")

    def put(value: Any) -> None:
        nonlocal out
        if isinstance(value, bytes):
            head = b"U" + bytes([len(value)]) if len(value) < 256 else b"T" + struct.pack("<i", len(value))
            out += head + value
        elif isinstance(value, bool):
            out += b"\x88" if value else b"\x89"
        elif isinstance(value, int):
            out += b"J" + struct.pack("<i", value)
        elif value is None:
            out += b"N"
        elif isinstance(value, list):
            out += b"]("
            for item in value:
                put(item)
            out += b"e"
        elif isinstance(value, tuple):
            out += b"("
            for item in value:
                put(item)
            out += b"t"
        elif isinstance(value, dict):
            out += b"}("
            for key, item in value.items():
                put(key)
                put(item)
            out += b"u"
        elif isinstance(value, np.ndarray):
            assert value.dtype == np.uint8
            out += b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n"
            put((0,))
            put(b"b")
            out += b"tR"
            out += b"(J\x01\x00\x00\x00"  # array state: (1, shape, dtype, is_fortran, raw bytes)
            put(tuple(value.shape))
            out += b"cnumpy\ndtype\n"
            put((b"u1", 0, 1))
            out += b"R"
            put((3, b"|", None, None, None, -1, -1, 0))
            out += b"b"
            put(False)
            put(value.tobytes())
            out += b"tb"
        else:
            raise TypeError(type(value))

    put(obj)
    return bytes(out + b".")


def _globals_of(data: bytes) -> set[str]:
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def write_official_cifar10(root: Path, batches: list[tuple[np.ndarray, list[int]]], test, names) -> Path:
    """``cifar-10-batches-py/`` in the byte format of the official release (see :func:`_py2_pickle`)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(_py2_pickle({b"label_names": names, b"num_vis": 3072}))
    for i, (data, labels) in enumerate([*batches, test]):
        name = f"data_batch_{i + 1}" if i < len(batches) else "test_batch"
        content = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (folder / name).write_bytes(_py2_pickle(content))
    return folder


def test_cifar_official_python2_pickles_load(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 256, (2, 3072), dtype=np.uint8), [i, 9 - i]) for i in range(5)]
    test = (rng.integers(0, 256, (3, 3072), dtype=np.uint8), [4, 5, 6])
    folder = write_official_cifar10(tmp_path, batches, test, [n.encode() for n in CIFAR10_CLASSES])
    assert _globals_of((folder / "data_batch_1").read_bytes()) == {
        "numpy.core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
    }
    dm = CIFAR10DataModule(tmp_path, batch_size=2, num_workers=0, augment=False)
    assert dm.classes == CIFAR10_CLASSES
    dm.setup("fit")
    assert dm.train_set.labels.tolist() == [label for _, labels in batches for label in labels]
    expected = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(dm.train_set.images, expected)
    np.testing.assert_array_equal(dm.val_set.images[2], test[0][2].reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_python3_protocol2_pickles_load(tmp_path: Path) -> None:
    raw = make_cifar10_pickles(tmp_path, protocol=2)  # bytes written through _codecs.encode
    assert "_codecs.encode" in _globals_of((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())
    dm = CIFAR10DataModule(tmp_path, batch_size=2, num_workers=0)
    dm.setup("validate")
    np.testing.assert_array_equal(dm.val_set.labels, raw["test"][1])


class _Exploit:
    """Pickles as a call of ``function(*args)``: what a crafted file would run on a bare ``pickle.load``."""

    def __init__(self, function, args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
@pytest.mark.parametrize("target", ["batches.meta", "data_batch_2"])
@pytest.mark.parametrize("attack", ["os.system", "builtins.exec", "open"])
def test_cifar_crafted_pickle_is_refused(tmp_path: Path, target: str, attack: str, protocol: int) -> None:
    make_cifar10_pickles(tmp_path)
    marker = tmp_path / "marker"
    function, args = {
        "os.system": (os.system, (f"touch {marker}",)),
        "builtins.exec": (exec, (f"open({str(marker)!r}, 'w').close()",)),
        "open": (open, (str(marker), "w")),
    }[attack]
    global_name = f"{function.__module__}.{function.__name__}"  # how pickle records it, e.g. posix.system
    path = tmp_path / "cifar-10-batches-py" / target
    payload = (
        {b"label_names": _Exploit(function, args)} if target == "batches.meta" else _Exploit(function, args)
    )
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError) as info:
        CIFAR10DataModule(tmp_path, num_workers=0).setup("fit")
    message = str(info.value)
    assert str(path) in message and global_name in message and "could run code" in message
    assert not marker.exists()


def test_cifar_label_out_of_range_names_the_file(tmp_path: Path) -> None:
    make_cifar10_pickles(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    _write_pickle(path, {b"labels": [3, 10, 1], b"data": np.zeros((3, 3072), np.uint8)})
    dm = CIFAR10DataModule(tmp_path, num_workers=0)
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(path) in message and "label 10" in message and "10 classes" in message


@pytest.mark.slow
def test_real_cifar10_images_in_the_official_pickle_format(tmp_path: Path) -> None:
    """Real CIFAR-10 pixels (from the shared tar) written in the official batch format load unchanged."""
    archive = SHARED_DATA / "cifar10.tar.gz"
    if not archive.is_file():
        pytest.skip(
            f"real CIFAR-10 not available: {archive.resolve()} does not exist (see shared/data/README.md)"
        )
    images, labels = [], []
    with tarfile.open(archive) as tar:  # the first 12 images are enough; stop reading there
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                data = np.frombuffer(tar.extractfile(member).read(), np.uint8)
                images.append(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])
                labels.append(CIFAR10_CLASSES.index(Path(member.name).parent.name))
                if len(images) == 12:
                    break
    rows = np.stack(images).transpose(0, 3, 1, 2).reshape(12, 3072)  # R, G then B planes
    batches = [(rows[2 * i : 2 * i + 2], labels[2 * i : 2 * i + 2]) for i in range(5)]
    write_official_cifar10(tmp_path, batches, (rows[10:], labels[10:]), [n.encode() for n in CIFAR10_CLASSES])
    dm = CIFAR10DataModule(tmp_path, num_workers=0)
    dm.setup("fit")
    np.testing.assert_array_equal(dm.train_set.images, np.stack(images[:10]))
    assert dm.train_set.labels.tolist() == labels[:10] and dm.val_set.labels.tolist() == labels[10:]


# ----------------------------------------------------------------------------------------- skip_corrupt


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_jpeg(path: Path) -> Path:
    cv2.imwrite(str(path), np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    _truncate(path)
    return path


def test_image_folder_truncated_jpeg_stops_by_default(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 1, "val": 2}, ["a", "b"])
    bad = _corrupt_jpeg(tmp_path / "val" / "a" / "0000b.jpg")
    dm = ImageFolderDataModule(tmp_path, image_size=32, resize=32, batch_size=2, num_workers=0)
    with pytest.raises(OSError, match=re.escape(f"Cannot decode image file '{bad}'")):
        list(dm.val_dataloader())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_folder_skip_corrupt(tmp_path: Path, num_workers: int) -> None:
    written = make_image_folder(tmp_path, {"train": 1, "val": 3}, ["a", "b"])
    bad = _corrupt_jpeg(tmp_path / "val" / "a" / "0000b.jpg")  # sorted second: a/0000.png, a/0000b.jpg, ...
    dm = ImageFolderDataModule(
        tmp_path, image_size=32, resize=32, batch_size=3, num_workers=num_workers, skip_corrupt=True
    )
    for epoch in (1, 2):
        batches = list(dm.val_dataloader())
        assert [len(labels) for _, labels in batches] == [2, 3, 1]  # 7 files, batches of 3, one dropped
        images = torch.cat([x for x, _ in batches])
        assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 0, 1, 1, 1]
        for image, (path, _) in zip(images, written["val"]):  # every other sample, in order
            np.testing.assert_array_equal(
                unnormalise(image, dm.mean, dm.std), cv2.imread(str(path))[..., ::-1]
            )
        assert dm.skipped_files == {str(bad): epoch}  # counted once per epoch that reads it
    with pytest.warns(
        UserWarning, match=rf"(?s)skipped 2 samples of 1 unreadable files.*{re.escape(str(bad))} \(2x\)"
    ):
        dm.teardown("validate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.teardown("validate")  # nothing new since the last report: no warning


def test_skip_corrupt_leaves_out_an_all_corrupt_batch(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 1, "val": 2}, ["a", "b"])
    bad = _corrupt_jpeg(tmp_path / "val" / "b" / "0000b.jpg")
    dm = ImageFolderDataModule(
        tmp_path, image_size=32, resize=32, batch_size=1, num_workers=0, skip_corrupt=True
    )
    loader = dm.val_dataloader()
    assert len(loader) == 5 and len(list(loader)) == 4
    assert dm.skipped_files == {str(bad): 1}


def test_cifar_image_folder_skip_corrupt(tmp_path: Path) -> None:
    make_image_folder(tmp_path, {"train": 1, "test": 1}, CIFAR10_CLASSES)
    bad = tmp_path / "test" / "dog" / "0000.png"
    _truncate(bad)
    dm = CIFAR10DataModule(tmp_path, batch_size=4, num_workers=0, skip_corrupt=True)
    labels = torch.cat([y for _, y in dm.val_dataloader()]).tolist()
    assert labels == [i for i in range(10) if CIFAR10_CLASSES[i] != "dog"]
    assert dm.skipped_files == {str(bad): 1}
    with pytest.raises(OSError, match=re.escape(str(bad))):
        list(CIFAR10DataModule(tmp_path, batch_size=4, num_workers=0).val_dataloader())


def test_skip_corrupt_through_the_trainer(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "data", {"train": 4, "val": 1}, ["a", "b"], size=(8, 8))
    bad = tmp_path / "data" / "train" / "b" / "0002.png"
    _truncate(bad)

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
            self.seen = 0

        def training_step(self, batch, batch_idx):
            images, labels = batch
            self.seen += len(labels)
            return nn.functional.cross_entropy(self.net(images), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ImageFolderDataModule(
        tmp_path / "data",
        image_size=8,
        resize=8,
        batch_size=2,
        num_workers=0,
        augment=False,
        skip_corrupt=True,
    )
    model = Tiny()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=0, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(
        UserWarning, match=rf"(?s)ImageFolderDataModule skipped 1 samples.*stage 'fit'.*{re.escape(str(bad))}"
    ):
        trainer.fit(model, datamodule=dm)
    assert model.seen == 7 and trainer.global_step == 4 and dm.skipped_files == {str(bad): 1}


def test_skip_corrupt_refills_an_all_corrupt_train_batch_and_validation_still_runs(tmp_path: Path) -> None:
    """Lightning validates at the end of an epoch by counting its batches: none may go missing."""
    make_image_folder(tmp_path / "data", {"train": 3, "val": 1}, ["a", "b"], size=(8, 8))
    bad = tmp_path / "data" / "train" / "b" / "0001.png"
    _truncate(bad)

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
            self.validations = 0

        def training_step(self, batch, batch_idx):
            images, labels = batch
            assert len(labels) == 1
            return nn.functional.cross_entropy(self.net(images), labels)

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

        def on_validation_epoch_end(self) -> None:
            self.validations += not self.trainer.sanity_checking

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ImageFolderDataModule(
        tmp_path / "data",
        image_size=8,
        resize=8,
        batch_size=1,
        num_workers=0,
        augment=False,
        skip_corrupt=True,
    )
    model = Tiny()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=re.escape(str(bad))):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 12 and model.validations == 2  # 6 steps per epoch, one validation each
    assert dm.skipped_files[str(bad)] >= 2
