"""lightningkd: knowledge distillation for vision and dense prediction on PyTorch Lightning."""

from lightningkd.adapters import ConvAdapter, LinearAdapter
from lightningkd.distillers import (
    AT,
    BPKD,
    DIST,
    DKD,
    FGD,
    KD,
    MGD,
    ND,
    PKD,
    RKD,
    ChannelWiseDivergence,
    CIRKDMemory,
    CIRKDMiniBatch,
    Distiller,
    FitNet,
    PairwiseSimilarityKD,
    PerLevel,
    PixelKD,
)
from lightningkd.modules import (
    ClassificationDistillationModule,
    DetectionDistillationModule,
    DistillationModule,
    SegmentationDistillationModule,
)
from lightningkd.taps import FeatureTap, list_layers
from lightningkd.teacher import Renormalize

__version__ = "0.1.0"

__all__ = [
    "AT",
    "BPKD",
    "CIRKDMemory",
    "CIRKDMiniBatch",
    "ChannelWiseDivergence",
    "DetectionDistillationModule",
    "FGD",
    "MGD",
    "PKD",
    "PerLevel",
    "PairwiseSimilarityKD",
    "PixelKD",
    "SegmentationDistillationModule",
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
