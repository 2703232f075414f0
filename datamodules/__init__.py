"""LightningDataModules, datasets and albumentations pipelines for the lightningkd recipes.

Classification: :class:`SyntheticClassificationDataModule` (in memory, no download),
:class:`CIFAR10DataModule` / :class:`CIFAR100DataModule` (official python pickles or ImageFolder),
:class:`ImageFolderDataModule` and :class:`ImageNetDataModule`. Batches are ``(images, labels)``:
``float32`` ``(N, 3, H, W)`` normalised with the module's ``mean``/``std`` and ``int64`` ``(N,)``.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # before albumentations is imported: no version check

from datamodules.base import BaseClassificationDataModule  # noqa: E402
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule  # noqa: E402
from datamodules.datasets import ArrayDataset, ImageFileDataset, read_image  # noqa: E402
from datamodules.imagefolder import ImageFolderDataModule, ImageNetDataModule  # noqa: E402
from datamodules.synthetic import SyntheticClassificationDataModule  # noqa: E402
from datamodules.transforms import (  # noqa: E402
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
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayDataset",
    "BaseClassificationDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "ImageNetDataModule",
    "SyntheticClassificationDataModule",
    "cifar_eval_transform",
    "cifar_train_transform",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "read_image",
]
