"""Semantic-segmentation datamodules for Cityscapes, ADE20K (SceneParsing) and Pascal VOC 2012.

Built like :class:`~datamodules.segmentation.CamVidDataModule`: the layout is checked at construction
(errors show the expected tree and the offending path), training samples get
:func:`~datamodules.seg_transforms.seg_train_transform` and evaluation samples are only normalised.
Raw label values are remapped to training indices with a 256-entry lookup table
(:class:`LabelMappedSegmentationDataset`) before the joint transform, so padding added by the
augmentation is ``ignore_index`` and never a remapped value.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.base import Split
from datamodules.seg_transforms import seg_eval_transform, seg_train_transform
from datamodules.segmentation import BaseSegmentationDataModule, SegmentationFileDataset, Transform
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "ADE20KDataModule",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_ID_TO_TRAINID",
    "CITYSCAPES_PALETTE",
    "CityscapesDataModule",
    "LabelMappedSegmentationDataset",
    "VOC_CLASSES",
    "VOC_PALETTE",
    "VOCSegmentationDataModule",
    "ade20k_lut",
    "cityscapes_lut",
    "voc_colormap",
]


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


class LabelMappedSegmentationDataset(SegmentationFileDataset):
    """:class:`~datamodules.segmentation.SegmentationFileDataset` whose raw masks go through ``lut``.

    Args:
        images: image paths.
        masks: mask paths (same length, same order).
        lut: ``uint8`` array of 256 entries; a raw mask value ``v`` becomes ``lut[v]``.
        transform: joint albumentations pipeline (applied after the mapping).
        layout: text appended to read errors.
    """

    def __init__(
        self,
        images: Sequence[str | os.PathLike],
        masks: Sequence[str | os.PathLike],
        lut: np.ndarray,
        transform: Transform | None = None,
        layout: str = "",
    ) -> None:
        lut = np.asarray(lut)
        if lut.shape != (256,):
            raise ValueError(f"lut must have 256 entries, got shape {lut.shape}.")
        self.lut = lut.astype(np.uint8)
        super().__init__(images, masks, transform, layout)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask = super().load(index)
        return image, self.lut[mask]


def _layout_error(layout: str, problem: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}\nOffending path: '{path}' (absolute: '{path.absolute()}').\n{layout}"
    )


def _file_module_init(
    module: BaseSegmentationDataModule, crop_size, augment, scale_range, ignore_index, mean, std
):
    module.crop_size = (int(crop_size[0]), int(crop_size[1]))
    module.augment = augment
    module.scale_range = (float(scale_range[0]), float(scale_range[1]))
    module.ignore_index = ignore_index
    module.mean, module.std = tuple(mean), tuple(std)


class _MappedFileDataModule(BaseSegmentationDataModule):
    """Shared ``_build``: ``self._files[split]`` pairs, ``self._lut`` mapping, ``self._layout`` text."""

    _files: dict[str, tuple[list[Path], list[Path]]]
    _lut: np.ndarray
    _layout: str

    def _build(self, split: Split) -> LabelMappedSegmentationDataset:
        if split == "train" and self.augment:
            tf = seg_train_transform(self.crop_size, self.scale_range, self.ignore_index, self.mean, self.std)
        else:
            tf = seg_eval_transform(self.mean, self.std)
        images, masks = self._files.get(split, self._files["val"])
        return LabelMappedSegmentationDataset(images, masks, self._lut, tf, layout=self._layout)


def _check_ignore_index(ignore_index: int, num_classes: int) -> None:
    if not num_classes <= ignore_index <= 255:
        raise ValueError(f"ignore_index must be in [{num_classes}, 255], got {ignore_index}.")


# ----------------------------------------------------------------------------------------- Cityscapes

#: The 19 Cityscapes evaluation classes in train-id order (cityscapesScripts ``labels.py``).
CITYSCAPES_CLASSES: list[str] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]
#: RGB colour per Cityscapes train id (cityscapesScripts ``labels.py``).
CITYSCAPES_PALETTE: list[tuple[int, int, int]] = [
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
]
#: Official ``labelIds`` -> ``trainIds`` table (ids not listed, 0-6, 9, 10, 14-16, 18, 29, 30, -1: ignored).
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}


def cityscapes_lut(ignore_index: int = 255) -> np.ndarray:
    """256-entry ``uint8`` table mapping Cityscapes ``labelIds`` to train ids (others -> ``ignore_index``)."""
    lut = np.full(256, ignore_index, np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        lut[label_id] = train_id
    return lut


_CITYSCAPES_LAYOUT = """Expected the official Cityscapes layout (leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip):
    data_dir/
    ├── leftImg8bit/
    │   ├── train/<city>/<city>_<seq>_<frame>_leftImg8bit.png   2048x1024 RGB (2975 images)
    │   ├── val/<city>/...                                       (500 images)
    │   └── test/                                                (optional, unused: no public labels)
    └── gtFine/
        ├── train/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   34 label ids per pixel
        └── val/<city>/..._gtFine_labelIds.png
    (``*_gtFine_labelTrainIds.png`` from createTrainIdLabelImgs.py are not needed and not read)"""


def _read_cityscapes_split(root: Path, split: str) -> tuple[list[Path], list[Path]]:
    image_dir, mask_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise _layout_error(
                _CITYSCAPES_LAYOUT, f"Cityscapes folder '{folder.parent.name}/{split}/' is missing.", folder
            )
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise _layout_error(
            _CITYSCAPES_LAYOUT, f"No '<city>/*_leftImg8bit.png' images for split '{split}'.", image_dir
        )
    masks = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        mask = mask_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
        if not mask.is_file():
            raise _layout_error(_CITYSCAPES_LAYOUT, f"No labelIds mask for image '{image.name}'.", mask)
        masks.append(mask)
    return images, masks


class CityscapesDataModule(_MappedFileDataModule):
    """Cityscapes fine annotations (Cordts et al., 2016): 2048x1024 street scenes, 19 classes.

    Reads ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with the matching
    ``gtFine/{split}/<city>/*_gtFine_labelIds.png`` (2975 train / 500 val images). The 34 label ids
    are mapped to the 19 train ids with the official cityscapesScripts table
    (:data:`CITYSCAPES_ID_TO_TRAINID`, a lookup table applied at load time); every other id
    (unlabelled, ego vehicle, rectification border, out of roi, static, dynamic, ground, parking,
    rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer, license plate) becomes
    ``ignore_index``. Pre-generated ``*_gtFine_labelTrainIds.png`` files are ignored even when
    present: the ``labelIds`` masks plus the table give the same result without depending on how
    (and with which ``ignore`` value) they were generated. The test split's labels are not public
    (its ``gtFine/test`` masks carry no real labels), so test/predict use val.

    Training samples get :func:`~datamodules.seg_transforms.seg_train_transform` (random scale,
    pad with ``ignore_index``, random ``crop_size`` crop, flip, colour jitter) when ``augment``;
    validation samples are only normalised (full 2048x1024 resolution).

    Args:
        data_dir: the Cityscapes folder holding ``leftImg8bit/`` and ``gtFine/``.
        crop_size: ``(height, width)`` of the training crops.
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes.
        augment: augment the training split (else normalise only, full images).
        ignore_index: mask value of ignored and padded pixels (19..255).
        scale_range: ``(min, max)`` random rescale factor of the training augmentation.
        mean: normalisation mean (pixels scaled to [0, 1]); ImageNet's, for pretrained backbones.
        std: normalisation standard deviation.

    Raises:
        FileNotFoundError: a folder, image or mask is missing; the message shows the expected
            layout and the offending path.
        OSError: an image or mask cannot be decoded (when the sample is loaded).

    Example:
        >>> dm = CityscapesDataModule("../shared/data/cityscapes", batch_size=2)  # doctest: +SKIP
        >>> images, masks = next(iter(dm.train_dataloader()))  # doctest: +SKIP
        >>> images.shape, masks.shape  # doctest: +SKIP
        (torch.Size([2, 3, 512, 1024]), torch.Size([2, 512, 1024]))
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        crop_size: tuple[int, int] = (512, 1024),
        batch_size: int = 8,
        num_workers: int = 4,
        augment: bool = True,
        ignore_index: int = 255,
        scale_range: tuple[float, float] = (0.5, 2.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        if not self.data_dir.is_dir():
            raise _layout_error(
                _CITYSCAPES_LAYOUT, "Cityscapes data_dir does not exist or is not a folder.", self.data_dir
            )
        _check_ignore_index(ignore_index, len(CITYSCAPES_CLASSES))
        _file_module_init(self, crop_size, augment, scale_range, ignore_index, mean, std)
        self.num_classes = len(CITYSCAPES_CLASSES)
        self.classes = list(CITYSCAPES_CLASSES)
        self.palette = list(CITYSCAPES_PALETTE)
        self._lut = cityscapes_lut(ignore_index)
        self._layout = _CITYSCAPES_LAYOUT
        self._files = {split: _read_cityscapes_split(self.data_dir, split) for split in ("train", "val")}


# ---------------------------------------------------------------------------------------------- ADE20K

#: The 150 ADE20K SceneParsing classes in label order 1..150 (``objectInfo150``, first name of each
#: entry, as in mmsegmentation), i.e. train index 0..149 after reduce-zero-label.
ADE20K_CLASSES: list[str] = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
]  # fmt: skip
#: ADE20K visualisation colours: the VOC bit-interleaved colour map of label ``k + 1`` for index ``k``
#: (distinct for all 150 classes; not the random palette of the MIT demo code).
ADE20K_PALETTE: list[tuple[int, int, int]] = voc_colormap(151)[1:]


def ade20k_lut(ignore_index: int = 255) -> np.ndarray:
    """Reduce-zero-label table: 0 (other / unlabelled) -> ``ignore_index``, ``k`` -> ``k - 1``."""
    lut = np.full(256, ignore_index, np.uint8)
    lut[1:151] = np.arange(150)
    return lut


_ADE20K_LAYOUT = """Expected the ADE20K SceneParsing layout (ADEChallengeData2016.zip, sceneparsing.csail.mit.edu):
    data_dir/                       (or data_dir = ADEChallengeData2016/ itself)
    └── ADEChallengeData2016/
        ├── images/
        │   ├── training/ADE_train_NNNNNNNN.jpg      (20210 images)
        │   └── validation/ADE_val_NNNNNNNN.jpg      (2000 images)
        └── annotations/
            ├── training/ADE_train_NNNNNNNN.png      0 = other (ignored), 1..150 = classes
            └── validation/ADE_val_NNNNNNNN.png"""


def _read_ade20k_split(root: Path, folder: str) -> tuple[list[Path], list[Path]]:
    image_dir, mask_dir = root / "images" / folder, root / "annotations" / folder
    for path in (image_dir, mask_dir):
        if not path.is_dir():
            raise _layout_error(
                _ADE20K_LAYOUT, f"ADE20K folder '{path.parent.name}/{folder}/' is missing.", path
            )
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise _layout_error(_ADE20K_LAYOUT, f"No '*.jpg' images in 'images/{folder}/'.", image_dir)
    masks = []
    for image in images:
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise _layout_error(_ADE20K_LAYOUT, f"No annotation for image '{image.name}'.", mask)
        masks.append(mask)
    return images, masks


class ADE20KDataModule(_MappedFileDataModule):
    """ADE20K SceneParsing (MIT ADEChallengeData2016, Zhou et al., 2017): 150 classes.

    Reads ``images/{training,validation}/*.jpg`` with ``annotations/{training,validation}/*.png``
    (20,210 / 2,000 images). Annotations hold 0 for "other" and 1..150 for :data:`ADE20K_CLASSES`;
    they are reduced (reduce-zero-label, as in mmsegmentation): 0 -> ``ignore_index``,
    ``k`` -> ``k - 1``. Test/predict use the validation split.

    Training samples get :func:`~datamodules.seg_transforms.seg_train_transform` when ``augment``;
    validation samples are only normalised (original, variable sizes: use ``batch_size=1`` for
    evaluation loaders or resize outside).

    Args:
        data_dir: the folder holding ``ADEChallengeData2016/``, or that folder itself.
        crop_size: ``(height, width)`` of the training crops.
        batch_size: samples per batch (per device).
        num_workers: DataLoader worker processes.
        augment: augment the training split (else normalise only, full images).
        ignore_index: mask value of "other" and padded pixels (150..255).
        scale_range: ``(min, max)`` random rescale factor of the training augmentation.
        mean: normalisation mean (pixels scaled to [0, 1]).
        std: normalisation standard deviation.

    Raises:
        FileNotFoundError: a folder, image or annotation is missing; the message shows the
            expected layout and the offending path.
        OSError: an image or mask cannot be decoded (when the sample is loaded).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        crop_size: tuple[int, int] = (512, 512),
        batch_size: int = 8,
        num_workers: int = 4,
        augment: bool = True,
        ignore_index: int = 255,
        scale_range: tuple[float, float] = (0.5, 2.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        if not self.data_dir.is_dir():
            raise _layout_error(
                _ADE20K_LAYOUT, "ADE20K data_dir does not exist or is not a folder.", self.data_dir
            )
        _check_ignore_index(ignore_index, len(ADE20K_CLASSES))
        _file_module_init(self, crop_size, augment, scale_range, ignore_index, mean, std)
        nested = self.data_dir / "ADEChallengeData2016"
        self.root = nested if nested.is_dir() else self.data_dir
        self.num_classes = len(ADE20K_CLASSES)
        self.classes = list(ADE20K_CLASSES)
        self.palette = list(ADE20K_PALETTE)
        self._lut = ade20k_lut(ignore_index)
        self._layout = _ADE20K_LAYOUT
        self._files = {
            "train": _read_ade20k_split(self.root, "training"),
            "val": _read_ade20k_split(self.root, "validation"),
        }


# ------------------------------------------------------------------------------------------ Pascal VOC

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
    raise _layout_error(
        _VOC_LAYOUT, "No 'JPEGImages/' folder under data_dir (tried VOCdevkit/VOC2012, VOC2012, .).", data_dir
    )


def _read_voc_split(root: Path, list_name: str, mask_folder: str) -> tuple[list[Path], list[Path]]:
    list_file = root / "ImageSets" / "Segmentation" / list_name
    if not list_file.is_file():
        raise _layout_error(_VOC_LAYOUT, f"VOC list file '{list_name}' is missing.", list_file)
    mask_dir = root / mask_folder
    if not mask_dir.is_dir():
        raise _layout_error(_VOC_LAYOUT, f"VOC folder '{mask_folder}/' is missing.", mask_dir)
    images, masks = [], []
    for line in list_file.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        name = os.path.splitext(parts[0].replace("\\", "/").rsplit("/", 1)[-1])[0]
        image, mask = root / "JPEGImages" / f"{name}.jpg", mask_dir / f"{name}.png"
        for path in (image, mask):
            if not path.is_file():
                raise _layout_error(
                    _VOC_LAYOUT, f"File for '{name}' listed in '{list_name}' is missing.", path
                )
        images.append(image)
        masks.append(mask)
    if not images:
        raise _layout_error(_VOC_LAYOUT, f"VOC list file '{list_name}' lists no samples.", list_file)
    return images, masks


class VOCSegmentationDataModule(_MappedFileDataModule):
    """Pascal VOC 2012 segmentation (Everingham et al.), optionally with the SBD augmented train set.

    Reads ``ImageSets/Segmentation/{train,val}.txt`` (1,464 / 1,449 images), ``JPEGImages/<name>.jpg``
    and ``SegmentationClass/<name>.png`` (palette PNGs whose indices are the labels: 0 background,
    1..20 :data:`VOC_CLASSES`, 255 the object borders and difficult regions, kept as
    ``ignore_index``). With ``use_sbd`` the training list is ``train_aug.txt`` (10,582 images of
    SBD, Hariharan et al. 2011, plus VOC train, without VOC val) with masks from
    ``SegmentationClassAug/``; validation always uses ``val.txt`` and ``SegmentationClass/``.
    Test/predict use val.

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

    Raises:
        FileNotFoundError: a folder, list file or listed file is missing; the message shows the
            expected layout and the offending path.
        OSError: an image or mask cannot be decoded (when the sample is loaded).
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
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        if not self.data_dir.is_dir():
            raise _layout_error(_VOC_LAYOUT, "VOC data_dir does not exist or is not a folder.", self.data_dir)
        _check_ignore_index(ignore_index, len(VOC_CLASSES))
        _file_module_init(self, crop_size, augment, scale_range, ignore_index, mean, std)
        self.use_sbd = use_sbd
        self.root = _voc_root(self.data_dir)
        self.num_classes = len(VOC_CLASSES)
        self.classes = list(VOC_CLASSES)
        self.palette = list(VOC_PALETTE)
        lut = np.full(256, ignore_index, np.uint8)
        lut[: self.num_classes] = np.arange(self.num_classes)
        self._lut = lut
        self._layout = _VOC_LAYOUT
        train = ("train_aug.txt", "SegmentationClassAug") if use_sbd else ("train.txt", "SegmentationClass")
        self._files = {
            "train": _read_voc_split(self.root, *train),
            "val": _read_voc_split(self.root, "val.txt", "SegmentationClass"),
        }
