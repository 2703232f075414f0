"""Shared pieces of the object-detection datamodules: records, the dataset, batching, the base module.

Samples and batches follow torchvision's detection convention. A sample is ``(image, target)``:
``image`` a ``float32`` ``(3, H, W)`` tensor normalised with the module's ``mean``/``std``, ``target`` a
dict with ``boxes`` (``float32`` ``(K, 4)``, ``x1, y1, x2, y2`` in absolute pixels of the transformed
image), ``labels`` (``int64`` ``(K,)``, foreground classes ``1..num_classes``; 0 is background, as
torchvision detectors expect), ``image_id`` (``int``), ``orig_size`` and ``size`` (``int64`` ``(2,)``,
``(H, W)`` before and after the transform). :func:`collate_detection` keeps variable image sizes: a
batch is ``(list of images, list of targets)``.

Labels are checked where the annotations are read: a COCO ``category_id`` or a VOC class name outside
the class list raises a ``ValueError`` naming the annotation file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.base import BaseDataModule
from datamodules.classification.transforms import IMAGENET_MEAN, IMAGENET_STD
from datamodules.corrupt import CorruptFileError, CorruptFileLog, drop_skipped, skip_or_raise
from datamodules.datasets import _seed_from_torch, read_image

__all__ = ["BaseDetectionDataModule", "DetectionDataset", "DetectionRecord", "Target", "collate_detection"]

Target = dict[str, Any]


@dataclass
class DetectionRecord:
    """Annotations of one image in original pixel coordinates (``x1, y1, x2, y2``, 0-based, exclusive).

    ``ignore_boxes``/``ignore_labels`` hold COCO crowd regions and VOC ``difficult`` objects: they are
    not training targets but are kept for evaluation (as ``iscrowd=1``). ``areas`` optionally overrides
    the box areas in the COCO ground truth (COCO's segmentation areas). ``image`` holds the pixels of
    in-memory (synthetic) sets, whose ``file`` is ``None``.
    """

    image_id: int
    file: Path | None
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    ignore_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    areas: np.ndarray | None = None
    image: np.ndarray | None = None


def as_boxes(boxes: Any) -> np.ndarray:
    """Any box container as a ``float32`` ``(K, 4)`` array (``K = 0`` for an empty one).

    Example:
        >>> as_boxes([]).shape
        (0, 4)
    """
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def clip_and_filter(
    boxes: np.ndarray, height: int, width: int, *others: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray], int]:
    """Clip boxes to the image; drop those with zero width or height. Returns (boxes, others, dropped).

    Example:
        >>> boxes = np.array([[-2, 0, 5, 5], [3, 3, 3, 9]])  # the second has zero width
        >>> boxes, (labels,), dropped = clip_and_filter(boxes, 4, 4, np.array([1, 2]))
        >>> boxes.tolist(), labels.tolist(), dropped
        ([[0.0, 0.0, 4.0, 4.0]], [1], 1)
    """
    boxes = as_boxes(boxes).copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], [np.asarray(o)[keep] for o in others], int((~keep).sum())


def collate_detection(
    batch: Sequence[tuple[Tensor, Target] | None],
) -> tuple[list[Tensor], list[Target]] | None:
    """Batch ``(image, target)`` samples as ``(list of images, list of targets)`` (sizes may differ).

    Skipped samples (``None``, see ``skip_corrupt``) are left out; ``None`` if every sample of a
    non-empty batch was skipped.

    Example:
        >>> images, targets = collate_detection([(torch.zeros(3, 4, 5), {"image_id": 0})] * 2 + [None])
        >>> len(images), targets[1]["image_id"]
        (2, 0)
    """
    if not batch:
        return [], []
    batch = drop_skipped(batch)
    if not batch:
        return None
    images, targets = zip(*batch)
    return list(images), list(targets)


class DetectionDataset(Dataset):
    """Map-style detection dataset over :class:`DetectionRecord` s, passed through an albumentations pipeline.

    Args:
        records: one record per image.
        classes: foreground class names; label ``i`` (1-based) is ``classes[i - 1]``.
        transform: albumentations ``Compose`` with ``bbox_params`` in ``pascal_voc`` format and
            ``label_fields=["labels"]`` (see
            :func:`~datamodules.detection.transforms.detection_train_transform`); it must return a
            tensor image (end with ``ToTensorV2``). ``None``: image only converted to ``[0, 1]``.
        layout: expected on-disk layout, quoted when an image cannot be read.
        skip_log: where unreadable image files are recorded; the sample is then ``None`` (dropped by
            :func:`collate_detection`). ``None`` (default): an unreadable file raises
            :class:`~datamodules.corrupt.CorruptFileError`.
    """

    def __init__(
        self,
        records: Sequence[DetectionRecord],
        classes: Sequence[str],
        transform: Callable[..., dict[str, Any]] | None = None,
        layout: str = "",
        skip_log: CorruptFileLog | None = None,
    ) -> None:
        self.records = list(records)
        self.classes = list(classes)
        self.transform = transform
        self.layout = layout
        self.skip_log = skip_log
        _seed_from_torch(transform)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> np.ndarray:
        """The RGB ``uint8`` ``(H, W, 3)`` image of ``index`` (before the transform)."""
        record = self.records[index]
        if record.image is not None:
            return record.image
        try:
            return read_image(record.file)
        except CorruptFileError as err:
            raise CorruptFileError(f"{err}\n{self.layout}", err.path) from err

    def __getitem__(self, index: int) -> tuple[Tensor, Target] | None:
        record = self.records[index]
        try:
            image = self.load_image(index)
        except CorruptFileError as err:
            return skip_or_raise(err, self.skip_log)
        height, width = image.shape[:2]
        boxes, (labels,), _ = clip_and_filter(record.boxes, height, width, record.labels)
        if self.transform is None:
            tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
        else:
            out = self.transform(image=image, bboxes=boxes, labels=labels)
            tensor = out["image"]
            boxes = as_boxes(out["bboxes"])
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
            boxes, (labels,), _ = clip_and_filter(boxes, tensor.shape[-2], tensor.shape[-1], labels)
        target = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
            "image_id": int(record.image_id),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor(list(tensor.shape[-2:]), dtype=torch.int64),
        }
        return tensor, target


class BaseDetectionDataModule(BaseDataModule):
    """Splits and loaders shared by the detection datamodules.

    Attributes set by subclasses: ``classes`` (foreground names; label ``i`` is ``classes[i - 1]``),
    ``num_classes`` (foreground classes; pass ``num_classes + 1`` to torchvision detectors, which count
    background), ``mean``/``std``. Batches: ``(list of images, list of targets)``, see
    :func:`collate_detection`. The train loader shuffles and drops the last incomplete batch.
    """

    classes: list[str]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    collate_fn = staticmethod(collate_detection)

    @property
    def num_classes(self) -> int:
        """Number of foreground classes (labels ``1..num_classes``; 0 is background)."""
        return len(self.classes)
