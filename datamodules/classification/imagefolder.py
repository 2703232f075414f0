"""Classification from any ImageFolder tree (``<split>/<class>/<image>``)."""

from __future__ import annotations

import os
from pathlib import Path

from datamodules.base import BaseClassificationDataModule, Split
from datamodules.classification.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_eval_transform,
    imagenet_train_transform,
)
from datamodules.datasets import IMG_EXTENSIONS, ImageFileDataset, find_classes, list_images

__all__ = ["ImageFolderDataModule"]


def _expected_tree(train_dir: str, val_dir: str) -> str:
    return (
        "Expected an ImageFolder tree, one sub-folder per class (the same names in both splits):\n"
        "    data_dir/\n"
        f"    ├── {train_dir}/\n"
        "    │   ├── n01440764/\n"
        "    │   │   ├── n01440764_10026.JPEG\n"
        "    │   │   └── ...\n"
        "    │   └── .../\n"
        f"    └── {val_dir}/\n"
        "        ├── n01440764/\n"
        "        │   ├── ILSVRC2012_val_00000293.JPEG\n"
        "        │   └── ...\n"
        "        └── .../\n"
        f"Image files end in one of {', '.join(IMG_EXTENSIONS)} (any case)."
    )


class ImageFolderDataModule(BaseClassificationDataModule):
    """Classification from an ImageFolder tree ``data_dir/{train_dir,val_dir}/<class>/<image>``.

    Classes are the sorted names of the sub-folders of ``train_dir`` (as torchvision's
    ``ImageFolder``; hidden folders are skipped), so the label of ``n01440764`` is 0 on ImageNet.
    Images below a class folder are found recursively and read with OpenCV as RGB when indexed; an
    unreadable file raises an ``OSError`` naming it (``skip_corrupt=True``: it is skipped, counted and
    listed, see :class:`~datamodules.base.BaseDataModule`). Labels come from the folder names, so they
    are in range by construction. Training uses Inception-style random resized
    crops and horizontal flips; validation resizes the shorter side to ``resize`` and center-crops
    ``image_size``. Test and predict use the validation split.

    The class list is read in ``__init__`` (one directory listing), so ``num_classes`` and ``classes``
    are available before ``setup``; the files are listed in ``setup``.

    Args:
        data_dir: folder holding ``train_dir`` and ``val_dir``.
        image_size: side of the square crops fed to the model.
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes.
        train_dir: name of the training split folder.
        val_dir: name of the validation split folder.
        mean: normalisation mean (pixels scaled to [0, 1]).
        std: normalisation standard deviation.
        resize: shorter side before the validation center crop; default ``image_size * 256 / 224``
            (256 for 224, the torchvision protocol).
        augment: random resized crop + flip on the training split (else the validation transform).
        min_scale: smallest crop area fraction of the random resized crop.
        skip_corrupt: skip unreadable image files (dropped from their batch, listed at the end of the
            stage) instead of stopping with an error naming them.
        replays: fixed augmentations per training image, for a teacher-output cache (see
            :class:`~datamodules.base.BaseClassificationDataModule`); ``None``: fresh augmentations.
        replay_seed: the seed the fixed augmentations derive from.

    Raises:
        FileNotFoundError: ``data_dir``, ``train_dir`` or ``val_dir`` is missing, or a split has no
            class folders or images; the message shows the expected tree.

    Example:
        >>> dm = ImageFolderDataModule("/data/flowers", image_size=160, batch_size=32)  # doctest: +SKIP
        >>> dm.num_classes, dm.classes[:2]  # doctest: +SKIP
        (102, ['class_00001', 'class_00002'])
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 8,
        train_dir: str = "train",
        val_dir: str = "val",
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        resize: int | None = None,
        augment: bool = True,
        min_scale: float = 0.08,
        skip_corrupt: bool = False,
        replays: int | None = None,
        replay_seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            skip_corrupt=skip_corrupt,
            replays=replays,
            replay_seed=replay_seed,
        )
        if resize is None:
            resize = round(image_size * 256 / 224)  # torchvision reference: resize 256, crop 224
        if image_size < 1 or resize < image_size:
            raise ValueError(f"Need 1 <= image_size <= resize, got image_size={image_size}, resize={resize}.")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}.")
        if type(self).__init__ is ImageFolderDataModule.__init__:
            # A subclass with its own __init__ (ImageNetDataModule) saves its own, narrower arguments.
            self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        self.image_size, self.resize, self.augment, self.min_scale = image_size, resize, augment, min_scale
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_dir, self.val_dir = train_dir, val_dir
        for name in (train_dir, val_dir):
            self._check_split_dir(name)
        self.classes = find_classes(self.data_dir / train_dir)
        self.num_classes = len(self.classes)

    def _fail(self, problem: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"{problem}\nChecked data_dir: '{self.data_dir}' (absolute: '{self.data_dir.absolute()}').\n"
            f"{_expected_tree(self.train_dir, self.val_dir)}"
        )

    def _check_split_dir(self, name: str) -> None:
        split_dir = self.data_dir / name
        if not self.data_dir.is_dir():
            raise self._fail("data_dir does not exist or is not a folder.")
        if not split_dir.is_dir():
            entries = sorted(p.name + ("/" if p.is_dir() else "") for p in self.data_dir.iterdir())
            raise self._fail(f"No '{name}/' folder in data_dir; it contains {entries[:10]}.")
        if find_classes(split_dir):
            return
        flat = any(p.suffix.lower() in IMG_EXTENSIONS for p in split_dir.iterdir())
        hint = (
            " It holds images directly: sort them into one folder per class (for ImageNet's flat val/, "
            "e.g. with the valprep.sh script linked from the PyTorch ImageNet example)."
            if flat
            else ""
        )
        raise self._fail(f"'{split_dir}' has no class sub-folders.{hint}")

    def _build(self, split: Split) -> ImageFileDataset:
        if split == "test" and self.val_set is not None:
            return self.val_set  # type: ignore[return-value]
        name = self.train_dir if split == "train" else self.val_dir
        split_dir = self.data_dir / name
        unknown = sorted(set(find_classes(split_dir)) - set(self.classes))
        if unknown:
            raise ValueError(
                f"'{split_dir}' has class folders that '{self.train_dir}/' lacks: {unknown[:10]}; "
                "both splits must use the same class names."
            )
        files, labels = list_images(split_dir, self.classes)
        if len(files) == 0:
            raise self._fail(f"No image files under the class folders of '{split_dir}'.")
        if split == "train" and self.augment:
            tf = imagenet_train_transform(self.image_size, self.mean, self.std, scale=(self.min_scale, 1.0))
        else:
            tf = imagenet_eval_transform(self.image_size, self.resize, self.mean, self.std)
        return ImageFileDataset(split_dir, files, labels, tf, skip_log=self.skip_log)
