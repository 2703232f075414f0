"""Distillation losses (one file per method). Every public class takes explicit keyword arguments."""

from lightningkd.distillers.at import AT
from lightningkd.distillers.base import Distiller, Features
from lightningkd.distillers.dist import DIST
from lightningkd.distillers.dkd import DKD
from lightningkd.distillers.fitnet import FitNet
from lightningkd.distillers.kd import KD
from lightningkd.distillers.nd import ND, class_centers, load_class_centers
from lightningkd.distillers.rkd import RKD

__all__ = [
    "AT",
    "DIST",
    "DKD",
    "KD",
    "ND",
    "RKD",
    "Distiller",
    "Features",
    "FitNet",
    "class_centers",
    "load_class_centers",
]
