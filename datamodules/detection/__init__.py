"""Object detection: a synthetic set, COCO (pycocotools) and Pascal VOC-style XML annotations.

Batches are ``(list of images, list of target dicts)`` in the torchvision detection format (``boxes``
xyxy ``float32``, ``labels`` ``int64``, 0 is background); :mod:`~datamodules.detection.coco_eval`
scores any of these datasets with pycocotools' COCOeval.
"""

from datamodules.detection.base import (
    BaseDetectionDataModule,
    DetectionDataset,
    DetectionRecord,
    collate_detection,
)
from datamodules.detection.coco import COCODetectionDataModule, load_coco_records
from datamodules.detection.coco_eval import to_coco_detections, to_coco_ground_truth
from datamodules.detection.synthetic import SyntheticDetectionDataModule
from datamodules.detection.transforms import ResizeMinMax, detection_eval_transform, detection_train_transform
from datamodules.detection.voc import VOCDetectionDataModule, load_voc_records

__all__ = [
    "BaseDetectionDataModule",
    "COCODetectionDataModule",
    "DetectionDataset",
    "DetectionRecord",
    "ResizeMinMax",
    "SyntheticDetectionDataModule",
    "VOCDetectionDataModule",
    "collate_detection",
    "detection_eval_transform",
    "detection_train_transform",
    "load_coco_records",
    "load_voc_records",
    "to_coco_detections",
    "to_coco_ground_truth",
]
