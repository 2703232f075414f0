"""Distillation losses (one file per method). Every public class takes explicit keyword arguments."""

from lightningkd.distillers.base import Distiller, Features
from lightningkd.distillers.kd import KD

__all__ = ["KD", "Distiller", "Features"]
