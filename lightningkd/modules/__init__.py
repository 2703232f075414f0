"""LightningModules that wrap a teacher/student pair."""

from lightningkd.modules.base import DistillationModule
from lightningkd.modules.classification import ClassificationDistillationModule
from lightningkd.modules.detection import DetectionDistillationModule
from lightningkd.modules.mask_tokens import DetectionMaskTokens, SegmentationMaskTokens
from lightningkd.modules.segmentation import SegmentationDistillationModule, segmentation_scores

__all__ = [
    "ClassificationDistillationModule",
    "DetectionDistillationModule",
    "DetectionMaskTokens",
    "DistillationModule",
    "SegmentationDistillationModule",
    "SegmentationMaskTokens",
    "segmentation_scores",
]
