"""Thin builders for torchvision / timm models and weight loading; no architectures of our own."""

from lightningkd.models.classification import classifier
from lightningkd.models.weights import extract_state_dict, load_weights

__all__ = ["classifier", "extract_state_dict", "load_weights"]
