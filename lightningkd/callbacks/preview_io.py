"""Where the preview callbacks put their pictures: a PNG under the run's log folder and every image logger."""

from __future__ import annotations

import os

import lightning as L
from torch import Tensor
from torchvision.utils import save_image


def publish_preview(
    trainer: L.Trainer, grid: Tensor, folder_name: str, key: str, dirpath: str | None = None
) -> str:
    """Save ``grid`` (``(3, H, W)`` in [0, 1]) as ``<folder>/epoch_XXX.png`` and send it to the loggers.

    The folder is ``dirpath`` or ``<log_dir>/<folder_name>``. Loggers with a TensorBoard-style
    ``experiment.add_image`` or a ``log_image`` method (Weights & Biases, Neptune, ...) get it under ``key``.
    Returns the PNG's path.
    """
    folder = dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, folder_name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"epoch_{trainer.current_epoch:03d}.png")
    save_image(grid, path)
    for logger in trainer.loggers:
        if hasattr(getattr(logger, "experiment", None), "add_image"):
            logger.experiment.add_image(key, grid, trainer.global_step)
        elif hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[grid], step=trainer.global_step)
    return path
