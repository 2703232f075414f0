"""Draw the image, ground truth, teacher and student predictions (and distillers' masks) of fixed validation images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lightningkd.callbacks.preview_io import (
    DPI,
    FONT_SIZE,
    GAP,
    MARGIN,
    MIN_TILE_WIDTH,
    TITLE_BAND,
    blend_heat,
    draw_legend,
    publish_preview,
    spatial_mask_distillers,
    tapped_features,
)


class SegmentationPreview(L.Callback):
    """Log a labelled picture of a few fixed validation images with their labels and both models' predictions.

    At the end of every ``every_n_epochs``-th validation, each of ``num_images`` validation images
    (always the same ones, spread evenly over the set) becomes one row of tiles. The columns, titled
    above the top row, are:

    - ``"image"``: the input, un-normalised with the datamodule's ``mean``/``std``;
    - ``"ground truth"``: the label map;
    - ``"teacher"``: the teacher's prediction (only when the module has a teacher);
    - ``"student"``: the student's prediction;
    - ``"<name> edge"`` and ``"<name> body"`` for every distiller exposing ``masks(target, size)`` (BPKD;
      ``<name>`` is the distiller's ``name``, e.g. ``"bpkd edge"``): in grey, the edge mask (white where
      any class has an edge) and the body mask (white where every class is body; edges and ignored
      pixels are dark);
    - ``"<name> mask <k>"``, ``k < max_masks``, for every distiller with a ``spatial_masks(student, teacher)``
      method (MasKD, ACAM-KD; in a :class:`~lightningkd.distillers.PerLevel`, its first level's copy, the
      title then ending in ``" (<level>)"``): the distiller's ``k``-th spatial mask of the image, from the
      module's ``student_features`` and ``teacher_features`` of the drawn images (in eval mode), resized
      (bilinear) to the image and blended half and half over it as an ``inferno`` heat map (values as
      they are, 0 dark, 1 bright; :func:`~lightningkd.callbacks.preview_io.blend_heat`).

    Class maps are drawn in the datamodule's ``palette`` (a fixed random palette when it has none),
    ignored pixels in black. Below the grid, a legend pairs each class name (the datamodule's
    ``classes``, else the module's ``class_names``, else ``"class 0"``, ``"class 1"``, ...) with its
    colour, plus an ``"ignored"`` entry for black. Tiles are drawn with nearest-neighbour
    interpolation only, so their colours are exactly the palette's (the masks' heat maps are resized
    bilinearly before); tiles narrower than 128 pixels are enlarged by a whole factor so the titles fit. After :meth:`render`, :attr:`last_columns` holds the
    column titles, :attr:`last_legend` the ``(name, (r, g, b))`` legend entries and :attr:`last_boxes`
    the ``(top, left, height, width)`` pixel box of every tile, one list per row.

    The picture (rendered with matplotlib's Agg canvas, no pyplot state, so it works headless and
    from any thread) is saved as ``<log_dir>/segmentation_preview/epoch_<N>.png`` and sent as a
    ``(3, H, W)`` image to the loggers that take images: TensorBoard (``experiment.add_image``) and the
    loggers with a ``log_image`` method (Weights & Biases, Neptune, ...).

    Args:
        num_images: how many validation images to draw.
        every_n_epochs: draw every this many validation epochs.
        dirpath: folder for the PNG files (default: the trainer's ``log_dir``, else its ``default_root_dir``).
        max_side: tiles whose longer side exceeds this are shrunk (nearest) to it, so that full-resolution
            Cityscapes images do not make a 100-megapixel picture.
        max_masks: draw the first this many spatial masks of each distiller that has them (0: none).

    Example:
        >>> preview = SegmentationPreview(num_images=2)
        >>> preview.num_images
        2
    """

    def __init__(
        self,
        num_images: int = 4,
        every_n_epochs: int = 1,
        dirpath: str | None = None,
        max_side: int = 512,
        max_masks: int = 3,
    ) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}.")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        if max_masks < 0:
            raise ValueError(f"max_masks must be >= 0, got {max_masks}.")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.dirpath = dirpath
        self.max_side = max_side
        self.max_masks = max_masks
        self.saved: list[str] = []
        self.last_columns: list[str] = []
        self.last_legend: list[tuple[str, tuple[int, int, int]]] = []
        self.last_boxes: list[list[tuple[int, int, int, int]]] = []

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        images, targets = self._samples(trainer)
        grid = self.render(pl_module, trainer.datamodule, images, targets)
        self.saved.append(
            publish_preview(trainer, grid, "segmentation_preview", "val/segmentation_preview", self.dirpath)
        )

    def _samples(self, trainer: L.Trainer) -> tuple[Tensor, Tensor]:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, Sequence) else loaders
        dataset = loader.dataset
        count = min(self.num_images, len(dataset))
        picks = np.linspace(0, len(dataset) - 1, count).round().astype(int)
        pairs = [dataset[int(i)] for i in picks]
        # images of one set may differ in size: draw each at its own size, padded to the largest
        height = max(p[0].shape[-2] for p in pairs)
        width = max(p[0].shape[-1] for p in pairs)
        images = torch.stack([_pad(p[0], height, width, 0.0) for p in pairs])
        targets = torch.stack([_pad(torch.as_tensor(p[1]), height, width, -1) for p in pairs])
        return images, targets

    @torch.no_grad()
    def render(self, pl_module: Any, datamodule: Any, images: Tensor, targets: Tensor) -> Tensor:
        """The labelled preview (a ``(3, H', W')`` float image in [0, 1]) for ``images`` and their ``targets``.

        Also sets :attr:`last_columns`, :attr:`last_legend` and :attr:`last_boxes`.
        """
        ignore = pl_module.ignore_index
        targets = targets.where(targets >= 0, torch.full_like(targets, ignore))
        palette = _palette(datamodule, pl_module.num_classes)
        mean = getattr(datamodule, "mean", (0.0, 0.0, 0.0))
        std = getattr(datamodule, "std", (1.0, 1.0, 1.0))
        was_training = pl_module.training
        pl_module.eval()
        device = pl_module.device
        batch = images.to(device)
        columns = [
            (images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)).clamp(0, 1),
            _colour(targets, palette, ignore),
        ]
        titles = ["image", "ground truth"]
        if pl_module.teacher is not None:
            logits = pl_module.teacher_logits(batch, size=targets.shape[-2:])
            columns.append(_colour(logits.argmax(1).cpu(), palette, ignore))
            titles.append("teacher")
        logits = pl_module.predict_logits(batch, size=targets.shape[-2:])
        columns.append(_colour(logits.argmax(1).cpu(), palette, ignore))
        titles.append("student")
        for distiller in pl_module.distillers:
            if hasattr(distiller, "masks"):
                edge, body = distiller.masks(targets.to(device), targets.shape[-2:])
                # per-class masks in one picture: where any class has an edge; where every class is body
                for mask in (edge.amax(1, keepdim=True), body.amin(1, keepdim=True)):
                    columns.append(mask.clamp(0, 1).float().cpu().expand(-1, 3, -1, -1))
                titles += [f"{distiller.name} edge", f"{distiller.name} body"]
        sources = spatial_mask_distillers(pl_module) if self.max_masks else []
        if sources:
            student, teacher = tapped_features(pl_module, batch, targets.to(device))
            for name, distiller, level in sources:
                masks = distiller.spatial_masks(student, teacher)[:, : self.max_masks].float()
                masks = torch.nn.functional.interpolate(
                    masks, size=targets.shape[-2:], mode="bilinear", align_corners=False
                ).cpu()
                for k in range(masks.shape[1]):
                    columns.append(blend_heat(columns[0], masks[:, k]))
                    titles.append(f"{name} mask {k}" + ("" if level is None else f" ({level})"))
        pl_module.train(was_training)
        tiles = torch.stack(columns, dim=1)  # (rows, columns, 3, h, w)
        longest = max(tiles.shape[-2:])
        if longest > self.max_side:
            size = [max(1, round(s * self.max_side / longest)) for s in tiles.shape[-2:]]
            tiles = torch.nn.functional.interpolate(tiles.flatten(0, 1), size=size, mode="nearest")
            tiles = tiles.unflatten(0, (len(images), len(columns)))
        names = _class_names(datamodule, pl_module)
        colours = (palette * 255).round().int().tolist()
        legend = [(name, tuple(c)) for name, c in zip(names, colours)] + [("ignored", (0, 0, 0))]
        picture, boxes = _draw(tiles, titles, legend)
        self.last_columns, self.last_legend, self.last_boxes = titles, legend, boxes
        return picture


def _draw(
    tiles: Tensor, titles: list[str], legend: list[tuple[str, tuple[int, int, int]]]
) -> tuple[Tensor, list[list[tuple[int, int, int, int]]]]:
    """Lay ``(rows, columns, 3, h, w)`` tiles out under ``titles`` above a colour ``legend``.

    Returns the picture as a ``(3, H, W)`` float tensor in [0, 1] and each tile's ``(top, left, height,
    width)`` pixel box in it.
    """
    # imported here: matplotlib takes a while to import and only the preview needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows, cols, _, h, w = tiles.shape
    scale = max(1, math.ceil(MIN_TILE_WIDTH / w))
    tile_h, tile_w = h * scale, w * scale
    width = 2 * MARGIN + cols * tile_w + (cols - 1) * GAP
    grid_h = rows * tile_h + (rows - 1) * GAP
    # uint8 pixels go to the canvas unchanged (floats would be truncated, not rounded, to bytes)
    pixels = (tiles * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()

    fig = Figure(figsize=(width / DPI, 1.0), dpi=DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    box, legend_h = draw_legend(fig, canvas, legend, width)
    height = TITLE_BAND + grid_h + MARGIN + legend_h + MARGIN
    fig.set_size_inches(width / DPI, height / DPI)
    box.set_bbox_to_anchor((0.5, 1 - (TITLE_BAND + grid_h + MARGIN) / height), transform=fig.transFigure)

    boxes: list[list[tuple[int, int, int, int]]] = []
    for r in range(rows):
        top = TITLE_BAND + r * (tile_h + GAP)
        boxes.append([])
        for c in range(cols):
            left = MARGIN + c * (tile_w + GAP)
            boxes[-1].append((top, left, tile_h, tile_w))
            # a grey frame one pixel wide, drawn under the tile, keeps white masks apart from the background
            frame = (left - 1, height - top - tile_h - 1, tile_w + 2, tile_h + 2)
            fig.add_artist(
                Rectangle(
                    (frame[0] / width, frame[1] / height), frame[2] / width, frame[3] / height,
                    transform=fig.transFigure, facecolor="0.6", linewidth=0, antialiased=False, zorder=-1,
                )
            )  # fmt: skip
            # matplotlib's origin is the bottom left corner
            ax = fig.add_axes((left / width, 1 - (top + tile_h) / height, tile_w / width, tile_h / height))
            ax.imshow(pixels[r, c], interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[c], fontsize=FONT_SIZE, pad=4)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255, boxes


def _pad(tensor: Tensor, height: int, width: int, value: float) -> Tensor:
    pad_h, pad_w = height - tensor.shape[-2], width - tensor.shape[-1]
    if not pad_h and not pad_w:
        return tensor
    return torch.nn.functional.pad(tensor, (0, pad_w, 0, pad_h), value=value)


def _palette(datamodule: Any, num_classes: int) -> Tensor:
    palette = getattr(datamodule, "palette", None)
    if palette is None or len(palette) < num_classes:
        generator = torch.Generator().manual_seed(0)
        palette = torch.randint(0, 256, (num_classes, 3), generator=generator).tolist()
    return torch.tensor(palette[:num_classes], dtype=torch.float32) / 255


def _class_names(datamodule: Any, pl_module: Any) -> list[str]:
    count = pl_module.num_classes
    for names in (getattr(datamodule, "classes", None), getattr(pl_module, "class_names", None)):
        if names is not None and len(names) == count:
            return [str(n) for n in names]
    return [f"class {i}" for i in range(count)]


def _colour(classes: Tensor, palette: Tensor, ignore_index: int) -> Tensor:
    """``(N, H, W)`` class indices to ``(N, 3, H, W)`` colours; ignored and unknown indices black."""
    known = (classes >= 0) & (classes < palette.shape[0]) & (classes != ignore_index)
    colours = palette[classes.where(known, torch.zeros_like(classes)).long()] * known[..., None]
    return colours.permute(0, 3, 1, 2)
