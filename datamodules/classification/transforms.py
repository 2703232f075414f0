"""Albumentations pipelines and normalisation constants for image classification.

Every pipeline takes an RGB ``numpy.ndarray`` of shape ``(H, W, 3)`` and dtype ``uint8`` (as read by
:func:`datamodules.datasets.read_image`) under the key ``image`` and returns a ``float32`` tensor of
shape ``(3, H', W')`` normalised as ``(pixel / 255 - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cifar_eval_transform",
    "cifar_train_transform",
    "imagenet_eval_transform",
    "imagenet_train_transform",
]

# Per-channel mean / std of all pixel values (scaled to [0, 1]) of the 50,000 CIFAR-10 training images
# of the official release (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009).
# Note: the often-copied std (0.2023, 0.1994, 0.2010) is not the pixel std.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

# CIFAR-100 training-set statistics as used by the CRD benchmark (Tian et al., ICLR 2020,
# arXiv:1910.10699; HobbitLong/RepDistiller, dataset/cifar100.py), which most KD papers follow.
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4867, 0.4408)
CIFAR100_STD: tuple[float, float, float] = (0.2675, 0.2565, 0.2761)

# ImageNet-1k training-set statistics used by the torchvision reference scripts and pretrained weights
# (pytorch/examples imagenet/main.py; torchvision.transforms._presets.ImageClassification).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_BORDER = {"constant": cv2.BORDER_CONSTANT, "reflect": cv2.BORDER_REFLECT_101}


def cifar_train_transform(
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
    size: int = 32,
    padding: int = 4,
    pad_mode: Literal["constant", "reflect"] = "constant",
) -> A.Compose:
    """Standard CIFAR training augmentation: pad, random crop, horizontal flip, normalise.

    This is the augmentation of He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
    (arXiv:1512.03385, Sec. 4.2: 4 pixels padded on each side, random 32x32 crop, horizontal flip),
    used by the CRD KD benchmark.

    Args:
        mean: per-channel mean of pixels scaled to [0, 1].
        std: per-channel standard deviation of pixels scaled to [0, 1].
        size: side of the random crop (and of the input images).
        padding: pixels added on each side before cropping.
        pad_mode: ``"constant"`` pads with zeros (black, as in He et al.); ``"reflect"`` mirrors the
            border pixels.

    Returns:
        An albumentations ``Compose``; call it as ``transform(image=hwc_uint8)["image"]``.

    Example:
        >>> import numpy as np
        >>> t = cifar_train_transform()
        >>> t(image=np.zeros((32, 32, 3), np.uint8))["image"].shape
        torch.Size([3, 32, 32])
    """
    if pad_mode not in _BORDER:
        raise ValueError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}.")
    return A.Compose(
        [
            A.PadIfNeeded(size + 2 * padding, size + 2 * padding, border_mode=_BORDER[pad_mode], fill=0),
            A.RandomCrop(size, size),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )


def cifar_eval_transform(
    mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD
) -> A.Compose:
    """Deterministic CIFAR evaluation transform: normalise only.

    Example:
        >>> import numpy as np
        >>> t = cifar_eval_transform(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        >>> t(image=np.full((32, 32, 3), 255, np.uint8))["image"][:, 0, 0].tolist()
        [1.0, 1.0, 1.0]
    """
    return A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()])


def imagenet_train_transform(
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.08, 1.0),
) -> A.Compose:
    """ImageNet training augmentation: random resized crop, horizontal flip, normalise.

    Inception-style cropping (Szegedy et al., "Going Deeper with Convolutions", CVPR 2015,
    arXiv:1409.4842): area fraction in ``scale`` (0.08-1 as in the torchvision reference scripts) and
    aspect ratio in [3/4, 4/3], resized bilinearly to ``size`` x ``size``.

    Example:
        >>> import numpy as np
        >>> t = imagenet_train_transform(size=64)
        >>> t(image=np.zeros((80, 100, 3), np.uint8))["image"].shape
        torch.Size([3, 64, 64])
    """
    return A.Compose(
        [
            A.RandomResizedCrop(size=(size, size), scale=scale, ratio=(3 / 4, 4 / 3)),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )


def imagenet_eval_transform(
    size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """ImageNet evaluation transform: resize the shorter side to ``resize``, center crop ``size``.

    The 256 -> 224 protocol of the torchvision reference scripts (crop ratio 0.875).

    Example:
        >>> import numpy as np
        >>> t = imagenet_eval_transform(size=56, resize=64)
        >>> t(image=np.zeros((80, 100, 3), np.uint8))["image"].shape
        torch.Size([3, 56, 56])
    """
    if resize < size:
        raise ValueError(f"resize ({resize}) must be >= size ({size}) for the center crop.")
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=resize),
            A.CenterCrop(size, size),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
