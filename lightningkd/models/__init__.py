"""Thin builders for torchvision / timm models and weight loading; no architectures of our own."""

from lightningkd.models.classification import classifier
from lightningkd.models.detection import detector, detector_names, fpn_levels
from lightningkd.models.mmcv_ops import MMCVOpsMissingError
from lightningkd.models.mmseg import MMSegSegmenter
from lightningkd.models.segmentation import TorchvisionSegmenter, load_backbone_weights
from lightningkd.models.weights import extract_state_dict, load_state_dict_checked, load_weights

__all__ = [
    "MMCVOpsMissingError",
    "MMSegSegmenter",
    "TorchvisionSegmenter",
    "classifier",
    "detector",
    "detector_names",
    "extract_state_dict",
    "fpn_levels",
    "load_backbone_weights",
    "load_state_dict_checked",
    "load_weights",
]
