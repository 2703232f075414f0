"""ADE20K SceneParsing (MIT ADEChallengeData2016, Zhou et al., 2017): 150 classes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamodules.classification.transforms import IMAGENET_MEAN, IMAGENET_STD
from datamodules.segmentation.base import FileSegmentationDataModule, check_ignore_index, layout_error
from datamodules.segmentation.voc import voc_colormap

__all__ = ["ADE20K_CLASSES", "ADE20K_PALETTE", "ADE20KDataModule", "ade20k_lut"]

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
            raise layout_error(
                _ADE20K_LAYOUT, f"ADE20K folder '{path.parent.name}/{folder}/' is missing.", path
            )
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise layout_error(_ADE20K_LAYOUT, f"No '*.jpg' images in 'images/{folder}/'.", image_dir)
    masks = []
    for image in images:
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise layout_error(_ADE20K_LAYOUT, f"No annotation for image '{image.name}'.", mask)
        masks.append(mask)
    return images, masks


class ADE20KDataModule(FileSegmentationDataModule):
    """ADE20K SceneParsing (MIT ADEChallengeData2016, Zhou et al., 2017): 150 classes.

    Reads ``images/{training,validation}/*.jpg`` with ``annotations/{training,validation}/*.png``
    (20,210 / 2,000 images). Annotations hold 0 for "other" and 1..150 for :data:`ADE20K_CLASSES`;
    they are reduced (reduce-zero-label, as in mmsegmentation): 0 -> ``ignore_index``,
    ``k`` -> ``k - 1``. Test/predict use the validation split. An annotation value above 150 raises a
    ``ValueError`` naming the file.

    Training samples get :func:`~datamodules.segmentation.transforms.seg_train_transform` when ``augment``;
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
        skip_corrupt: skip unreadable images / masks (dropped from their batch, listed at the end of
            the stage) instead of stopping with an error naming them.

    Raises:
        FileNotFoundError: a folder, image or annotation is missing; the message shows the
            expected layout and the offending path.
        OSError: an image or mask cannot be decoded (when the sample is loaded; unless ``skip_corrupt``).
        ValueError: a mask holds a raw value outside the set's encoding (when the sample is loaded).
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
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, skip_corrupt=skip_corrupt)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        if not self.data_dir.is_dir():
            raise layout_error(
                _ADE20K_LAYOUT, "ADE20K data_dir does not exist or is not a folder.", self.data_dir
            )
        check_ignore_index(ignore_index, len(ADE20K_CLASSES))
        self._set_options(crop_size, augment, scale_range, ignore_index, mean, std)
        nested = self.data_dir / "ADEChallengeData2016"
        self.root = nested if nested.is_dir() else self.data_dir
        self.num_classes = len(ADE20K_CLASSES)
        self.classes = list(ADE20K_CLASSES)
        self.palette = list(ADE20K_PALETTE)
        self._lut = ade20k_lut(ignore_index)
        self._raw_values = range(151)  # 0 = other, 1..150 = classes
        self._layout = _ADE20K_LAYOUT
        self._files = {
            "train": _read_ade20k_split(self.root, "training"),
            "val": _read_ade20k_split(self.root, "validation"),
        }
