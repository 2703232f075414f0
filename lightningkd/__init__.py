"""lightningkd: knowledge distillation for vision and dense prediction on PyTorch Lightning."""

from lightningkd.adapters import ConvAdapter, LinearAdapter
from lightningkd.distillers import KD, Distiller
from lightningkd.modules import ClassificationDistillationModule, DistillationModule
from lightningkd.taps import FeatureTap, list_layers
from lightningkd.teacher import Renormalize

__version__ = "0.1.0"

__all__ = [
    "KD",
    "ClassificationDistillationModule",
    "ConvAdapter",
    "DistillationModule",
    "Distiller",
    "FeatureTap",
    "LinearAdapter",
    "Renormalize",
    "list_layers",
]
