"""What the preview callbacks share: where the pictures go (a PNG under the run's log folder and every image
logger), the legend, and the heat maps of the distillers' spatial masks."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
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
HEAT_ALPHA = 0.5  # weight of the heat-map colour over the image in the mask tiles
HEAT_MAP = "inferno"


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


def blend_heat(image: Tensor, mask: Tensor, alpha: float = HEAT_ALPHA) -> Tensor:
    """``image`` (``(..., 3, H, W)`` in [0, 1]) with ``mask`` (``(..., H, W)``, values in [0, 1]) over it as a heat map.

    Each pixel becomes ``(1 - alpha) * image + alpha * inferno(mask)`` (computed in float64, returned in
    the image's dtype, on the CPU); mask values outside [0, 1] are clamped.

    Example:
        >>> blend_heat(torch.zeros(3, 1, 2), torch.tensor([[0.0, 1.0]]))[:, 0, 1]  # inferno(1) / 2
        tensor([0.4942, 0.4992, 0.3225])
    """
    from matplotlib import colormaps

    heat = colormaps[HEAT_MAP](mask.detach().double().clamp(0, 1).cpu().numpy())[..., :3]
    heat = torch.from_numpy(heat).movedim(-1, -3)
    return ((1 - alpha) * image.detach().double().cpu() + alpha * heat).to(image.dtype)


def spatial_mask_distillers(pl_module: Any, level: str | None = None) -> list[tuple[str, Any, str | None]]:
    """``(name, distiller, level)`` for each distiller of ``pl_module.distillers`` with a ``spatial_masks`` method.

    A distiller that has one (MasKD, ACAM-KD) comes with level ``None``; a per-level wrapper
    (:class:`~lightningkd.distillers.PerLevel`, found by its ``levels`` and ``level(name)``) whose copies
    have one comes with the copy of ``level``, by default its first level (the finest FPN level). ``name``
    is the top-level distiller's ``name``.
    """
    found = []
    for distiller in getattr(pl_module, "distillers", ()):
        name = getattr(distiller, "name", type(distiller).__name__.lower())
        if callable(getattr(distiller, "spatial_masks", None)):
            found.append((name, distiller, None))
            continue
        levels = getattr(distiller, "levels", None)
        if not levels or not callable(getattr(distiller, "level", None)):
            continue
        chosen = levels[0] if level is None else level
        if chosen not in levels:
            raise ValueError(
                f"The preview's mask level {chosen!r} is not a level of the distiller {name!r}, whose levels "
                f"are {list(levels)}."
            )
        inner = distiller.level(chosen)
        if callable(getattr(inner, "spatial_masks", None)):
            found.append((name, inner, chosen))
    return found


def tapped_features(pl_module: Any, images: Any, targets: Any) -> tuple[Any, Any]:
    """The student's and the teacher's tapped features of a batch, as a training step gets them.

    The batch ``(images, targets)`` goes through the module's ``unpack_batch`` and ``prepare_images`` (when it
    has them), then its ``student_features`` and ``teacher_features``. The caller sets the eval mode.
    """
    unpack = getattr(pl_module, "unpack_batch", None)
    batch = unpack((images, targets)) if callable(unpack) else {"image": images, "target": targets}
    prepare = getattr(pl_module, "prepare_images", None)
    images = prepare(batch["image"]) if callable(prepare) else batch["image"]
    return pl_module.student_features(images, batch), pl_module.teacher_features(images, batch)
