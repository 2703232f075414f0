"""Cityscapes fine annotations (Cordts et al., 2016): 2048x1024 street scenes, 19 classes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamodules.classification.transforms import IMAGENET_MEAN, IMAGENET_STD
from datamodules.segmentation.base import FileSegmentationDataModule, check_ignore_index, layout_error

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_ID_TO_TRAINID",
    "CITYSCAPES_PALETTE",
    "CityscapesDataModule",
    "cityscapes_lut",
]

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
            raise layout_error(
                _CITYSCAPES_LAYOUT, f"Cityscapes folder '{folder.parent.name}/{split}/' is missing.", folder
            )
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise layout_error(
            _CITYSCAPES_LAYOUT, f"No '<city>/*_leftImg8bit.png' images for split '{split}'.", image_dir
        )
    masks = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        mask = mask_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
        if not mask.is_file():
            raise layout_error(_CITYSCAPES_LAYOUT, f"No labelIds mask for image '{image.name}'.", mask)
        masks.append(mask)
    return images, masks


class CityscapesDataModule(FileSegmentationDataModule):
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
    (its ``gtFine/test`` masks carry no real labels), so test/predict use val. A mask value that is
    not one of the 34 label ids (e.g. a train-id or colour mask read by mistake) raises a ``ValueError``
    naming the file.

    Training samples get :func:`~datamodules.segmentation.transforms.seg_train_transform` (random scale,
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
        skip_corrupt: skip unreadable images / masks (dropped from their batch, listed at the end of
            the stage) instead of stopping with an error naming them.

    Raises:
        FileNotFoundError: a folder, image or mask is missing; the message shows the expected
            layout and the offending path.
        OSError: an image or mask cannot be decoded (when the sample is loaded; unless ``skip_corrupt``).
        ValueError: a mask holds a raw value outside the set's encoding (when the sample is loaded).

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
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, skip_corrupt=skip_corrupt)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        if not self.data_dir.is_dir():
            raise layout_error(
                _CITYSCAPES_LAYOUT, "Cityscapes data_dir does not exist or is not a folder.", self.data_dir
            )
        check_ignore_index(ignore_index, len(CITYSCAPES_CLASSES))
        self._set_options(crop_size, augment, scale_range, ignore_index, mean, std)
        self.num_classes = len(CITYSCAPES_CLASSES)
        self.classes = list(CITYSCAPES_CLASSES)
        self.palette = list(CITYSCAPES_PALETTE)
        self._lut = cityscapes_lut(ignore_index)
        self._raw_values = range(
            34
        )  # the labelIds 0..33 of cityscapesScripts (license plate, -1, is not drawn)
        self._layout = _CITYSCAPES_LAYOUT
        self._files = {split: _read_cityscapes_split(self.data_dir, split) for split in ("train", "val")}
