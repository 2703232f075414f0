"""COCO-style evaluation of any detection dataset: ground truth and detections for pycocotools' COCOeval.

:func:`to_coco_ground_truth` turns a :class:`~datamodules.detection.base.DetectionDataset` into a
pycocotools ``COCO`` object in original-image coordinates (COCO crowd boxes and VOC ``difficult`` boxes
kept as ignore regions, ``iscrowd=1``), and :func:`to_coco_detections` maps predictions back to those
coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from datamodules.detection.base import DetectionDataset, Target, as_boxes
from datamodules.detection.coco import _quiet

__all__ = ["to_coco_detections", "to_coco_ground_truth"]


def _unwrap(dataset: Dataset) -> tuple[DetectionDataset, list[int]]:
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        sub = list(dataset.indices)
        indices = sub if indices is None else [sub[i] for i in indices]
        dataset = dataset.dataset
    if not isinstance(dataset, DetectionDataset):
        raise TypeError(f"Expected a DetectionDataset (or a Subset of one), got {type(dataset).__name__}.")
    return dataset, indices if indices is not None else list(range(len(dataset)))


def to_coco_ground_truth(dataset: Dataset) -> Any:
    """The annotations of a detection dataset as a pycocotools ``COCO`` object, for ``COCOeval``.

    Boxes are in original image coordinates; ``category_id`` is the contiguous label (1..C), so
    predictions of a torchvision-style detector can be scored without remapping (use
    :func:`to_coco_detections`). Ignore regions (COCO crowd, VOC difficult) are written with
    ``iscrowd=1``, which COCOeval does not count as misses.
    """
    from pycocotools.coco import COCO

    base, indices = _unwrap(dataset)
    images, annotations = [], []
    for index in indices:
        record = base.records[index]
        images.append({"id": int(record.image_id), "height": record.height, "width": record.width})
        groups = (
            (record.boxes, record.labels, record.areas, 0),
            (record.ignore_boxes, record.ignore_labels, None, 1),
        )
        for boxes, labels, areas, crowd in groups:
            for k, (box, label) in enumerate(zip(as_boxes(boxes), labels)):
                x1, y1, x2, y2 = (float(v) for v in box)
                area = (
                    float(areas[k])
                    if areas is not None and len(areas) == len(boxes)
                    else (x2 - x1) * (y2 - y1)
                )
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": int(record.image_id),
                        "category_id": int(label),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": area,
                        "iscrowd": crowd,
                    }
                )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(base.classes)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with _quiet():
        coco.createIndex()
    return coco


def to_coco_detections(predictions: Sequence[Target], targets: Sequence[Target]) -> list[dict[str, Any]]:
    """COCO result entries from torchvision-style predictions (``boxes``, ``labels``, ``scores``).

    Boxes are mapped from the transformed frame (``target["size"]``) back to the original image
    (``target["orig_size"]``), matching :func:`to_coco_ground_truth`. Missing ``scores`` count as 1.
    """
    results = []
    for pred, target in zip(predictions, targets, strict=True):
        boxes = torch.as_tensor(pred["boxes"], dtype=torch.float64).detach().cpu().reshape(-1, 4).clone()
        if "size" in target and "orig_size" in target:
            (h, w), (oh, ow) = (torch.as_tensor(target[k]).tolist() for k in ("size", "orig_size"))
            boxes[:, 0::2] *= ow / w
            boxes[:, 1::2] *= oh / h
        labels = torch.as_tensor(pred["labels"]).reshape(-1).tolist()
        scores = pred.get("scores")
        scores = [1.0] * len(labels) if scores is None else torch.as_tensor(scores).reshape(-1).tolist()
        for (x1, y1, x2, y2), label, score in zip(boxes.tolist(), labels, scores):
            results.append(
                {
                    "image_id": int(target["image_id"]),
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return results
