"""ImageNet-1k (ILSVRC-2012) from its usual ImageFolder tree."""

from __future__ import annotations

import os

from lightning.pytorch.utilities import rank_zero_warn

from datamodules.classification.imagefolder import ImageFolderDataModule
from datamodules.classification.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ImageNetDataModule"]

_IMAGENET_CLASSES = 1000  # ILSVRC-2012 classification (Russakovsky et al., IJCV 2015, arXiv:1409.0575)


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k (ILSVRC-2012) from the usual ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` tree.

    :class:`ImageFolderDataModule` with ImageNet defaults (224 px crops, ImageNet mean/std, batch 256,
    8 workers). The official validation images come in one flat folder: sort them into ``val/<wnid>/``
    first (e.g. with the ``valprep.sh`` script linked from the PyTorch ImageNet example). Labels are the
    indices of the sorted wnids, the order of torchvision's and timm's pretrained ImageNet weights.
    Warns if the tree does not have 1000 classes (a subset such as ImageNet-100 still works).

    Args:
        data_dir: folder holding ``train/`` and ``val/``.
        image_size: side of the square crops.
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes.
        resize: shorter side before the validation center crop (default 256 for 224).
        augment: random resized crop + flip on the training split.
        min_scale: smallest crop area fraction of the random resized crop.
        skip_corrupt: skip unreadable image files instead of stopping with an error naming them.

    Example:
        >>> dm = ImageNetDataModule("/datasets/imagenet")  # doctest: +SKIP
        >>> dm.num_classes, dm.classes[0]  # doctest: +SKIP
        (1000, 'n01440764')
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
        resize: int | None = None,
        augment: bool = True,
        min_scale: float = 0.08,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(
            data_dir,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            train_dir="train",
            val_dir="val",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            resize=resize,
            augment=augment,
            min_scale=min_scale,
            skip_corrupt=skip_corrupt,
        )
        self.save_hyperparameters()
        if self.num_classes != _IMAGENET_CLASSES:
            rank_zero_warn(
                f"ImageNet-1k has {_IMAGENET_CLASSES} classes but '{self.data_dir / 'train'}' has "
                f"{self.num_classes} class folders; labels follow the sorted folder names of this tree.",
                category=UserWarning,
            )
