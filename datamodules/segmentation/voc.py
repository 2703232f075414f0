"""Pascal VOC 2012 semantic segmentation (Everingham et al.), optionally with the SBD augmented set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamodules.classification.transforms import IMAGENET_MEAN, IMAGENET_STD
from datamodules.segmentation.base import FileSegmentationDataModule, check_ignore_index, layout_error

__all__ = ["VOC_CLASSES", "VOC_PALETTE", "VOCSegmentationDataModule", "voc_colormap"]


def voc_colormap(n: int = 256) -> list[tuple[int, int, int]]:
    """The Pascal VOC colour map (``VOCdevkit`` ``labelcolormap.m``): bits of the index interleaved.

    Bit ``3 * j + c`` of the label (``c`` = red, green, blue) becomes bit ``7 - j`` of channel ``c``.

    Example:
        >>> voc_colormap(4)
        [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    """
    cmap = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap.append((r, g, b))
    return cmap


#: Pascal VOC 2012 segmentation classes (index 0 = background, 1..20 the object classes).
VOC_CLASSES: list[str] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
#: The standard VOC colour map (:func:`voc_colormap`) for the 21 classes.
VOC_PALETTE: list[tuple[int, int, int]] = voc_colormap(21)

_VOC_LAYOUT = """Expected the Pascal VOC 2012 layout (VOCtrainval_11-May-2012.tar; SBD extras optional):
    data_dir/                       (or data_dir = VOCdevkit/ or VOC2012/ itself)
    └── VOCdevkit/
        └── VOC2012/
            ├── JPEGImages/<name>.jpg
            ├── SegmentationClass/<name>.png      palette PNG: 0..20 classes, 255 = border (ignored)
            ├── SegmentationClassAug/<name>.png   (use_sbd only: SBD + VOC masks, 0..20 and 255)
            └── ImageSets/Segmentation/
                ├── train.txt                     one <name> per line (1464)
                ├── val.txt                       (1449)
                └── train_aug.txt                 (use_sbd only: 10582 names or '/JPEGImages/x.jpg ...' lines)"""


def _voc_root(data_dir: Path) -> Path:
    for candidate in (data_dir / "VOCdevkit" / "VOC2012", data_dir / "VOC2012", data_dir):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise layout_error(
        _VOC_LAYOUT, "No 'JPEGImages/' folder under data_dir (tried VOCdevkit/VOC2012, VOC2012, .).", data_dir
    )


def _read_voc_split(root: Path, list_name: str, mask_folder: str) -> tuple[list[Path], list[Path]]:
    list_file = root / "ImageSets" / "Segmentation" / list_name
    if not list_file.is_file():
        raise layout_error(_VOC_LAYOUT, f"VOC list file '{list_name}' is missing.", list_file)
    mask_dir = root / mask_folder
    if not mask_dir.is_dir():
        raise layout_error(_VOC_LAYOUT, f"VOC folder '{mask_folder}/' is missing.", mask_dir)
    images, masks = [], []
    for line in list_file.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        name = os.path.splitext(parts[0].replace("\\", "/").rsplit("/", 1)[-1])[0]
        image, mask = root / "JPEGImages" / f"{name}.jpg", mask_dir / f"{name}.png"
        for path in (image, mask):
            if not path.is_file():
                raise layout_error(
                    _VOC_LAYOUT, f"File for '{name}' listed in '{list_name}' is missing.", path
                )
        images.append(image)
        masks.append(mask)
    if not images:
        raise layout_error(_VOC_LAYOUT, f"VOC list file '{list_name}' lists no samples.", list_file)
    return images, masks


class VOCSegmentationDataModule(FileSegmentationDataModule):
    """Pascal VOC 2012 segmentation (Everingham et al.), optionally with the SBD augmented train set.

    Reads ``ImageSets/Segmentation/{train,val}.txt`` (1,464 / 1,449 images), ``JPEGImages/<name>.jpg``
    and ``SegmentationClass/<name>.png`` (palette PNGs whose indices are the labels: 0 background,
    1..20 :data:`VOC_CLASSES`, 255 the object borders and difficult regions, kept as
    ``ignore_index``). With ``use_sbd`` the training list is ``train_aug.txt`` (10,582 images of
    SBD, Hariharan et al. 2011, plus VOC train, without VOC val) with masks from
    ``SegmentationClassAug/``; validation always uses ``val.txt`` and ``SegmentationClass/``.
    Test/predict use val. A mask value other than 0..20 and 255 raises a ``ValueError`` naming the file.

    Args:
        data_dir: the folder holding ``VOCdevkit/``, or ``VOCdevkit/`` or ``VOC2012/`` itself.
        crop_size: ``(height, width)`` of the training crops.
        use_sbd: train on ``train_aug.txt`` / ``SegmentationClassAug/``.
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes.
        augment: augment the training split (else normalise only, full images).
        ignore_index: mask value of the border and padded pixels (21..255; mask value 255 maps to it).
        scale_range: ``(min, max)`` random rescale factor of the training augmentation.
        mean: normalisation mean (pixels scaled to [0, 1]).
        std: normalisation standard deviation.
        skip_corrupt: skip unreadable images / masks (dropped from their batch, listed at the end of
            the stage) instead of stopping with an error naming them.

    Raises:
        FileNotFoundError: a folder, list file or listed file is missing; the message shows the
            expected layout and the offending path.
        OSError: an image or mask cannot be decoded (when the sample is loaded; unless ``skip_corrupt``).
        ValueError: a mask holds a raw value outside the set's encoding (when the sample is loaded).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        crop_size: tuple[int, int] = (512, 512),
        use_sbd: bool = False,
        batch_size: int = 8,
        num_workers: int = 4,
        augment: bool = True,
        ignore_index: int = 255,
        scale_range: tuple[float, float] = (0.5, 2.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, skip_corrupt=skip_corrupt)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        if not self.data_dir.is_dir():
            raise layout_error(_VOC_LAYOUT, "VOC data_dir does not exist or is not a folder.", self.data_dir)
        check_ignore_index(ignore_index, len(VOC_CLASSES))
        self._set_options(crop_size, augment, scale_range, ignore_index, mean, std)
        self.use_sbd = use_sbd
        self.root = _voc_root(self.data_dir)
        self.num_classes = len(VOC_CLASSES)
        self.classes = list(VOC_CLASSES)
        self.palette = list(VOC_PALETTE)
        lut = np.full(256, ignore_index, np.uint8)
        lut[: self.num_classes] = np.arange(self.num_classes)
        self._lut = lut
        self._raw_values = [*range(self.num_classes), 255]  # 255: borders and difficult regions
        self._layout = _VOC_LAYOUT
        train = ("train_aug.txt", "SegmentationClassAug") if use_sbd else ("train.txt", "SegmentationClass")
        self._files = {
            "train": _read_voc_split(self.root, *train),
            "val": _read_voc_split(self.root, "val.txt", "SegmentationClass"),
        }
