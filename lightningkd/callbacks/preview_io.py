"""Where the preview callbacks put their pictures: a PNG under the run's log folder and every image logger."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
from torch import Tensor
from torchvision.utils import save_image

if TYPE_CHECKING:  # matplotlib takes a while to import and only the drawing needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.legend import Legend

DPI = 100
MIN_TILE_WIDTH = 128  # narrower tiles are enlarged by a whole factor so that the column titles fit
GAP = 4  # white space between tiles
MARGIN = 6  # white space around the grid
TITLE_BAND = 24  # room above the grid for the column titles
FONT_SIZE = 10


def publish_preview(
    trainer: L.Trainer, grid: Tensor, folder_name: str, key: str, dirpath: str | None = None
) -> str:
    """Save ``grid`` (``(3, H, W)`` in [0, 1]) as ``<folder>/epoch_<NNN>.png`` (the epoch, three digits) and send it to the loggers.

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


def draw_legend(
    fig: Figure, canvas: FigureCanvasAgg, legend: list[tuple[str, tuple[int, int, int]]], width: int
) -> tuple[Legend, int]:
    """Draw ``(name, (r, g, b))`` entries at the top of ``fig`` in as many columns as fit ``width`` pixels.

    The column count is found by measuring the drawn legend. Returns the legend (to place it once the
    figure's height is known) and its height in pixels.
    """
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.array(c) / 255, edgecolor="0.5", linewidth=0.5) for _, c in legend]
    labels = [name for name, _ in legend]
    box = None
    for ncol in range(min(len(legend), 12), 0, -1):
        if box is not None:
            box.remove()
        box = fig.legend(
            handles, labels, loc="upper center", ncol=ncol, frameon=False, fontsize=FONT_SIZE - 1,
            handlelength=1.2, columnspacing=1.2, borderaxespad=0.0,
        )  # fmt: skip
        extent = box.get_window_extent(canvas.get_renderer())
        if extent.width <= width - 2 * MARGIN or ncol == 1:
            break
    return box, math.ceil(extent.height)
