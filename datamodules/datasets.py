"""Map-style datasets, image reading and folder scanning shared by the classification datamodules.

Every dataset returns ``(image, label)`` with ``image`` the output of its albumentations transform (a
``float32`` tensor ``(3, H, W)``) and ``label`` an ``int``; :func:`collate_classification` stacks them
into ``(float32 (N, 3, H, W), int64 (N,))``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from datamodules.corrupt import CorruptFileError, CorruptFileLog, drop_skipped, skip_or_raise
from datamodules.replay import array_fingerprint, file_fingerprint

__all__ = [
    "IMG_EXTENSIONS",
    "ArrayDataset",
    "ImageFileDataset",
    "TensorPairDataset",
    "collate_classification",
    "find_classes",
    "list_images",
    "read_image",
    "seed_worker",
]

#: File name endings read as images (compared case-insensitively).
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

Transform = Callable[..., dict[str, Any]]


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an RGB ``uint8`` array of shape ``(H, W, 3)``.

    Grey-scale images are expanded to three channels and an alpha channel is dropped.

    Raises:
        CorruptFileError: (an ``OSError``) the file cannot be opened or decoded; the message and its
            ``path`` name the file.

    Example:
        >>> import tempfile, cv2, numpy as np
        >>> path = tempfile.mkdtemp() + "/red.png"
        >>> bgr = np.zeros((2, 2, 3), np.uint8)
        >>> bgr[..., 2] = 255  # OpenCV writes BGR: a red image
        >>> _ = cv2.imwrite(path, bgr)
        >>> read_image(path)[0, 0].tolist()
        [255, 0, 0]
    """
    try:
        buffer = np.fromfile(path, dtype=np.uint8)  # handles non-ASCII paths, unlike cv2.imread
    except OSError as err:
        raise CorruptFileError(f"Cannot open image file '{path}': {err}", path) from err
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR) if buffer.size else None
    if image is None:
        raise CorruptFileError(
            f"Cannot decode image file '{path}': it is empty, truncated, corrupt or not an image.", path
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _seed_transform(transform: Any, seed: int) -> None:
    """Give an albumentations ``Compose`` its own random stream (no-op for other callables)."""
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed % 2**32)


def _seed_from_torch(transform: Any) -> None:
    # Draw the augmentation seed from torch's generator so that ``lightning.seed_everything`` makes
    # main-process (num_workers=0) augmentation reproducible; albumentations otherwise seeds from the OS.
    if hasattr(transform, "set_random_seed"):
        _seed_transform(transform, int(torch.randint(0, 2**31 - 1, ()).item()))


def seed_worker(worker_id: int) -> None:
    """``DataLoader`` ``worker_init_fn``: give every worker its own augmentation stream.

    albumentations ``Compose`` keeps its own generator, which forked workers would otherwise all inherit
    in the same state (identical crops and flips in every worker). The seed is the worker's torch seed
    (different per worker and per epoch, reproducible under ``lightning.seed_everything``) mixed with the
    distributed rank. Also turns off OpenCV's own threading inside workers.
    """
    cv2.setNumThreads(0)
    info = get_worker_info()
    if info is None:
        return
    rank = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
    _seed_transform(getattr(info.dataset, "transform", None), info.seed + 1_000_003 * rank)


def collate_classification(batch: Sequence[tuple[Tensor, int] | None]) -> tuple[Tensor, Tensor] | None:
    """Stack ``(image, label)`` samples into an ``(images, labels)`` tuple (labels as ``int64``).

    Skipped samples (``None``, see ``skip_corrupt``) are left out; ``None`` if every sample was skipped.

    Example:
        >>> batch = [(torch.zeros(3, 2, 2), 1), None, (torch.ones(3, 2, 2), 0)]  # None: a skipped sample
        >>> images, labels = collate_classification(batch)
        >>> tuple(images.shape), labels.tolist()
        ((2, 3, 2, 2), [1, 0])
    """
    batch = drop_skipped(batch)
    if not batch:
        return None
    images, labels = zip(*batch)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.int64)


class TensorPairDataset(Dataset):
    """Ready-made ``(images, labels)`` tensors held in memory (no transform).

    Args:
        images: ``float32`` tensor ``(N, C, H, W)``.
        labels: ``int64`` tensor ``(N,)``.
    """

    transform = None

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def raw(self, index: int) -> tuple[Tensor, int]:
        """Sample ``index`` as stored (these samples have no transform)."""
        return self[index]

    def fingerprint(self) -> str:
        """Digest of the images and labels (what a teacher cache is tied to)."""
        return array_fingerprint(self.images.detach().cpu().numpy(), self.labels.cpu().numpy())


class ArrayDataset(Dataset):
    """In-memory ``uint8`` images ``(N, H, W, 3)`` with integer labels, passed through a transform.

    Args:
        images: RGB ``uint8`` array ``(N, H, W, 3)``.
        labels: integer array ``(N,)``.
        transform: albumentations pipeline called as ``transform(image=...)["image"]``.

    Example:
        >>> import numpy as np
        >>> from datamodules import cifar_eval_transform
        >>> ds = ArrayDataset(np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]), cifar_eval_transform())
        >>> image, label = ds[1]
        >>> tuple(image.shape), label
        ((3, 32, 32), 1)
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Transform | None = None) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}.")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self.images = np.ascontiguousarray(images)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        _seed_from_torch(transform)

    def subset(self, indices: np.ndarray | None, transform: Transform | None) -> ArrayDataset:
        """The samples at ``indices`` (all if ``None``) with another transform."""
        if indices is None:
            return ArrayDataset(self.images, self.labels, transform)
        return ArrayDataset(self.images[indices], self.labels[indices], transform)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.raw(index)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, label

    def raw(self, index: int) -> tuple[np.ndarray, int]:
        """Sample ``index`` before the transform: the ``uint8`` image and its label."""
        return self.images[index], int(self.labels[index])

    def fingerprint(self) -> str:
        """Digest of the images and labels (what a teacher cache is tied to)."""
        return array_fingerprint(self.images, self.labels)


class ImageFileDataset(Dataset):
    """Image files under ``root`` with integer labels, read with OpenCV when indexed.

    File names are kept in one ``numpy`` byte-string array rather than a list of ``str``, so that
    DataLoader workers do not copy millions of Python objects (ImageNet has 1.28 M files).

    Args:
        root: folder the file names are relative to.
        files: file names relative to ``root`` (as ``str``) or an already encoded ``numpy`` ``S`` array.
        labels: integer array, one label per file.
        transform: albumentations pipeline called as ``transform(image=...)["image"]``.
        skip_log: where unreadable files are recorded; the sample is then ``None`` (dropped by the
            collate function). ``None`` (default): an unreadable file raises :class:`CorruptFileError`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        files: Sequence[str] | np.ndarray,
        labels: np.ndarray,
        transform: Transform | None = None,
        skip_log: CorruptFileLog | None = None,
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels.")
        self.root = os.fspath(root)
        if isinstance(files, np.ndarray) and files.dtype.kind == "S":
            self.files = files
        else:
            self.files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.skip_log = skip_log
        _seed_from_torch(transform)

    def subset(self, indices: np.ndarray | None, transform: Transform | None) -> ImageFileDataset:
        """The samples at ``indices`` (all if ``None``) with another transform (same ``skip_log``)."""
        if indices is None:
            return ImageFileDataset(self.root, self.files, self.labels, transform, self.skip_log)
        return ImageFileDataset(
            self.root, self.files[indices], self.labels[indices], transform, self.skip_log
        )

    def path(self, index: int) -> str:
        """Full path of sample ``index``."""
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int] | None:
        try:
            image, label = self.raw(index)
        except CorruptFileError as err:
            return skip_or_raise(err, self.skip_log)
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return image, label

    def raw(self, index: int) -> tuple[np.ndarray, int]:
        """Sample ``index`` before the transform: the RGB image read from its file, and its label."""
        return read_image(self.path(index)), int(self.labels[index])

    def fingerprint(self) -> str:
        """Digest of the file names, file sizes and labels (what a teacher cache is tied to)."""
        return file_fingerprint(self.root, self.files, self.labels)


def find_classes(split_dir: str | os.PathLike) -> list[str]:
    """Sorted names of the sub-folders of ``split_dir`` (one per class), hidden folders excluded.

    The order is that of torchvision's ``ImageFolder`` (plain ``sorted``), except that names starting
    with ``.`` (e.g. ``.ipynb_checkpoints``) are not classes.
    """
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def list_images(split_dir: str | os.PathLike, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """All image files below ``split_dir/<class>/`` (recursively), sorted, with their class index.

    Class folders missing from ``split_dir`` are allowed (they contribute no files).

    Returns:
        ``(files, labels)``: file names relative to ``split_dir`` as a ``numpy`` ``S`` array, and
        ``int64`` labels (index into ``classes``).
    """
    split_dir = Path(split_dir)
    files: list[bytes] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            prefix = os.fsencode(os.path.relpath(dirpath, split_dir)) + os.sep.encode()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMG_EXTENSIONS) and not filename.startswith("."):
                    files.append(prefix + os.fsencode(filename))
                    labels.append(index)
    return np.array(files, dtype=np.bytes_), np.array(labels, dtype=np.int64)
