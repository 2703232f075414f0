"""Albumentations pipelines for semantic segmentation: image and mask transformed together.

Every pipeline is called as ``transform(image=hwc_uint8_rgb, mask=hw_int)`` and returns ``image`` as a
``float32`` tensor ``(3, H', W')`` normalised as ``(pixel / 255 - mean) / std`` and ``mask`` as a
tensor ``(H', W')`` of class indices (converted to ``int64`` by the datasets). Geometric steps move
the mask with the image (nearest-neighbour interpolation for the mask); photometric steps touch the
image only. The returned ``Compose`` carries its normalisation as ``mean`` / ``std`` attributes.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from datamodules.classification.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["seg_eval_transform", "seg_train_transform"]


def _normalise(transform: A.Compose, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    transform.mean = tuple(float(m) for m in mean)  # so a module or a visualiser can undo the normalisation
    transform.std = tuple(float(s) for s in std)
    return transform


def seg_train_transform(
    crop_size: tuple[int, int] = (512, 512),
    scale_range: tuple[float, float] = (0.5, 2.0),
    ignore_index: int = 255,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    hflip_p: float = 0.5,
    photometric: bool = True,
) -> A.Compose:
    """Standard segmentation training augmentation (the mmsegmentation / DeepLab recipe).

    Steps: photometric distortion (brightness, contrast, saturation and hue jitter with probability
    0.5, after mmsegmentation's ``PhotoMetricDistortion``; applied first so that padding stays 0); random
    rescale by a factor drawn uniformly from ``scale_range`` (bilinear image, nearest
    mask); pad the bottom/right up to ``crop_size`` where the image is smaller (image with 0, mask with
    ``ignore_index`` so that padding is never learned); random ``crop_size`` crop; horizontal flip with
    probability ``hflip_p``; normalise.

    Args:
        crop_size: ``(height, width)`` of the output.
        scale_range: ``(min, max)`` rescale factor; ``(1.0, 1.0)`` disables rescaling.
        ignore_index: mask value of padded pixels.
        mean: per-channel mean of pixels scaled to [0, 1].
        std: per-channel standard deviation of pixels scaled to [0, 1].
        hflip_p: probability of the horizontal flip.
        photometric: apply the colour jitter.

    Example:
        >>> import numpy as np
        >>> t = seg_train_transform(crop_size=(64, 96), ignore_index=11)
        >>> out = t(image=np.zeros((40, 50, 3), np.uint8), mask=np.zeros((40, 50), np.uint8))
        >>> tuple(out["image"].shape), tuple(out["mask"].shape)
        ((3, 64, 96), (64, 96))
    """
    height, width = (int(s) for s in crop_size)
    low, high = (float(s) for s in scale_range)
    if height < 1 or width < 1:
        raise ValueError(f"crop_size must be positive (height, width), got {crop_size}.")
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}.")
    if not 0.0 <= hflip_p <= 1.0:
        raise ValueError(f"hflip_p must be in [0, 1], got {hflip_p}.")
    steps: list[A.BasicTransform] = []
    if photometric:  # first, so that the padding stays exactly 0 (jittered contrast would shift it)
        steps.append(A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=0.5))
    if (low, high) != (1.0, 1.0):
        # RandomScale draws the factor as 1 + U(scale_limit).
        steps.append(
            A.RandomScale(
                scale_limit=(low - 1.0, high - 1.0),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                p=1.0,
            )
        )
    steps += [
        A.PadIfNeeded(
            min_height=height,
            min_width=width,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
        ),
        A.RandomCrop(height, width),
        A.HorizontalFlip(p=hflip_p),
    ]
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return _normalise(A.Compose(steps), mean, std)


def seg_eval_transform(
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size: tuple[int, int] | None = None,
) -> A.Compose:
    """Deterministic segmentation evaluation transform: normalise (and optionally resize).

    By default the image keeps its size, so metrics are computed on the full-resolution mask.

    Args:
        mean: per-channel mean of pixels scaled to [0, 1].
        std: per-channel standard deviation of pixels scaled to [0, 1].
        size: optional ``(height, width)`` to resize to (bilinear image, nearest mask).

    Example:
        >>> import numpy as np
        >>> t = seg_eval_transform(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        >>> out = t(image=np.full((4, 6, 3), 255, np.uint8), mask=np.ones((4, 6), np.uint8))
        >>> out["image"][:, 0, 0].tolist(), tuple(out["mask"].shape)
        ([1.0, 1.0, 1.0], (4, 6))
    """
    steps: list[A.BasicTransform] = []
    if size is not None:
        steps.append(
            A.Resize(
                int(size[0]),
                int(size[1]),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
            )
        )
    steps += [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]
    return _normalise(A.Compose(steps), mean, std)
