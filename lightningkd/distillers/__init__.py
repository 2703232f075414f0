"""Distillation losses (one file per method). Every public class takes explicit keyword arguments."""

from lightningkd.distillers.acam_kd import ACAMKD
from lightningkd.distillers.adapted import Adapted
from lightningkd.distillers.at import AT
from lightningkd.distillers.base import OUTPUT, Distiller, Features, sum_terms
from lightningkd.distillers.bpkd import BPKD
from lightningkd.distillers.cirkd import CIRKDMemory, CIRKDMiniBatch
from lightningkd.distillers.cwd import CWD, ChannelWiseDivergence
from lightningkd.distillers.dist import DIST
from lightningkd.distillers.dkd import DKD
from lightningkd.distillers.fgd import FGD
from lightningkd.distillers.fitnet import FitNet
from lightningkd.distillers.kd import KD
from lightningkd.distillers.maskd import MasKD
from lightningkd.distillers.mgd import MGD
from lightningkd.distillers.nd import ND
from lightningkd.distillers.ofa import OFA
from lightningkd.distillers.per_level import PerLevel
from lightningkd.distillers.pixel_kd import PixelKD
from lightningkd.distillers.pkd import PKD
from lightningkd.distillers.rkd import RKD
from lightningkd.distillers.scalekd import ScaleKD
from lightningkd.distillers.skd import SKD, PairwiseSimilarityKD
from lightningkd.distillers.transkd import TransKD

__all__ = [
    "ACAMKD",
    "Adapted",
    "AT",
    "BPKD",
    "CIRKDMemory",
    "CIRKDMiniBatch",
    "CWD",
    "SKD",
    "ChannelWiseDivergence",
    "PairwiseSimilarityKD",
    "PixelKD",
    "DIST",
    "DKD",
    "FGD",
    "MGD",
    "MasKD",
    "PKD",
    "PerLevel",
    "KD",
    "ND",
    "OFA",
    "RKD",
    "ScaleKD",
    "TransKD",
    "Distiller",
    "Features",
    "FitNet",
    "OUTPUT",
    "sum_terms",
]
