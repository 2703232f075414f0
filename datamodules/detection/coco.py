"""COCO detection (2017 layout, ``instances_*.json`` read with pycocotools)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np

from datamodules.base import Split
from datamodules.detection.base import (
    BaseDetectionDataModule,
    DetectionDataset,
    DetectionRecord,
    as_boxes,
    clip_and_filter,
)
from datamodules.detection.transforms import detection_eval_transform, detection_train_transform

__all__ = ["COCO_LAYOUT", "COCODetectionDataModule", "load_coco_records"]

COCO_LAYOUT = (
    "Expected the COCO {year} layout:\n"
    "      data_dir/\n"
    "      ├── train{year}/*.jpg\n"
    "      ├── val{year}/*.jpg\n"
    "      └── annotations/\n"
    "          ├── instances_train{year}.json\n"
    "          └── instances_val{year}.json\n"
)


def _quiet() -> contextlib.AbstractContextManager:
    return contextlib.redirect_stdout(io.StringIO())  # pycocotools prints progress lines


def _coco_layout_error(problem: str, path: Path, year: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}\nOffending path: '{path}' (absolute: '{path.absolute()}').\n{COCO_LAYOUT.format(year=year)}"
    )


def load_coco_records(
    annotation_file: str | Path,
    image_dir: str | Path,
    cat_id_to_label: dict[int, int] | None = None,
    keep_empty: bool = True,
) -> tuple[list[DetectionRecord], dict[int, int], list[str], int]:
    """Read a COCO ``instances_*.json`` with pycocotools.

    Boxes are converted from ``x, y, w, h`` to ``x1, y1, x2, y2`` and clipped to the image; boxes of zero
    width or height are dropped (counted); crowd annotations become ignore regions. Category ids map to
    contiguous labels ``1..C`` in increasing id order unless ``cat_id_to_label`` is given (its labels
    must be ``1..C``).

    Returns:
        ``(records, cat_id_to_label, class names, number of dropped zero-area boxes)``.

    Raises:
        ValueError: the file cannot be parsed, or an annotation's ``category_id`` is not in the class map
            (the message names the file, the annotation and the known ids).
    """
    from pycocotools.coco import COCO

    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    try:
        with _quiet():
            coco = COCO(str(annotation_file))
    except Exception as err:  # noqa: BLE001 - json or key errors from a malformed file
        raise ValueError(f"Cannot read COCO annotation file '{annotation_file}': {err!r}") from err
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    if cat_id_to_label is None:
        cat_id_to_label = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
    if sorted(cat_id_to_label.values()) != list(range(1, len(cat_id_to_label) + 1)):
        raise ValueError(
            f"cat_id_to_label must map the category ids to the labels 1..{len(cat_id_to_label)} (one each; "
            f"0 is background), got {cat_id_to_label}."
        )
    names_by_id = {int(c["id"]): str(c["name"]) for c in cats}
    classes = [
        names_by_id.get(cid, str(cid)) for cid, _ in sorted(cat_id_to_label.items(), key=lambda kv: kv[1])
    ]
    records, dropped = [], 0
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        height, width = int(info["height"]), int(info["width"])
        boxes, labels, areas, ign_boxes, ign_labels = [], [], [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            cid = int(ann["category_id"])
            if cid not in cat_id_to_label:
                raise ValueError(
                    f"{annotation_file}: annotation {ann.get('id')} of image {image_id} has category_id {cid}, "
                    f"not among the categories {sorted(cat_id_to_label)}."
                )
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = [x, y, x + w, y + h]
            if ann.get("iscrowd", 0):
                ign_boxes.append(box)
                ign_labels.append(cat_id_to_label[cid])
            else:
                boxes.append(box)
                labels.append(cat_id_to_label[cid])
                areas.append(float(ann.get("area", w * h)))
        boxes_np, (labels_np, areas_np), n_drop = clip_and_filter(
            as_boxes(boxes), height, width, np.asarray(labels, np.int64), np.asarray(areas, np.float32)
        )
        dropped += n_drop
        ign_np, (ign_lab_np,), _ = clip_and_filter(
            as_boxes(ign_boxes), height, width, np.asarray(ign_labels, np.int64)
        )
        if not keep_empty and len(boxes_np) == 0:
            continue
        records.append(
            DetectionRecord(
                image_id=int(image_id),
                file=image_dir / info["file_name"],
                height=height,
                width=width,
                boxes=boxes_np,
                labels=labels_np.astype(np.int64),
                ignore_boxes=ign_np,
                ignore_labels=ign_lab_np.astype(np.int64),
                areas=areas_np.astype(np.float32),
            )
        )
    return records, cat_id_to_label, classes, dropped


class COCODetectionDataModule(BaseDetectionDataModule):
    """COCO detection (2017 layout) through pycocotools.

    The 80 COCO categories (non-contiguous ids 1..90) map to contiguous labels 1..80 in id order
    (``cat_id_to_label`` and ``label_to_cat_id``); crowd annotations are left out of the targets (kept
    as ignore regions for :func:`~datamodules.detection.coco_eval.to_coco_ground_truth`); zero-area
    boxes are dropped with a warning. A ``category_id`` of the val file that the train file does not
    define raises a ``ValueError`` naming the file. ``test`` serves ``val{year}`` (test-dev has no
    public annotations).

    Args:
        data_dir: folder with ``train{year}/``, ``val{year}/`` and ``annotations/``.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        augment: random scale jitter and horizontal flip on the train split.
        keep_empty: keep images without (non-crowd) boxes.
        min_size: resize so the shorter side is ``min_size`` unless the longer would exceed
            ``max_size`` (torchvision detector default 800); ``None`` disables this bound.
        max_size: bound on the longer side after resizing (torchvision detector default 1333); ``None``
            disables it.
        scale_range: train scale jitter around that size.
        year: ``"2017"`` (or ``"2014"``).
        skip_corrupt: skip unreadable images (dropped from their batch, listed at the end of the stage)
            instead of stopping with an error naming them.
    """

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 2,
        num_workers: int = 4,
        augment: bool = True,
        keep_empty: bool = True,
        min_size: int | None = 800,
        max_size: int | None = 1333,
        scale_range: tuple[float, float] = (0.75, 1.25),
        year: str = "2017",
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, skip_corrupt)
        self.data_dir = Path(data_dir)
        self.augment, self.keep_empty = augment, keep_empty
        self.min_size, self.max_size, self.scale_range, self.year = min_size, max_size, scale_range, year
        if not self.data_dir.is_dir():
            raise _coco_layout_error("COCO data_dir does not exist or is not a folder.", self.data_dir, year)
        # the class map comes from the train annotation file (the same categories in every split); the
        # train records are kept so that the (large) train JSON is read once
        self._train_records = load_coco_records(
            self._annotation_file("train"), self._image_dir("train"), keep_empty=keep_empty
        )
        _, self.cat_id_to_label, self.classes, _ = self._train_records
        self.label_to_cat_id = {label: cid for cid, label in self.cat_id_to_label.items()}

    def _annotation_file(self, split: str) -> Path:
        name = "train" if split == "train" else "val"
        path = self.data_dir / "annotations" / f"instances_{name}{self.year}.json"
        if not path.is_file():
            raise _coco_layout_error(f"COCO annotation file for split {split!r} not found.", path, self.year)
        return path

    def _image_dir(self, split: str) -> Path:
        name = "train" if split == "train" else "val"
        path = self.data_dir / f"{name}{self.year}"
        if not path.is_dir():
            raise _coco_layout_error(f"COCO image folder for split {split!r} not found.", path, self.year)
        return path

    def _build(self, split: Split) -> DetectionDataset:
        if split == "train" and self._train_records is not None:
            records, _, _, dropped = self._train_records
            self._train_records = None
        else:
            records, _, _, dropped = load_coco_records(
                self._annotation_file(split), self._image_dir(split), self.cat_id_to_label, self.keep_empty
            )
        if dropped:
            warnings.warn(f"COCO {split}: dropped {dropped} boxes with zero width or height.", stacklevel=2)
        if split == "train" and self.augment:
            transform = detection_train_transform(self.min_size, self.max_size, self.scale_range)
        else:
            transform = detection_eval_transform(self.min_size, self.max_size)
        layout = COCO_LAYOUT.format(year=self.year)
        return DetectionDataset(records, self.classes, transform, layout, skip_log=self.skip_log)
