"""A learnable synthetic semantic-segmentation set (shapes on a textured background), made in memory."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import Split
from datamodules.segmentation.base import BaseSegmentationDataModule

__all__ = [
    "SYNTHETIC_SEG_MEAN",
    "SYNTHETIC_SEG_STD",
    "SyntheticSegmentationDataModule",
    "synthetic_segmentation",
]

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
