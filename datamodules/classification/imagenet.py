"""ImageNet-1k (ILSVRC-2012) from its usual ImageFolder tree, or streamed with LitData."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from datamodules.base import BaseClassificationDataModule, Split
from datamodules.classification.imagefolder import ImageFolderDataModule
from datamodules.classification.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from datamodules.datasets import find_classes

__all__ = ["ImageNetDataModule"]

_IMAGENET_CLASSES = 1000  # ILSVRC-2012 classification (Russakovsky et al., IJCV 2015, arXiv:1409.0575)


class ImageNetDataModule(ImageFolderDataModule):
    """ImageNet-1k (ILSVRC-2012) from the usual ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` tree.

    :class:`ImageFolderDataModule` with ImageNet defaults (224 px crops, ImageNet mean/std, batch 256,
    8 workers). The official validation images come in one flat folder: sort them into ``val/<wnid>/``
    first (e.g. with the ``valprep.sh`` script linked from the PyTorch ImageNet example). Labels are the
    indices of the sorted wnids, the order of torchvision's and timm's pretrained ImageNet weights.
    Warns if the tree does not have 1000 classes (a subset such as ImageNet-100 still works).

    **Streaming (opt-in, ``pip install "lightningkd[stream]"``).** With ``stream_dir`` the images come
    from LitData streams written once by the converter (see :mod:`datamodules.classification.streaming`)::

        python -m datamodules.classification.streaming convert /data/imagenet /data/imagenet-stream

    ``stream_dir`` holds ``train/`` and ``val/`` streams; it is a local folder or an object-store URI
    (``s3://bucket/imagenet-stream``, chunks cached in ``stream_cache_dir``). The streams hold the
    original JPEG bytes, decoded as the folder path decodes them and passed through the same
    albumentations pipelines, with the class list recorded at conversion; ``data_dir`` is then not
    needed, and if it is given its class folders must equal the streams' class list. Batches look the
    same as from the folders. Under DDP, LitData splits the chunks across ranks and, within a rank,
    across DataLoader workers (no ``DistributedSampler``). Training shuffles chunks and samples every
    epoch and gives every rank the same number of full batches (fewer than ``world size x batch size``
    samples are left out per epoch, different ones each epoch); validation reads every image exactly
    once across the ranks (no padding with repeated samples, so ranks may differ by a few images).
    ``skip_corrupt`` does not apply (the converter checks every image). Create the loaders after the
    process group is up (``setup`` does, under a Trainer).

    Args:
        data_dir: folder holding ``train/`` and ``val/`` (optional with ``stream_dir``).
        image_size: side of the square crops.
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes.
        resize: shorter side before the validation center crop (default 256 for 224).
        augment: random resized crop + flip on the training split.
        min_scale: smallest crop area fraction of the random resized crop.
        skip_corrupt: skip unreadable image files instead of stopping with an error naming them.
        stream_dir: folder or object-store URI holding ``train/`` and ``val/`` LitData streams written by
            ``python -m datamodules.classification.streaming convert``; ``None`` reads ``data_dir``.
        stream_cache_dir: where chunks streamed from object storage are cached (LitData's default,
            ``~/.lightning/chunks``, if ``None``); unused for a local ``stream_dir``.
        replays: fixed augmentations per training image, for a teacher-output cache (folders only; see
            :class:`~datamodules.base.BaseClassificationDataModule`); ``None``: fresh augmentations.
        replay_seed: the seed the fixed augmentations derive from.

    Raises:
        FileNotFoundError: a missing or malformed ``data_dir`` (the message shows the expected tree), or
            a ``stream_dir`` without complete ``train/`` and ``val/`` streams (it names the converter).
        ValueError: neither ``data_dir`` nor ``stream_dir`` given, class lists that differ, or
            ``skip_corrupt`` or ``replays`` with ``stream_dir``.

    Example:
        >>> dm = ImageNetDataModule("/datasets/imagenet")  # doctest: +SKIP
        >>> dm.num_classes, dm.classes[0]  # doctest: +SKIP
        (1000, 'n01440764')
        >>> dm = ImageNetDataModule(stream_dir="s3://my-bucket/imagenet-stream")  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        image_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
        resize: int | None = None,
        augment: bool = True,
        min_scale: float = 0.08,
        skip_corrupt: bool = False,
        stream_dir: str | None = None,
        stream_cache_dir: str | None = None,
        replays: int | None = None,
        replay_seed: int = 0,
    ) -> None:
        if replays is not None and stream_dir is not None:
            raise ValueError(
                "replays (fixed augmentations for a teacher-output cache) needs the image folders: a stream "
                "cannot be read by index. Drop stream_dir, or drop replays."
            )
        self.stream_dir = None if stream_dir is None else os.fspath(stream_dir)
        self.stream_cache_dir = stream_cache_dir
        if self.stream_dir is None:
            if data_dir is None:
                raise ValueError(
                    "Give data_dir (an ImageFolder tree with train/ and val/) or stream_dir (LitData streams "
                    "written by: python -m datamodules.classification.streaming convert DATA_DIR OUT_DIR)."
                )
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
                replays=replays,
                replay_seed=replay_seed,
            )
        else:
            self._init_stream(
                data_dir, image_size, batch_size, num_workers, resize, augment, min_scale, skip_corrupt
            )
        self.save_hyperparameters()
        if self.num_classes != _IMAGENET_CLASSES:
            where = (
                f"the streams in '{self.stream_dir}' have {self.num_classes} classes"
                if self.stream_dir
                else f"'{self.data_dir / 'train'}' has {self.num_classes} class folders"
            )
            rank_zero_warn(
                f"ImageNet-1k has {_IMAGENET_CLASSES} classes but {where}; labels follow the sorted class "
                "folder names of this tree.",
                category=UserWarning,
            )

    def _init_stream(
        self,
        data_dir: str | os.PathLike | None,
        image_size: int,
        batch_size: int,
        num_workers: int,
        resize: int | None,
        augment: bool,
        min_scale: float,
        skip_corrupt: bool,
    ) -> None:
        """The streaming path's ``__init__``: ImageFolderDataModule's settings, classes from the streams."""
        from datamodules.classification.streaming import read_stream_classes, require_litdata

        require_litdata()
        if skip_corrupt:
            raise ValueError(
                "skip_corrupt does not apply with stream_dir: the converter decodes every image and stops on "
                "an unreadable one (or leaves it out with --skip-corrupt). Remove skip_corrupt."
            )
        BaseClassificationDataModule.__init__(self, batch_size=batch_size, num_workers=num_workers)
        # the same settings and checks as ImageFolderDataModule
        if resize is None:
            resize = round(image_size * 256 / 224)  # torchvision reference: resize 256, crop 224
        if image_size < 1 or resize < image_size:
            raise ValueError(f"Need 1 <= image_size <= resize, got image_size={image_size}, resize={resize}.")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}.")
        self.image_size, self.resize, self.augment, self.min_scale = image_size, resize, augment, min_scale
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.train_dir, self.val_dir = "train", "val"
        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.classes = read_stream_classes(self._stream_split("train"))
        val_classes = read_stream_classes(self._stream_split("val"))
        if val_classes != self.classes:
            raise ValueError(
                f"The train and val streams in '{self.stream_dir}' have different class lists; convert both "
                "splits in one run (the converter gives every split the train split's classes)."
            )
        if self.data_dir is not None:
            self._check_split_dir("train")
            folder_classes = find_classes(self.data_dir / "train")
            if folder_classes != self.classes:
                diff = sorted(set(folder_classes) ^ set(self.classes))
                raise ValueError(
                    f"The class folders of '{self.data_dir / 'train'}' differ from the class list of the streams "
                    f"in '{self.stream_dir}' (e.g. {diff[:5]}, or a different order): the streams were made from "
                    "another tree. Drop data_dir, or convert this tree again."
                )
        self.num_classes = len(self.classes)

    def _stream_split(self, name: str) -> str:
        from datamodules.classification.streaming import join_uri

        assert self.stream_dir is not None
        return join_uri(self.stream_dir, name)

    def _build(self, split: Split) -> Dataset:
        if self.stream_dir is None:
            return super()._build(split)
        from datamodules.classification.streaming import ImageStreamDataset

        if split == "test" and self.val_set is not None:
            return self.val_set
        train = split == "train"
        if train and self.augment:
            tf = imagenet_train_transform(self.image_size, self.mean, self.std, scale=(self.min_scale, 1.0))
        else:
            tf = imagenet_eval_transform(self.image_size, self.resize, self.mean, self.std)
        # training: reshuffled every epoch, equal full batches on every rank; evaluation: every image once
        return ImageStreamDataset(
            self._stream_split("train" if train else "val"),
            transform=tf,
            shuffle=train,
            drop_last=train,
            cache_dir=self.stream_cache_dir,
        )

    def _loader(self, split: Split, train: bool = False) -> DataLoader:
        if self.stream_dir is None:
            return super()._loader(split, train)
        from datamodules.classification.streaming import stream_loader

        dataset: Any = getattr(self, f"{split}_set")
        if dataset is None:  # used outside a Trainer without calling setup()
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
            dataset = getattr(self, f"{split}_set")
        loader = stream_loader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=torch.cuda.is_available(),
        )
        if train and len(loader) == 0:
            raise ValueError(
                f"The train stream has fewer samples per rank than batch_size={self.batch_size}; the train "
                "loader gives full batches only and would be empty."
            )
        return loader
