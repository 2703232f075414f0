"""Image classification: a synthetic set, CIFAR-10/100, any ImageFolder tree and ImageNet-1k.

Batches are ``(images, labels)``: ``float32`` ``(N, 3, H, W)`` normalised with the module's
``mean`` / ``std`` and ``int64`` ``(N,)``.

:mod:`datamodules.classification.streaming` (optional dependency LitData, not imported here) converts an
ImageFolder tree into LitData streams that ``ImageNetDataModule(stream_dir=...)`` reads.
"""

from datamodules.classification.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.classification.imagefolder import ImageFolderDataModule
from datamodules.classification.imagenet import ImageNetDataModule
from datamodules.classification.synthetic import SyntheticClassificationDataModule
from datamodules.classification.transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    cifar_eval_transform,
    cifar_train_transform,
    imagenet_eval_transform,
    imagenet_train_transform,
)

__all__ = [
    "CIFAR100DataModule",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10DataModule",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "SyntheticClassificationDataModule",
    "cifar_eval_transform",
    "cifar_train_transform",
    "imagenet_eval_transform",
    "imagenet_train_transform",
]
