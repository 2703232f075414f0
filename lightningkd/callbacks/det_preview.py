"""Draw the ground truth, teacher and student detections (and distillers' masks) of fixed validation images."""

from __future__ import annotations

import colorsys
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
from lightningkd.distillers import FGD
from lightningkd.functional.fgd import fgd_masks
from lightningkd.taps import ITEM_SEPARATOR, OUTPUT, FeatureTap

__all__ = ["DetectionPreview", "class_colour"]

_LINE = 2  # box outline thickness in pixels of the picture
_CAPTION_SIZE = 7  # font size of the box captions
_CAPTION_ROOM = 12  # a box closer than this to the tile's top gets its caption inside, not above
_PAD_GREY = 217 / 255  # tile area outside an image smaller than the largest one

Drawn = tuple[str, float | None, tuple[float, float, float, float]]
"""One drawn box: ``(class name, score or None for the ground truth, (x1, y1, x2, y2) image pixels)``."""


def class_colour(label: int) -> tuple[int, int, int]:
    """The ``(r, g, b)`` colour (0-255) of a 1-based class label in :class:`DetectionPreview`.

    Labels 1-10 take matplotlib's ``tab10`` colours; later labels get hues spaced by the golden ratio.

    Example:
        >>> class_colour(1), class_colour(2)
        ((31, 119, 180), (255, 127, 14))
    """
    if 1 <= label <= 10:
        from matplotlib import colormaps

        rgb = colormaps["tab10"].colors[label - 1]
    else:
        rgb = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.75, 0.9)
    return tuple(int(round(c * 255)) for c in rgb)  # type: ignore[return-value]


class DetectionPreview(L.Callback):
    """Log a labelled picture of a few fixed validation images with their boxes and both models' detections.

    At the end of every ``every_n_epochs``-th validation, each of ``num_images`` validation images (the
    same ones every time, spread evenly over the set and read once) becomes one row of tiles. The
    columns, titled above the top row, are:

    - ``"image + ground truth"``: the input, un-normalised with the datamodule's ``mean``/``std`` (min-max
      scaled per image when the datamodule has none), with its ground-truth boxes;
    - ``"teacher"``: the teacher's detections (only when the module has a teacher);
    - ``"student"``: the student's detections;
    - ``"<name> foreground"`` for every distiller of ``pl_module.distillers`` that is, or contains (e.g. a
      :class:`~lightningkd.distillers.PerLevel` wrapper), an :class:`~lightningkd.distillers.FGD`
      (``<name>`` is the top-level distiller's ``name``): FGD's foreground mask of the image's ground
      truth (:func:`lightningkd.functional.fgd.fgd_masks`, of the first FGD copy found) as an
      ``inferno`` heat map (scaled to the image's largest mask value) blended half and half over the image;
    - ``"<name> mask <k> (<level>)"``, ``k < max_masks``, for every distiller with a ``spatial_masks(student,
      teacher)`` method (MasKD, ACAM-KD), directly or in a :class:`~lightningkd.distillers.PerLevel` (then
      the copy of ``mask_level``, by default the wrapper's first level, the finest FPN level; ``<level>``
      is that level, or the distiller's teacher layer when it is not wrapped): its ``k``-th spatial mask of
      the image as an ``inferno`` heat map (values as they are, 0 dark, 1 bright) blended half and half
      over the image (:func:`~lightningkd.callbacks.preview_io.blend_heat`). The masks come from the
      module's ``student_features`` and ``teacher_features`` of the drawn images as one batch (the module
      in eval mode), so the level covers the padded batch: its stride is the padded batch height over the
      level's height, rounded to a power of two, and cell ``(i, j)`` is drawn over the image pixels
      ``[i * stride, (i + 1) * stride) x [j * stride, (j + 1) * stride)`` of the image's own part of the
      batch, as the foreground masks.

    The mask is computed as in training for the FPN level the FGD copy reads (its first student layer,
    ``"backbone:<level>"``): the image alone is padded to a multiple of the module's ``size_divisible``
    (1 when it has none), the level's feature map is ``ceil(padded size / stride)`` cells, the boxes are
    scaled by the un-padded image size (FGD's ``box_scale="image"``, the official rule) or by the padded
    one (``box_scale="padded"``), and each cell is drawn over the image pixels it covers (``[j * stride,
    (j + 1) * stride)``). The stride is measured: the level is tapped (a
    :class:`~lightningkd.taps.FeatureTap` on ``pl_module.student``) while the student detects, and the
    padded batch height over the level's height, rounded to a power of two, is the stride (8 for level
    ``"0"`` of RetinaNet and FCOS, 4 for Faster R-CNN with a ResNet, 16 with MobileNetV3). When the
    level cannot be tapped (no ``student`` module holding that layer), or when ``fgd_stride`` is given,
    level ``"0"`` has stride ``fgd_stride`` (default 4 for a student with an ``rpn``, i.e. Faster R-CNN,
    else 8), an integer level ``k`` ``fgd_stride * 2**k`` and any other key (``"pool"``, ``"p6"``)
    ``fgd_stride``.

    Boxes are outlined (2 pixels, inside the box) in their class colour (:func:`class_colour`, the same
    in every column) and captioned ``"<class name> <score>"`` (the ground truth without a score). Only
    detections scoring at least ``score_threshold`` are drawn, at most ``max_boxes`` per image and column
    (the highest scores, drawn on top). Class names are the module's ``class_names``, else the
    datamodule's ``classes``, else ``"class<i>"``. Below the grid, a legend pairs each class drawn in the
    picture with its colour. Tiles are drawn pixel for pixel (images narrower than 128 pixels are enlarged
    by a whole factor so that the titles fit; all tiles have the size of the largest image, smaller ones
    are padded with light grey at the bottom and right).

    After :meth:`render`: :attr:`last_columns` holds the column titles; :attr:`last_boxes`, per row and
    column, the :data:`Drawn` boxes in drawing order from the top (highest score first; empty for the
    mask columns); :attr:`last_legend` the ``(name, (r, g, b))`` legend entries;
    :attr:`last_tiles`, per row and column, the ``(top, left, height, width)`` pixel box of the tile;
    :attr:`last_scale`, per row, the ``(sy, sx)`` factors from image to picture pixels; :attr:`last_masks`,
    per row, the masks (feature-map size) of the mask columns, the foreground masks then the spatial
    masks (the image's map of the whole padded batch); :attr:`last_strides` the stride used for each
    mask column.

    The picture (rendered with matplotlib's Agg canvas, no pyplot state, so it works headless and from
    any thread) is saved as ``<log_dir>/detection_preview/epoch_<N>.png`` and sent as a ``(3, H, W)``
    image to the loggers that take images: TensorBoard (``experiment.add_image``) and the loggers with a
    ``log_image`` method (Weights & Biases, Neptune, ...). Only the rank-zero process draws.

    Args:
        num_images: how many validation images to draw.
        every_n_epochs: draw every this many validation epochs.
        score_threshold: detections scoring less are not drawn.
        max_boxes: at most this many boxes per image and column.
        dirpath: folder for the PNG files (default: ``detection_preview`` in the trainer's ``log_dir``,
            else in its ``default_root_dir``).
        max_side: images whose longer side exceeds this are shrunk (bilinear, antialiased) to it, boxes
            with them.
        fgd_stride: stride of FPN level ``"0"`` for the foreground masks (level ``k``: ``fgd_stride *
            2**k``) instead of measuring it; ``None``: measured from the student.
        max_masks: draw the first this many spatial masks of each distiller that has them (0: none).
        mask_level: the level of the :class:`~lightningkd.distillers.PerLevel` wrappers whose spatial
            masks are drawn; ``None``: each wrapper's first level.

    Example:
        >>> preview = DetectionPreview(num_images=2, score_threshold=0.5)
        >>> preview.num_images, preview.max_boxes
        (2, 20)
    """

    def __init__(
        self,
        num_images: int = 4,
        every_n_epochs: int = 1,
        score_threshold: float = 0.3,
        max_boxes: int = 20,
        dirpath: str | None = None,
        max_side: int = 512,
        fgd_stride: int | None = None,
        max_masks: int = 3,
        mask_level: str | None = None,
    ) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}.")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        if max_boxes < 0:
            raise ValueError(f"max_boxes must be >= 0, got {max_boxes}.")
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}.")
        if fgd_stride is not None and fgd_stride < 1:
            raise ValueError(f"fgd_stride must be >= 1, got {fgd_stride}.")
        if max_masks < 0:
            raise ValueError(f"max_masks must be >= 0, got {max_masks}.")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.score_threshold = score_threshold
        self.max_boxes = max_boxes
        self.dirpath = dirpath
        self.max_side = max_side
        self.fgd_stride = fgd_stride
        self.max_masks = max_masks
        self.mask_level = mask_level
        self.saved: list[str] = []
        self.last_columns: list[str] = []
        self.last_boxes: list[list[list[Drawn]]] = []
        self.last_legend: list[tuple[str, tuple[int, int, int]]] = []
        self.last_tiles: list[list[tuple[int, int, int, int]]] = []
        self.last_scale: list[tuple[float, float]] = []
        self.last_masks: list[list[Tensor]] = []
        self.last_strides: list[int] = []
        self._samples: tuple[list[Tensor], list[dict[str, Any]]] | None = None

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if self._samples is None:
            self._samples = self.pick_samples(trainer)
        images, targets = self._samples
        if not images:
            return
        grid = self.render(pl_module, getattr(trainer, "datamodule", None), images, targets)
        self.saved.append(
            publish_preview(trainer, grid, "detection_preview", "val/detection_preview", self.dirpath)
        )

    def pick_samples(self, trainer: L.Trainer) -> tuple[list[Tensor], list[dict[str, Any]]]:
        """``num_images`` ``(image, target)`` pairs of the validation set, spread evenly over it.

        Samples that the dataset skips (``None``, an unreadable file with ``skip_corrupt``) are left out.
        """
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, Sequence) else loaders
        dataset = loader.dataset
        if len(dataset) == 0:
            return [], []
        count = min(self.num_images, len(dataset))
        picks = np.linspace(0, len(dataset) - 1, count).round().astype(int)
        pairs = [p for p in (dataset[int(i)] for i in picks) if p is not None]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    @torch.no_grad()
    def render(
        self, pl_module: Any, datamodule: Any, images: Sequence[Tensor], targets: Sequence[dict[str, Any]]
    ) -> Tensor:
        """The labelled preview (a ``(3, H', W')`` float image in [0, 1]) of ``images`` and their ``targets``.

        ``images`` are normalised ``(3, h, w)`` tensors (sizes may differ), ``targets`` dicts with
        ``"boxes"`` (xyxy pixels) and ``"labels"`` (1-based). Also sets the ``last_*`` attributes.
        """
        images = [i.detach().float().cpu() for i in images]
        if not images:
            raise ValueError("DetectionPreview.render needs at least one image.")
        names = _class_names(datamodule, pl_module)
        device = _device(pl_module)
        batch = [i.to(device) for i in images]
        truths = [
            [
                (int(label), None, tuple(float(v) for v in box))
                for box, label in zip(t["boxes"].tolist(), t["labels"].tolist())
            ][: self.max_boxes]
            for t in targets
        ]
        titles = ["image + ground truth"]
        per_column: list[list[list[tuple[int, float | None, tuple[float, ...]]]]] = [truths]
        teacher = getattr(pl_module, "teacher", None)
        if teacher is not None:
            titles.append("teacher")
            per_column.append(self._kept(pl_module.detect(batch, model=teacher)))
        titles.append("student")
        fgd_columns = _fgd_distillers(pl_module)
        titles += [f"{name} foreground" for name, _ in fgd_columns]
        layers = [fgd.student_layers[0] for _, fgd in fgd_columns]
        student, measured = self._detect_and_measure(pl_module, batch, layers)
        per_column.append(self._kept(student))
        strides = [measured.get(layer) or self._stride(layer, pl_module) for layer in layers]
        spatial, spatial_strides = self._spatial_masks(pl_module, batch, targets)
        titles += [title for title, _ in spatial]
        strides += spatial_strides

        # one tile size for every image: the largest, shrunk to max_side, enlarged so that titles fit
        height = max(int(i.shape[-2]) for i in images)
        width = max(int(i.shape[-1]) for i in images)
        shrink = min(1.0, self.max_side / max(height, width))
        tile_w0 = max(1, round(width * shrink))
        enlarge = max(1, math.ceil(MIN_TILE_WIDTH / tile_w0))
        tile_h, tile_w = max(1, round(height * shrink)) * enlarge, tile_w0 * enlarge
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)

        rows: list[list[np.ndarray]] = []
        drawn: list[list[list[Drawn]]] = []
        scales: list[tuple[float, float]] = []
        masks: list[list[Tensor]] = []
        captions: list[list[list[tuple[float, float, str, tuple[int, int, int]]]]] = []
        used: set[int] = set()
        for index, image in enumerate(images):
            h, w = int(image.shape[-2]), int(image.shape[-1])
            picture = _displayable(image, mean, std)
            size = (max(1, round(h * shrink)), max(1, round(w * shrink)))
            if size != (h, w):
                picture = torch.nn.functional.interpolate(
                    picture[None], size=size, mode="bilinear", antialias=True, align_corners=False
                )[0].clamp(0, 1)
            picture = picture.repeat_interleave(enlarge, 1).repeat_interleave(enlarge, 2)
            sy, sx = picture.shape[-2] / h, picture.shape[-1] / w
            scales.append((sy, sx))
            base = torch.full((3, tile_h, tile_w), _PAD_GREY)
            base[:, : picture.shape[-2], : picture.shape[-1]] = picture
            base = (base * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            row, row_drawn, row_captions, row_masks = [], [], [], []
            for boxes in per_column:
                tile = base.copy()
                entries: list[Drawn] = []
                notes = []
                # lowest score first, so the best boxes end up on top
                for label, score, box in reversed(boxes[index]):
                    colour = class_colour(label)
                    x1, y1, x2, y2 = _outline(tile, box, sy, sx, picture.shape[-2], picture.shape[-1], colour)
                    name = _name(names, label)
                    notes.append((x1, y1, name if score is None else f"{name} {score:.2f}", colour))
                    entries.append((name, score, box))
                    used.add(label)
                row.append(tile)
                row_drawn.append(entries[::-1])
                row_captions.append(notes)
            masks_here = [
                self._foreground(pl_module, fgd, stride, targets[index]["boxes"], h, w)
                for (_, fgd), stride in zip(fgd_columns, strides)
            ]
            for mask, stride in zip(masks_here, strides):
                peak = float(mask.max())  # the foreground's values (1 / box area) scaled to the largest
                values = mask / peak if peak > 0 else torch.zeros_like(mask)
                row.append(_heat(base, values, stride, h, w, sy, sx, picture.shape[-2], picture.shape[-1]))
            for (_, batch_masks), stride in zip(spatial, spatial_strides):
                masks_here.append(batch_masks[index])
                row.append(_heat(base, batch_masks[index], stride, h, w, sy, sx, *picture.shape[-2:]))
            row_masks += masks_here
            row_drawn += [[] for _ in masks_here]
            row_captions += [[] for _ in masks_here]
            rows.append(row)
            drawn.append(row_drawn)
            captions.append(row_captions)
            masks.append(row_masks)

        legend = [(_name(names, label), class_colour(label)) for label in sorted(used)]
        picture, tiles = _draw(rows, titles, captions, legend)
        self.last_columns, self.last_boxes, self.last_legend = titles, drawn, legend
        self.last_tiles, self.last_scale, self.last_masks = tiles, scales, masks
        self.last_strides = strides
        return picture

    def _kept(
        self, detections: Sequence[dict[str, Tensor]]
    ) -> list[list[tuple[int, float, tuple[float, ...]]]]:
        """Per image: the detections scoring at least ``score_threshold``, best first, at most ``max_boxes``."""
        kept = []
        for d in detections:
            scores = d["scores"].detach().float().cpu()
            order = [
                int(i)
                for i in scores.argsort(descending=True, stable=True)
                if scores[i] >= self.score_threshold
            ]
            order = order[: self.max_boxes]
            boxes, labels = d["boxes"].detach().float().cpu(), d["labels"].detach().cpu()
            kept.append(
                [
                    (int(labels[i]), float(scores[i]), tuple(float(v) for v in boxes[i].tolist()))
                    for i in order
                ]
            )
        return kept

    def _foreground(
        self, pl_module: Any, fgd: Any, stride: int, boxes: Tensor, height: int, width: int
    ) -> Tensor:
        """FGD's ``(h_f, w_f)`` foreground mask of one image's ground-truth ``boxes`` at a level of ``stride``."""
        divisible = int(getattr(pl_module, "size_divisible", 1) or 1)
        padded_h = math.ceil(height / divisible) * divisible
        padded_w = math.ceil(width / divisible) * divisible
        feature_size = (math.ceil(padded_h / stride), math.ceil(padded_w / stride))
        # boxes relative to the un-padded image (the official FGD), or to the padded one when the FGD says so
        padded = getattr(fgd, "box_scale", "image") == "padded"
        size = (padded_h, padded_w) if padded else (height, width)
        foreground, _ = fgd_masks([boxes.detach().float().cpu()], [size], feature_size)
        return foreground[0].float().cpu()

    def _spatial_masks(
        self, pl_module: Any, batch: list[Tensor], targets: Sequence[dict[str, Any]]
    ) -> tuple[list[tuple[str, Tensor]], list[int]]:
        """``(title, (N, h_f, w_f) mask)`` of every spatial-mask column, and the stride of each."""
        sources = spatial_mask_distillers(pl_module, self.mask_level) if self.max_masks else []
        if not sources:
            return [], []
        device = batch[0].device
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        was_training = pl_module.training
        pl_module.eval()  # the detectors return detections, not losses, and BatchNorm statistics stay
        try:
            student, teacher = tapped_features(pl_module, batch, targets)
            found = [
                (n, d.spatial_masks(student, teacher), lv or d.teacher_layers[0]) for n, d, lv in sources
            ]
        finally:
            pl_module.train(was_training)
        padded = _padded_height(pl_module, batch)
        columns, strides = [], []
        for name, masks, level in found:
            masks = masks[:, : self.max_masks].float().cpu()
            for k in range(masks.shape[1]):
                columns.append((f"{name} mask {k} ({level})", masks[:, k]))
                strides.append(_measured_stride(padded, masks.shape[-2]))
        return columns, strides

    def _detect_and_measure(
        self, pl_module: Any, images: list[Tensor], layers: list[str]
    ) -> tuple[Sequence[dict[str, Tensor]], dict[str, int]]:
        """The student's detections and, when ``fgd_stride`` is ``None``, the stride of each of ``layers``
        measured while it ran (a power of two: the padded batch size over the level's size, rounded in
        log scale). Layers that cannot be tapped (no ``student`` module, or not its layer) are left out."""
        student = getattr(pl_module, "student", None)
        if not layers or self.fgd_stride is not None or not isinstance(student, torch.nn.Module):
            return pl_module.detect(images), {}

        try:
            tap = FeatureTap(student, layers)
        except ValueError:
            return pl_module.detect(images), {}
        try:
            with tap:
                features = tap.run(pl_module.detect, images)
        except KeyError:  # the layer returns no dict with that level: no measure
            return pl_module.detect(images), {}
        padded = _padded_height(pl_module, images)
        strides = {}
        for layer in layers:
            level = features.get(layer)
            if torch.is_tensor(level) and level.ndim == 4 and level.shape[-2] > 0:
                strides[layer] = _measured_stride(padded, level.shape[-2])
        return features[OUTPUT], strides

    def _stride(self, layer: str, pl_module: Any) -> int:
        """The stride of the FPN level ``"<module>:<level>"`` from ``fgd_stride`` (or its default)."""
        base = self.fgd_stride
        if base is None:
            base = 4 if hasattr(getattr(pl_module, "student", None), "rpn") else 8
        level = layer.partition(ITEM_SEPARATOR)[2]
        return base * 2 ** int(level) if level.isdigit() else base


def _padded_height(pl_module: Any, images: Sequence[Tensor]) -> int:
    """The height of the module's padded batch of ``images`` (a multiple of its ``size_divisible``)."""
    divisible = int(getattr(pl_module, "size_divisible", 1) or 1)
    return math.ceil(max(int(i.shape[-2]) for i in images) / divisible) * divisible


def _measured_stride(padded: int, level_height: int) -> int:
    """A level's stride: the padded batch height over the level's, rounded to a power of two (log scale)."""
    return 2 ** max(0, round(math.log2(padded / level_height)))


def _device(pl_module: Any) -> torch.device:
    device = getattr(pl_module, "device", None)
    if isinstance(device, torch.device):
        return device
    parameter = next(iter(pl_module.parameters()), None) if hasattr(pl_module, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _class_names(datamodule: Any, pl_module: Any) -> list[str] | None:
    for names in (getattr(pl_module, "class_names", None), getattr(datamodule, "classes", None)):
        if names is not None:
            return [str(n) for n in names]
    return None


def _name(names: list[str] | None, label: int) -> str:
    return names[label - 1] if names is not None and 1 <= label <= len(names) else f"class{label}"


def _fgd_distillers(pl_module: Any) -> list[tuple[str, Any]]:
    """``(top-level distiller name, first FGD found in it)`` for each distiller that is or holds an FGD."""
    found = []
    for distiller in getattr(pl_module, "distillers", ()):
        fgd = next((m for m in distiller.modules() if isinstance(m, FGD)), None)
        if fgd is not None:
            found.append((getattr(distiller, "name", type(distiller).__name__.lower()), fgd))
    return found


def _displayable(image: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """A normalised ``(3, h, w)`` image back to [0, 1]: un-normalised, or min-max scaled without statistics."""
    if mean is not None and std is not None:
        return (image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else torch.zeros_like(image)


def _outline(
    tile: np.ndarray,
    box: Sequence[float],
    sy: float,
    sx: float,
    height: int,
    width: int,
    colour: tuple[int, int, int],
) -> tuple[int, int, int, int]:
    """Paint the outline of an image-pixel ``box`` into the ``(H, W, 3)`` uint8 ``tile``, inside the box.

    The box covers the picture pixels ``floor(x1 * sx) .. ceil(x2 * sx) - 1`` (likewise in y), clipped to
    the image's ``height`` x ``width``; the outline is its outer ``_LINE`` pixels. Returns the covered
    ``(left, top, right, bottom)`` pixels (inclusive).
    """
    x1, y1, x2, y2 = box
    left = min(max(math.floor(x1 * sx), 0), width - 1)
    top = min(max(math.floor(y1 * sy), 0), height - 1)
    right = max(min(math.ceil(x2 * sx) - 1, width - 1), left)
    bottom = max(min(math.ceil(y2 * sy) - 1, height - 1), top)
    line = _LINE
    tile[top : top + line, left : right + 1] = colour
    tile[max(bottom - line + 1, top) : bottom + 1, left : right + 1] = colour
    tile[top : bottom + 1, left : left + line] = colour
    tile[top : bottom + 1, max(right - line + 1, left) : right + 1] = colour
    return left, top, right, bottom


def _heat(
    base: np.ndarray, mask: Tensor, stride: int, h: int, w: int, sy: float, sx: float, height: int, width: int
) -> np.ndarray:
    """``base`` (the tile's uint8 image) with a feature-map ``mask`` (values in [0, 1]) over the image as a heat map.

    Feature cell ``(i, j)`` covers the image pixels ``[i * stride, (i + 1) * stride) x [j * stride, (j + 1)
    * stride)``; the image, ``h`` x ``w`` pixels, is drawn as ``height`` x ``width`` picture pixels (``sy``,
    ``sx`` picture pixels per image pixel). Cells beyond the image (padding) are not drawn.
    """
    h_f, w_f = mask.shape
    # the cell under each picture pixel: picture pixel -> image pixel under its centre -> feature cell
    ys = ((torch.arange(height) + 0.5) / sy).floor().long().clamp(0, h - 1)
    xs = ((torch.arange(width) + 0.5) / sx).floor().long().clamp(0, w - 1)
    cell_y = (ys // stride).clamp(max=h_f - 1)
    cell_x = (xs // stride).clamp(max=w_f - 1)
    values = mask[cell_y[:, None], cell_x[None, :]]
    tile = base.copy()
    region = torch.from_numpy(tile[:height, :width]).permute(2, 0, 1).double() / 255
    blended = (blend_heat(region, values) * 255).round().to(torch.uint8)
    tile[:height, :width] = blended.permute(1, 2, 0).numpy()
    return tile


def _draw(
    rows: list[list[np.ndarray]],
    titles: list[str],
    captions: list[list[list[tuple[float, float, str, tuple[int, int, int]]]]],
    legend: list[tuple[str, tuple[int, int, int]]],
) -> tuple[Tensor, list[list[tuple[int, int, int, int]]]]:
    """Lay the uint8 ``(H, W, 3)`` tiles out under ``titles``, with box ``captions``, above a ``legend``.

    The tiles are pasted pixel for pixel into one array shown with ``figimage`` (no resampling); titles,
    captions (``(x, y, text, colour)`` at the picture pixel ``(x, y)`` of the box's top-left corner) and
    the legend are placed in display pixels. Returns the picture as a ``(3, H, W)`` float tensor in
    [0, 1] and each tile's ``(top, left, height, width)`` pixel box in it.
    """
    # imported here: matplotlib takes a while to import and only the preview needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox, IdentityTransform

    pixels = IdentityTransform()  # display coordinates: pixels from the bottom-left corner
    n_rows, n_cols = len(rows), len(titles)
    tile_h, tile_w = rows[0][0].shape[:2]
    width = 2 * MARGIN + n_cols * tile_w + (n_cols - 1) * GAP
    grid_h = n_rows * tile_h + (n_rows - 1) * GAP

    # a quarter pixel more: the figure's size in pixels (inches x dpi, a float) is truncated to whole ones
    fig = Figure(figsize=((width + 0.25) / DPI, 1.0), dpi=DPI, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    legend_h, box = 0, None
    if legend:
        box, legend_h = draw_legend(fig, canvas, legend, width)
        legend_h += MARGIN
    height = TITLE_BAND + grid_h + MARGIN + legend_h
    fig.set_size_inches((width + 0.25) / DPI, (height + 0.25) / DPI)
    if box is not None:
        box.set_bbox_to_anchor((width / 2, height - (TITLE_BAND + grid_h + MARGIN)), transform=pixels)

    sheet = np.full((height, width, 3), 255, np.uint8)
    tiles: list[list[tuple[int, int, int, int]]] = []
    for r in range(n_rows):
        top = TITLE_BAND + r * (tile_h + GAP)
        tiles.append([])
        for c in range(n_cols):
            left = MARGIN + c * (tile_w + GAP)
            tiles[-1].append((top, left, tile_h, tile_w))
            # a grey frame one pixel wide around the tile
            sheet[top - 1 : top + tile_h + 1, left - 1 : left + tile_w + 1] = 153
            sheet[top : top + tile_h, left : left + tile_w] = rows[r][c]
            if r == 0:
                fig.text(
                    left + tile_w / 2, height - top + 4, titles[c], transform=pixels, fontsize=FONT_SIZE,
                    ha="center", va="bottom",
                )  # fmt: skip
            clip = Bbox.from_bounds(left, height - top - tile_h, tile_w, tile_h)
            for x, y, text, colour in captions[r][c]:
                dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 140
                above = y >= _CAPTION_ROOM  # above the box, or inside it at the tile's top
                label = fig.text(
                    left + x, height - top - (y if above else y + _LINE), text, transform=pixels,
                    fontsize=_CAPTION_SIZE, color="white" if dark else "black", ha="left",
                    va="bottom" if above else "top",
                    bbox=dict(facecolor=np.array(colour) / 255, edgecolor="none", pad=1.0),
                )  # fmt: skip
                label.set_clip_box(clip)
                label.set_clip_on(True)
    fig.figimage(sheet, 0, 0, origin="upper", zorder=0)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[:height, :width, :3]
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255, tiles
