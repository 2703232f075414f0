"""CIFAR-10 and CIFAR-100 datamodules reading the official python pickles or an ImageFolder tree."""

from __future__ import annotations

import _compat_pickle  # the Python 2 -> 3 name tables pickle itself uses for protocols 0-2
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from datamodules.base import BaseClassificationDataModule, Split
from datamodules.classification.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    cifar_eval_transform,
    cifar_train_transform,
)
from datamodules.datasets import ArrayDataset, ImageFileDataset, find_classes, list_images

__all__ = ["CIFAR100DataModule", "CIFAR10DataModule"]

_TEST_DIRS = ("test", "val")  # ImageFolder name of the held-out split, in order of preference


@dataclass(frozen=True)
class _CIFARSpec:
    """Names of the official python release of one CIFAR set (https://www.cs.toronto.edu/~kriz/cifar.html)."""

    name: str
    num_classes: int
    archive: str
    pickle_dir: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    folder_example: str

    @property
    def pickle_files(self) -> tuple[str, ...]:
        return (self.meta_file, *self.train_files, self.test_file)


_CIFAR10 = _CIFARSpec(
    name="CIFAR-10",
    num_classes=10,
    archive="cifar-10-python.tar.gz",
    pickle_dir="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_file="test_batch",
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    folder_example="cifar10",
)
_CIFAR100 = _CIFARSpec(
    name="CIFAR-100",
    num_classes=100,
    archive="cifar-100-python.tar.gz",
    pickle_dir="cifar-100-python",
    train_files=("train",),
    test_file="test",
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    folder_example="cifar100",
)


def _expected_layouts(spec: _CIFARSpec) -> str:
    files = spec.pickle_files
    tree = "\n".join(f"          {'└──' if i == len(files) - 1 else '├──'} {f}" for i, f in enumerate(files))
    return (
        f"Expected one of these {spec.name} layouts:\n"
        f"  (a) the official python version ({spec.archive}, extracted):\n"
        f"      data_dir/\n"
        f"      └── {spec.pickle_dir}/      (data_dir may also be this folder itself)\n"
        f"{tree}\n"
        f"  (b) ImageFolder (one folder per class, *.png or *.jpg):\n"
        f"      data_dir/                  (or data_dir/<single sub-folder>/, e.g. {spec.folder_example}/)\n"
        f"      ├── train/<class>/*.png\n"
        f"      └── test/<class>/*.png\n"
    )


def _not_found(spec: _CIFARSpec, data_dir: Path, problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}\nChecked data_dir: '{data_dir}' (absolute: '{data_dir.absolute()}').\n"
        f"{_expected_layouts(spec)}"
    )


def _folder_root(candidate: Path) -> tuple[Path, str] | None:
    if not (candidate / "train").is_dir():
        return None
    test_dir = next((d for d in _TEST_DIRS if (candidate / d).is_dir()), None)
    return (candidate, test_dir) if test_dir else None


def _resolve(spec: _CIFARSpec, data_dir: Path) -> tuple[Literal["pickle", "imagefolder"], Path, str]:
    """Find the layout under ``data_dir``: ``(layout, root, test_dir_name)``."""
    if not data_dir.is_dir():
        raise _not_found(spec, data_dir, f"No {spec.name} data: data_dir does not exist or is not a folder.")
    for candidate in (data_dir / spec.pickle_dir, data_dir):
        present = [f for f in spec.pickle_files if (candidate / f).is_file()]
        if len(present) == len(spec.pickle_files):
            return "pickle", candidate, spec.test_file
        if present:
            missing = [f for f in spec.pickle_files if f not in present]
            raise _not_found(
                spec, data_dir, f"Incomplete {spec.name} python release in '{candidate}': missing {missing}."
            )
    found = _folder_root(data_dir)
    if found is None:
        subdirs = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        matches = [m for m in map(_folder_root, subdirs) if m is not None]
        if len(matches) > 1:
            names = [str(m[0].name) for m in matches]
            raise ValueError(
                f"Several ImageFolder trees under '{data_dir}': {names}. Point data_dir at one of them."
            )
        found = matches[0] if matches else None
    if found is None:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in data_dir.iterdir())
        shown = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "")
        raise _not_found(spec, data_dir, f"No {spec.name} data found; data_dir contains: [{shown}].")
    return "imagefolder", found[0], found[1]


# The only globals the official python release refers to: its batches were written by Python 2's cPickle
# (protocol 2) and hold dicts, lists, byte strings, ints and one numpy array, rebuilt through
# numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype. numpy >= 2 spells the module
# numpy._core (copies re-pickled with it), and Python 3 writes bytes at protocol 2 as _codecs.encode.
_CIFAR_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside :data:`_CIFAR_GLOBALS`."""


class _CIFARUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_CIFAR_GLOBALS`, so reading a file never runs its code."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in _CIFAR_GLOBALS))
            python3 = _python3_name(module, name)
            also = f" (Python 3: {python3})" if python3 != f"{module}.{name}" else ""
            raise _RefusedGlobal(
                f"Refusing to load '{self.path}': it asks for the global '{module}.{name}'{also}, which a "
                f"CIFAR python batch never contains (only {allowed}); loading it could run code. Use the "
                "official cifar-*-python.tar.gz files (or the ImageFolder layout)."
            )
        if name == "_reconstruct":  # from the installed numpy, whichever spelling the file used
            return _numpy_reconstruct()
        return super().find_class(module, name)


def _python3_name(module: str, name: str) -> str:
    """The Python 3 name of a global that a protocol 0-2 pickle spells the Python 2 way (``__builtin__``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2 has only numpy.core
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _unpickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR python batch (a dict) without running code the file may ask for."""
    try:
        with open(path, "rb") as f:
            obj = _CIFARUnpickler(f, path).load()
    except _RefusedGlobal:
        raise
    except Exception as err:
        raise ValueError(f"Cannot read '{path}' as a CIFAR python pickle: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"'{path}' holds a {type(obj).__name__}, not a CIFAR dict.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _load_batches(paths: list[Path], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read pickled batches: ``uint8`` images ``(N, 32, 32, 3)`` (RGB) and ``int64`` labels ``(N,)``."""
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"'{path}' lacks 'data' or '{label_key}' (keys: {sorted(batch)}).")
        data = np.asarray(batch["data"], dtype=np.uint8)
        y = np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(y):
            raise ValueError(f"'{path}': 'data' {data.shape} and {len(y)} labels; expected (N, 3072) and N.")
        bad = y[(y < 0) | (y >= num_classes)]
        if len(bad):
            worst = int(bad[np.abs(bad).argmax()])
            raise ValueError(
                f"'{path}' holds label {worst} ({len(bad)} labels outside 0..{num_classes - 1}), but "
                f"this set has {num_classes} classes. Check that the file belongs to this data set "
                "(CIFAR-10 and CIFAR-100 batches are not interchangeable) and is not modified."
            )
        # Rows are the red, green then blue 32x32 planes, each row-major.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


class _CIFARDataModule(BaseClassificationDataModule):
    """Shared implementation of :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`."""

    _spec: _CIFARSpec

    def __init__(
        self,
        data_dir: str | os.PathLike,
        batch_size: int,
        num_workers: int,
        augment: bool,
        val_split: float,
        seed: int,
        pad_mode: Literal["constant", "reflect"],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        skip_corrupt: bool,
        replays: int | None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            skip_corrupt=skip_corrupt,
            replays=replays,
            replay_seed=seed,
        )
        if not 0.0 <= val_split < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {val_split}.")
        if pad_mode not in ("constant", "reflect"):
            raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}.")
        self.save_hyperparameters()
        spec = self._spec
        self.data_dir = Path(data_dir).expanduser()
        self.layout, self.root, self._test_name = _resolve(spec, self.data_dir)
        self.augment, self.val_split, self.seed, self.pad_mode = augment, val_split, seed, pad_mode
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_classes = spec.num_classes
        if self.layout == "pickle":
            meta = _unpickle(self.root / spec.meta_file)
            if spec.names_key not in meta:
                raise ValueError(f"'{self.root / spec.meta_file}' lacks '{spec.names_key}'.")
            names = meta[spec.names_key]
            self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        else:
            self.classes = find_classes(self.root / "train")
        if len(self.classes) != spec.num_classes:
            raise ValueError(
                f"{spec.name} has {spec.num_classes} classes but '{self.root}' ({self.layout} layout) "
                f"gives {len(self.classes)}: {self.classes[:12]}."
            )
        self._sources: dict[str, ArrayDataset | ImageFileDataset] = {}

    def _source(self, split: Literal["train", "test"]) -> ArrayDataset | ImageFileDataset:
        """All samples of an official split, without transform (cached during ``setup``)."""
        if split not in self._sources:
            if self.layout == "pickle":
                files = self._spec.train_files if split == "train" else (self._spec.test_file,)
                images, labels = _load_batches(
                    [self.root / f for f in files], self._spec.label_key, self.num_classes
                )
                self._sources[split] = ArrayDataset(images, labels)
            else:
                split_dir = self.root / ("train" if split == "train" else self._test_name)
                unknown = sorted(set(find_classes(split_dir)) - set(self.classes))
                if unknown:
                    raise ValueError(f"'{split_dir}' has class folders missing from train/: {unknown}.")
                files, labels = list_images(split_dir, self.classes)
                if len(files) == 0:
                    raise FileNotFoundError(f"No images in '{split_dir}'.\n{_expected_layouts(self._spec)}")
                self._sources[split] = ImageFileDataset(split_dir, files, labels, skip_log=self.skip_log)
        return self._sources[split]

    def _holdout(self) -> tuple[np.ndarray, np.ndarray]:
        """Seeded split of the official train set: ``(train_indices, val_indices)``."""
        n = len(self._source("train"))
        n_val = round(self.val_split * n)
        if n_val < 1 or n_val >= n:
            raise ValueError(f"val_split={self.val_split} of {n} training samples leaves an empty split.")
        order = np.random.default_rng(self.seed).permutation(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def _build(self, split: Split) -> ArrayDataset | ImageFileDataset:
        eval_tf = cifar_eval_transform(self.mean, self.std)
        if split == "train":
            tf = (
                cifar_train_transform(self.mean, self.std, pad_mode=self.pad_mode)
                if self.augment
                else eval_tf
            )
            return self._source("train").subset(self._holdout()[0] if self.val_split else None, tf)
        if split == "val" and self.val_split:
            return self._source("train").subset(self._holdout()[1], eval_tf)
        if split == "test" and not self.val_split and self.val_set is not None:
            return self.val_set
        return self._source("test").subset(None, eval_tf)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self._sources.clear()  # the datasets keep what they need


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (Krizhevsky, 2009): 32x32 RGB images, 10 classes, 50,000 train / 10,000 test.

    Reads either layout, detected automatically:

    (a) the official python release, ``cifar-10-python.tar.gz`` extracted: ``data_dir`` is the folder
        holding ``cifar-10-batches-py/`` or that folder itself (``data_batch_1`` ... ``data_batch_5``,
        ``test_batch``, ``batches.meta``; class names from ``batches.meta``). The pickles are read
        whole into memory (180 MB) by an unpickler that resolves only the numpy array globals those
        files use, and refuses any other (a crafted pickle cannot run code). Labels are checked
        against the class count.
    (b) an ImageFolder tree ``data_dir/{train,test}/<class>/*.png|jpg`` (``val/`` is accepted in place
        of ``test/``); ``data_dir`` may also be a parent holding a single such tree (e.g. ``cifar10/``).
        Classes are the sorted folder names, which for the official names is the official order
        (airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck). Files are read when
        indexed; with ``skip_corrupt=True`` an unreadable file is skipped (dropped from its batch,
        listed at the end of the stage) instead of stopping the run with an error naming it. (The
        python release is read whole at ``setup``: a corrupt pickle is always an error.)

    Splits: with ``val_split=0`` (default) validation, test and predict all use the official test set,
    the usual protocol of CIFAR papers (there is no official validation set). With ``val_split > 0``
    a seeded random fraction of the official train set is held out for validation (eval transform)
    and test/predict use the official test set.

    Args:
        data_dir: where the data is (see the layouts above).
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes.
        augment: pad-and-crop + horizontal flip on the training split (else eval transform only).
        val_split: fraction of the train set held out for validation, in [0, 1).
        seed: seed of the hold-out split (and of the fixed augmentations with ``replays``).
        pad_mode: padding before the random crop, ``"constant"`` (zeros) or ``"reflect"``.
        mean: normalisation mean (pixels scaled to [0, 1]).
        std: normalisation standard deviation.
        skip_corrupt: ImageFolder layout: skip unreadable image files instead of stopping.
        replays: fixed augmentations per training image, for a teacher-output cache (see
            :class:`~datamodules.base.BaseClassificationDataModule`); ``None``: fresh augmentations.

    Raises:
        FileNotFoundError: no known layout under ``data_dir``; the message shows both layouts.
        ValueError: the data does not look like CIFAR-10 (wrong class count, labels out of range,
            malformed pickle).
        pickle.UnpicklingError: a pickle asks for anything but numpy's array reconstruction.

    Example:
        >>> dm = CIFAR10DataModule("../shared/data/cifar10")  # doctest: +SKIP
        >>> images, labels = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> images.shape, dm.classes[0]  # doctest: +SKIP
        (torch.Size([128, 3, 32, 32]), 'airplane')
    """

    _spec = _CIFAR10

    def __init__(
        self,
        data_dir: str | os.PathLike,
        batch_size: int = 128,
        num_workers: int = 4,
        augment: bool = True,
        val_split: float = 0.0,
        seed: int = 0,
        pad_mode: Literal["constant", "reflect"] = "constant",
        mean: tuple[float, float, float] = CIFAR10_MEAN,
        std: tuple[float, float, float] = CIFAR10_STD,
        skip_corrupt: bool = False,
        replays: int | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            batch_size,
            num_workers,
            augment,
            val_split,
            seed,
            pad_mode,
            mean,
            std,
            skip_corrupt,
            replays,
        )


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (Krizhevsky, 2009): 32x32 RGB images, 100 fine classes, 50,000 train / 10,000 test.

    Same layouts, splits and arguments as :class:`CIFAR10DataModule`; the python release is
    ``cifar-100-python/{train,test,meta}`` and the labels are the fine labels (``fine_labels``, names
    from ``fine_label_names``; the 20 coarse super-classes are not used). Normalisation defaults to
    the CIFAR-100 statistics used by the CRD benchmark.

    Example:
        >>> dm = CIFAR100DataModule("data/", batch_size=64, val_split=0.1)  # doctest: +SKIP
        >>> dm.num_classes  # doctest: +SKIP
        100
    """

    _spec = _CIFAR100

    def __init__(
        self,
        data_dir: str | os.PathLike,
        batch_size: int = 128,
        num_workers: int = 4,
        augment: bool = True,
        val_split: float = 0.0,
        seed: int = 0,
        pad_mode: Literal["constant", "reflect"] = "constant",
        mean: tuple[float, float, float] = CIFAR100_MEAN,
        std: tuple[float, float, float] = CIFAR100_STD,
        skip_corrupt: bool = False,
        replays: int | None = None,
    ) -> None:
        super().__init__(
            data_dir,
            batch_size,
            num_workers,
            augment,
            val_split,
            seed,
            pad_mode,
            mean,
            std,
            skip_corrupt,
            replays,
        )
