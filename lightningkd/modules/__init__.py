"""LightningModules that wrap a teacher/student pair."""

from lightningkd.modules.base import DistillationModule
from lightningkd.modules.classification import ClassificationDistillationModule

__all__ = ["ClassificationDistillationModule", "DistillationModule"]
