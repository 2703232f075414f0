"""Pascal VOC-style detection: ``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/<split>.txt``."""

from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.base import Split
from datamodules.corrupt import CorruptFileError, CorruptFileLog, skip_or_raise
from datamodules.datasets import read_image
from datamodules.detection.base import (
    BaseDetectionDataModule,
    DetectionDataset,
    DetectionRecord,
    as_boxes,
    clip_and_filter,
)
from datamodules.detection.transforms import detection_eval_transform, detection_train_transform

__all__ = ["VOC_LAYOUT", "VOCDetectionDataModule", "load_voc_records"]

VOC_LAYOUT = (
    "Expected the Pascal VOC layout (data_dir is the folder holding JPEGImages, e.g. VOCdevkit/VOC2012/):\n"
    "      data_dir/\n"
    "      ├── JPEGImages/<id>.jpg\n"
    "      ├── Annotations/<id>.xml\n"
    "      └── ImageSets/Main/<split>.txt   (one <id> per line; e.g. train.txt, val.txt, trainval.txt)\n"
)


def _voc_error(problem: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}\nOffending path: '{path}' (absolute: '{path.absolute()}').\n{VOC_LAYOUT}"
    )


def _xml_text(node: ET.Element, tag: str, file: Path) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise ValueError(f"VOC annotation '{file}': missing <{tag}>.")
    return child.text.strip()


def load_voc_records(
    data_dir: str | Path,
    split: str,
    classes: Sequence[str],
    use_difficult: bool = False,
    skip_log: CorruptFileLog | None = None,
) -> tuple[list[DetectionRecord], int]:
    """Read the images listed in ``ImageSets/Main/<split>.txt`` and their ``Annotations/<id>.xml``.

    VOC's 1-based inclusive pixel boxes become 0-based ``x1, y1, x2, y2`` (``xmin - 1, ymin - 1, xmax,
    ymax``), clipped to the image. ``difficult`` objects become ignore regions unless ``use_difficult``.
    Image ids are the positions in the split list. An XML without a size is completed from its image;
    if that image is unreadable the record is left out when ``skip_log`` is given (and recorded there).

    Returns:
        ``(records, number of dropped zero-area boxes)``.

    Raises:
        ValueError: an XML file cannot be parsed, lacks a field, or names a class outside ``classes``
            (the message names the file).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise _voc_error("VOC data_dir does not exist or is not a folder.", root)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        if not (root / sub).is_dir():
            raise _voc_error(f"VOC folder '{sub}' is missing.", root / sub)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise _voc_error(
            f"VOC split list for split {split!r} not found (available: {available}).", split_file
        )
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    label_of = {name: i + 1 for i, name in enumerate(classes)}
    records, dropped = [], 0
    for index, name in enumerate(ids):
        xml_file = root / "Annotations" / f"{name}.xml"
        if not xml_file.is_file():
            raise _voc_error(
                f"Annotation file of image {name!r} (listed in {split_file.name}) not found.", xml_file
            )
        try:
            tree = ET.parse(xml_file).getroot()
        except ET.ParseError as err:
            raise ValueError(f"Cannot parse VOC annotation '{xml_file}': {err}") from err
        size = tree.find("size")
        height = int(float(_xml_text(size, "height", xml_file))) if size is not None else 0
        width = int(float(_xml_text(size, "width", xml_file))) if size is not None else 0
        image_file = root / "JPEGImages" / f"{name}.jpg"
        if height <= 0 or width <= 0:  # some VOC-style exports write 0 x 0: read the image instead
            try:
                height, width = read_image(image_file).shape[:2]
            except CorruptFileError as err:
                skip_or_raise(err, skip_log)
                continue
        boxes, labels, ign_boxes, ign_labels = [], [], [], []
        for obj in tree.findall("object"):
            cls = _xml_text(obj, "name", xml_file)
            if cls not in label_of:
                raise ValueError(
                    f"VOC annotation '{xml_file}' has an object of class {cls!r}, which is not in "
                    f"classes={list(classes)}: add it to classes (labels follow their order) or fix the file."
                )
            bnd = obj.find("bndbox")
            if bnd is None:
                raise ValueError(f"VOC annotation '{xml_file}': an object of class {cls!r} lacks <bndbox>.")
            x1, y1, x2, y2 = (float(_xml_text(bnd, k, xml_file)) for k in ("xmin", "ymin", "xmax", "ymax"))
            box = [x1 - 1, y1 - 1, x2, y2]
            difficult_node = obj.find("difficult")
            difficult = difficult_node is not None and (difficult_node.text or "0").strip() not in ("0", "")
            if difficult and not use_difficult:
                ign_boxes.append(box)
                ign_labels.append(label_of[cls])
            else:
                boxes.append(box)
                labels.append(label_of[cls])
        boxes_np, (labels_np,), n_drop = clip_and_filter(
            as_boxes(boxes), height, width, np.asarray(labels, np.int64)
        )
        dropped += n_drop
        ign_np, (ign_lab_np,), _ = clip_and_filter(
            as_boxes(ign_boxes), height, width, np.asarray(ign_labels, np.int64)
        )
        records.append(
            DetectionRecord(
                image_id=index,
                file=image_file,
                height=height,
                width=width,
                boxes=boxes_np,
                labels=labels_np.astype(np.int64),
                ignore_boxes=ign_np,
                ignore_labels=ign_lab_np.astype(np.int64),
            )
        )
    return records, dropped


class VOCDetectionDataModule(BaseDetectionDataModule):
    """Pascal VOC-style detection (``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/*.txt``).

    Args:
        data_dir: folder holding ``JPEGImages`` (e.g. ``VOCdevkit/VOC2012``).
        classes: foreground class names in label order (label ``i`` is ``classes[i - 1]``); an XML object
            of another class is an error.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        train_split: name of the training split list in ``ImageSets/Main``.
        val_split: name of the validation split list in ``ImageSets/Main``.
        test_split: split served by the test loader (``None``: ``val_split``).
        augment: random scale jitter and horizontal flip on the train split.
        use_difficult: train on ``difficult`` objects (otherwise they are only ignore regions).
        min_size: as in :class:`~datamodules.detection.coco.COCODetectionDataModule` (default: no resize).
        max_size: as in :class:`~datamodules.detection.coco.COCODetectionDataModule` (default: no resize).
        scale_range: as in :class:`~datamodules.detection.coco.COCODetectionDataModule`.
        skip_corrupt: skip unreadable images (dropped from their batch, listed at the end of the stage)
            instead of stopping with an error naming them.
    """

    def __init__(
        self,
        data_dir: str | Path,
        classes: Sequence[str],
        batch_size: int = 2,
        num_workers: int = 4,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        augment: bool = True,
        use_difficult: bool = False,
        min_size: int | None = None,
        max_size: int | None = None,
        scale_range: tuple[float, float] = (0.75, 1.25),
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, skip_corrupt)
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be a non-empty list of distinct names, got {list(classes)}.")
        self.data_dir = Path(data_dir)
        self.classes = list(classes)
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.augment, self.use_difficult = augment, use_difficult
        self.min_size, self.max_size, self.scale_range = min_size, max_size, scale_range
        if not self.data_dir.is_dir():
            raise _voc_error("VOC data_dir does not exist or is not a folder.", self.data_dir)

    def _build(self, split: Split) -> DetectionDataset:
        records, dropped = load_voc_records(
            self.data_dir, self.splits[split], self.classes, self.use_difficult, self.skip_log
        )
        if dropped:
            warnings.warn(
                f"VOC {self.splits[split]}: dropped {dropped} boxes with zero width or height.", stacklevel=2
            )
        if split == "train" and self.augment:
            transform = detection_train_transform(self.min_size, self.max_size, self.scale_range)
        else:
            transform = detection_eval_transform(self.min_size, self.max_size)
        return DetectionDataset(records, self.classes, transform, VOC_LAYOUT, skip_log=self.skip_log)
