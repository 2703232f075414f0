"""Thin builders for torchvision / timm models and weight loading; no architectures of our own."""

from lightningkd.models.classification import classifier
from lightningkd.models.mmcv_ops import MMCVOpsMissingError
from lightningkd.models.mmseg import MMSegSegmenter
from lightningkd.models.segmentation import TorchvisionSegmenter, load_backbone_weights
from lightningkd.models.weights import extract_state_dict, load_state_dict_checked, load_weights

__all__ = [
    "MMCVOpsMissingError",
    "MMSegSegmenter",
    "TorchvisionSegmenter",
    "classifier",
    "extract_state_dict",
    "load_backbone_weights",
    "load_state_dict_checked",
    "load_weights",
]
