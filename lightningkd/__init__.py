"""lightningkd: knowledge distillation for vision and dense prediction on PyTorch Lightning."""

from lightningkd.adapters import ConvAdapter, LinearAdapter
from lightningkd.distillers import AT, DIST, DKD, KD, ND, RKD, Distiller, FitNet
from lightningkd.modules import ClassificationDistillationModule, DistillationModule
from lightningkd.taps import FeatureTap, list_layers
from lightningkd.teacher import Renormalize

__version__ = "0.1.0"

__all__ = [
    "AT",
    "DIST",
    "DKD",
    "KD",
    "ND",
    "RKD",
    "FitNet",
    "ClassificationDistillationModule",
    "ConvAdapter",
    "DistillationModule",
    "Distiller",
    "FeatureTap",
    "LinearAdapter",
    "Renormalize",
    "list_layers",
]
