"""Print the final validation metrics at the end of a fit."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class MetricsSummary(L.Callback):
    """Print the last logged ``val/*`` metrics (student and teacher) when training ends.

    Args:
        prefix: metric-name prefix to print.
    """

    def __init__(self, prefix: str = "val/") -> None:
        self.prefix = prefix

    def summary(self, trainer: L.Trainer) -> str:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)}
        return "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(f"final metrics (epoch {trainer.current_epoch}): {self.summary(trainer)}")
