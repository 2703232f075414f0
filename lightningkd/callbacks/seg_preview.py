"""Draw the image, ground truth, teacher and student predictions (and BPKD's masks) of fixed validation images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image


class SegmentationPreview(L.Callback):
    """Log a picture of a few fixed validation images with their labels and both models' predictions.

    At the end of every ``every_n_epochs``-th validation, each of ``num_images`` validation images
    (always the same ones, spread evenly over the set) becomes one row: the image, the ground truth,
    the teacher's prediction (when there is a teacher), the student's prediction and, for every
    distiller exposing ``masks(target, size)`` (BPKD), its edge mask (white where any class has an edge)
    and body mask (white where every class is body; edges and ignored pixels are dark) in grey. Class maps are
    drawn in the datamodule's ``palette`` (ignored pixels black) and images are un-normalised with its
    ``mean``/``std``.

    The picture is saved as ``<log_dir>/segmentation_preview/epoch_<N>.png`` and sent to the loggers
    that take images: TensorBoard (``experiment.add_image``) and the loggers with a ``log_image`` method
    (Weights & Biases, Neptune, ...).

    Args:
        num_images: how many validation images to draw.
        every_n_epochs: draw every this many validation epochs.
        dirpath: folder for the PNG files (default: the trainer's ``log_dir``, else its ``default_root_dir``).
        max_side: tiles whose longer side exceeds this are shrunk (nearest) to it, so that full-resolution
            Cityscapes images do not make a 100-megapixel picture.

    Example:
        >>> preview = SegmentationPreview(num_images=2)
        >>> preview.num_images
        2
    """

    def __init__(
        self, num_images: int = 4, every_n_epochs: int = 1, dirpath: str | None = None, max_side: int = 512
    ) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}.")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.dirpath = dirpath
        self.max_side = max_side
        self.saved: list[str] = []

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        images, targets = self._samples(trainer)
        grid = self.render(pl_module, trainer.datamodule, images, targets)
        folder = self.dirpath or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "segmentation_preview"
        )
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"epoch_{trainer.current_epoch:03d}.png")
        save_image(grid, path)
        self.saved.append(path)
        for logger in trainer.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_image"):
                logger.experiment.add_image("val/segmentation_preview", grid, trainer.global_step)
            elif hasattr(logger, "log_image"):
                logger.log_image(key="val/segmentation_preview", images=[grid], step=trainer.global_step)

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
        """The preview grid (a ``(3, H', W')`` float image in [0, 1]) for ``images`` and their ``targets``."""
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
        if pl_module.teacher is not None:
            logits = pl_module.teacher_logits(batch, size=targets.shape[-2:])
            columns.append(_colour(logits.argmax(1).cpu(), palette, ignore))
        logits = pl_module.predict_logits(batch, size=targets.shape[-2:])
        columns.append(_colour(logits.argmax(1).cpu(), palette, ignore))
        for distiller in pl_module.distillers:
            if hasattr(distiller, "masks"):
                edge, body = distiller.masks(targets.to(device), targets.shape[-2:])
                # per-class masks in one picture: where any class has an edge; where every class is body
                for mask in (edge.amax(1, keepdim=True), body.amin(1, keepdim=True)):
                    columns.append(mask.clamp(0, 1).float().cpu().expand(-1, 3, -1, -1))
        pl_module.train(was_training)
        tiles = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: one row per image
        longest = max(tiles.shape[-2:])
        if longest > self.max_side:
            size = [max(1, round(s * self.max_side / longest)) for s in tiles.shape[-2:]]
            tiles = torch.nn.functional.interpolate(tiles, size=size, mode="nearest")
        return make_grid(tiles, nrow=len(columns), padding=2, pad_value=1.0)


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


def _colour(classes: Tensor, palette: Tensor, ignore_index: int) -> Tensor:
    """``(N, H, W)`` class indices to ``(N, 3, H, W)`` colours; ignored and unknown indices black."""
    known = (classes >= 0) & (classes < palette.shape[0]) & (classes != ignore_index)
    colours = palette[classes.where(known, torch.zeros_like(classes)).long()] * known[..., None]
    return colours.permute(0, 3, 1, 2)
