"""Linear warm-up of the distillation weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L

from lightningkd.modules.base import DistillationModule


class KDWeightWarmup(L.Callback):
    """Ramp the distillation terms linearly from ``1/epochs`` (or ``1/steps``) to 1.

    Sets ``distiller.scale = min(1, (epoch + 1) / epochs)`` before every training batch (with ``steps``:
    ``min(1, (global_step + 1) / steps)``), so the factor is recomputed on resume and needs no state. The
    +1 follows the 1-based epoch counter of mdistiller, whose DKD multiplies its loss by
    ``min(epoch / warmup, 1)`` (DKD: 20 epochs on CIFAR-100, 1 on ImageNet; KD++ ramps its KD term over 5).

    Args:
        epochs: warm-up length in epochs (0: use ``steps``).
        steps: warm-up length in optimizer steps (used when ``epochs`` is 0).
        distillers: names of the distillers to warm up (``distiller.name``); ``None``: all of them.

    Example:
        >>> KDWeightWarmup(epochs=20).factor(epoch=0, step=0)
        0.05
    """

    def __init__(self, epochs: int = 0, steps: int = 0, distillers: Sequence[str] | None = None) -> None:
        if epochs < 0 or steps < 0 or (epochs == 0) == (steps == 0):
            raise ValueError(f"Give exactly one positive warm-up length: epochs={epochs}, steps={steps}.")
        self.epochs = epochs
        self.steps = steps
        self.names = None if distillers is None else list(distillers)

    def factor(self, epoch: int, step: int) -> float:
        if self.epochs:
            return min(1.0, (epoch + 1) / self.epochs)
        return min(1.0, (step + 1) / self.steps)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, DistillationModule):
            raise TypeError("KDWeightWarmup works with lightningkd DistillationModule subclasses.")
        known = [d.name for d in pl_module.distillers]
        unknown = sorted(set(self.names or ()) - set(known))
        if unknown:
            raise ValueError(f"KDWeightWarmup: unknown distiller names {unknown}; the module has {known}.")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        value = self.factor(trainer.current_epoch, trainer.global_step)
        for d in pl_module.distillers:
            if self.names is None or d.name in self.names:
                d.scale = value
        if pl_module.log_due():  # at the logging interval, like the loss terms
            pl_module.log("train/kd_warmup", value, on_step=True, on_epoch=False)
