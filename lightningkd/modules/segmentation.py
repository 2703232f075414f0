"""Semantic-segmentation distillation: pixel cross-entropy, mIoU and per-class IoU, whole or sliding inference."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassConfusionMatrix

from lightningkd.distillers.base import Distiller
from lightningkd.modules.base import DistillationModule, default_optimizer, model_logits
from lightningkd.taps import OUTPUT, Features


class SegmentationDistillationModule(DistillationModule):
    """Distil a semantic-segmentation model.

    The models return logits at their head's resolution (e.g. 1/8 of the input); the task loss
    resizes them (bilinear) to the label size and applies pixel cross-entropy with ``ignore_index``.
    Distillers receive the raw logits and tapped features, at the models' own resolutions.

    Validation and test accumulate a confusion matrix (pixels labelled ``ignore_index`` are skipped)
    and log ``<stage>/mIoU`` (mean over the classes present in the labels or the predictions, as
    mmsegmentation does), ``<stage>/aAcc`` (pixel accuracy), ``<stage>/loss`` and one
    ``<stage>/iou/<class>`` per class; the teacher's ``val/teacher_mIoU`` is logged once, for
    reference. ``predict`` returns class-index maps.

    Inference is ``"whole"`` (the full image in one pass) or ``"slide"`` (overlapping ``crop_size``
    windows moved by ``stride``, logits averaged where windows overlap), for images larger than the
    training crops. ``eval_scale`` resizes the images before inference (the logits are still scored
    against the full-resolution labels). The teacher may run at another input size or normalisation
    through ``teacher_input`` (e.g. :class:`lightningkd.teacher.Renormalize` with ``size``).

    Args:
        student: segmentation model returning ``(N, num_classes, h, w)`` logits.
        teacher: frozen segmentation model with the same classes, or ``None`` (no distillation).
        distillers: see :class:`~lightningkd.modules.base.DistillationModule`.
        num_classes: number of classes.
        ignore_index: label value excluded from the loss and the metrics.
        aux_layer: name of an auxiliary head of the student (``aux_classifier`` in torchvision models,
            ``auxiliary_head`` in mmsegmentation ones) whose logits get their own cross-entropy, or a
            list of names for models with several (``auxiliary_head.0``, ``auxiliary_head.1``, ... in
            BiSeNetV2 and STDC).
        aux_weight: weight of each auxiliary loss (0.4 in PSPNet, DeepLabV3 and mmsegmentation configs).
        inference: ``"whole"`` or ``"slide"``.
        crop_size: ``(height, width)`` of the sliding windows.
        stride: ``(height, width)`` step of the sliding windows (defaults to 2/3 of ``crop_size``).
        eval_scale: factor applied to the image size before inference (1.0: as loaded).
        class_names: names for the per-class IoU logs; taken from the datamodule's ``classes`` when
            omitted.
        task_weight: see :class:`~lightningkd.modules.base.DistillationModule`.
        optimizer: see :class:`~lightningkd.modules.base.DistillationModule`.
        lr_scheduler: see :class:`~lightningkd.modules.base.DistillationModule`.
        lr_scheduler_interval: see :class:`~lightningkd.modules.base.DistillationModule`.
        teacher_input: see :class:`~lightningkd.modules.base.DistillationModule`.
        channels_last: see :class:`~lightningkd.modules.base.DistillationModule`.
        compile_student: see :class:`~lightningkd.modules.base.DistillationModule`.
        compile_teacher: see :class:`~lightningkd.modules.base.DistillationModule`.
        on_nonfinite: see :class:`~lightningkd.modules.base.DistillationModule`.

    Example:
        >>> import torch.nn as nn
        >>> from lightningkd.distillers import KD
        >>> net = lambda: nn.Conv2d(3, 4, 1)
        >>> module = SegmentationDistillationModule(net(), net(), num_classes=4)
        >>> module.predict_logits(torch.zeros(2, 3, 8, 8), size=(16, 16)).shape
        torch.Size([2, 4, 16, 16])
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        distillers: Sequence[Distiller] = (),
        num_classes: int = 19,
        ignore_index: int = 255,
        aux_layer: str | list[str] | None = None,
        aux_weight: float = 0.4,
        inference: Literal["whole", "slide"] = "whole",
        crop_size: tuple[int, int] | None = None,
        stride: tuple[int, int] | None = None,
        eval_scale: float = 1.0,
        class_names: list[str] | None = None,
        task_weight: float = 1.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        teacher_input: nn.Module | None = None,
        channels_last: bool = False,
        compile_student: bool = False,
        compile_teacher: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        super().__init__(
            student,
            teacher,
            distillers,
            task_weight=task_weight,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            lr_scheduler_interval=lr_scheduler_interval,
            teacher_input=teacher_input,
            channels_last=channels_last,
            compile_student=compile_student,
            compile_teacher=compile_teacher,
            on_nonfinite=on_nonfinite,
            extra_student_layers=_names(aux_layer),
        )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} is a class index (num_classes={num_classes}): "
                "use a value outside 0..num_classes-1 (255 in most sets, 11 in CamVid)."
            )
        if inference not in ("whole", "slide"):
            raise ValueError(f"inference must be 'whole' or 'slide', got {inference!r}.")
        if inference == "slide" and crop_size is None:
            raise ValueError("inference='slide' needs crop_size=(height, width) of the windows.")
        if eval_scale <= 0:
            raise ValueError(f"eval_scale must be > 0, got {eval_scale}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aux_layers = _names(aux_layer)
        self.aux_weight = float(aux_weight)
        self.inference = inference
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        if stride is None and self.crop_size is not None:
            stride = (max(1, self.crop_size[0] * 2 // 3), max(1, self.crop_size[1] * 2 // 3))
        self.stride = tuple(stride) if stride is not None else None
        self.eval_scale = float(eval_scale)
        self.class_names = list(class_names) if class_names is not None else None
        for stage in ("val", "test"):
            for who in ("student", "teacher"):
                setattr(
                    self,
                    f"{stage}_{who}_confusion",
                    MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index),
                )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.class_names is None:
            names = getattr(getattr(self.trainer, "datamodule", None), "classes", None)
            if names is not None and len(names) == self.num_classes:
                self.class_names = list(names)

    # ---- training -----------------------------------------------------------------------------------
    def task_loss(self, student_output: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return self._pixel_cross_entropy(student_output, batch["target"], "student")

    def task_loss_from_features(self, student: Features, batch: Mapping[str, Any]) -> Tensor:
        loss = self.task_loss(student[OUTPUT], batch)
        for name in self.aux_layers:
            if name not in student:
                raise RuntimeError(
                    f"aux_layer {name!r} did not run in the student's forward pass: name the auxiliary "
                    "head the model calls in training mode, or set aux_layer to null."
                )
            loss = loss + self.aux_weight * self._pixel_cross_entropy(
                student[name], batch["target"], f"auxiliary head {name!r}"
            )
        return loss

    def _pixel_cross_entropy(self, logits: Any, target: Tensor, who: str) -> Tensor:
        logits = model_logits(logits)
        if logits.ndim != 4 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"The {who} returned logits of shape {tuple(logits.shape)}, expected (N, {self.num_classes}, h, w): "
                "check num_classes of the model and of the module."
            )
        if target.ndim != 3 or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"Segmentation targets must be (N, H, W) class indices matching the batch of logits "
                f"{tuple(logits.shape)}, got {tuple(target.shape)}."
            )
        logits = resize(logits, target.shape[-2:])
        return F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)

    # ---- inference ----------------------------------------------------------------------------------
    def predict_logits(
        self, images: Tensor, model: nn.Module | None = None, size: Sequence[int] | None = None
    ) -> Tensor:
        """Logits of ``model`` (the student by default) for ``images``, resized to ``size``.

        Applies ``eval_scale`` and the whole-image or sliding-window inference of this module.
        """
        model = self.student if model is None else model
        size = tuple(size) if size is not None else tuple(images.shape[-2:])
        if self.eval_scale != 1.0:
            scaled = [max(1, round(s * self.eval_scale)) for s in images.shape[-2:]]
            images = F.interpolate(images, size=scaled, mode="bilinear", align_corners=False)
        images = self.prepare_images(images)
        if self.inference == "whole":
            logits = resize(model_logits(model(images)), images.shape[-2:])
        else:
            logits = self._slide(model, images)
        return resize(logits, size)

    def _slide(self, model: nn.Module, images: Tensor) -> Tensor:
        assert self.crop_size is not None and self.stride is not None
        (height, width), (crop_h, crop_w), (step_h, step_w) = images.shape[-2:], self.crop_size, self.stride
        rows = max(math.ceil((height - crop_h) / step_h), 0) + 1
        cols = max(math.ceil((width - crop_w) / step_w), 0) + 1
        total = images.new_zeros((images.shape[0], self.num_classes, height, width), dtype=torch.float32)
        count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
        for r in range(rows):
            for c in range(cols):
                # windows are shifted back inside the image at the far edges, as in mmsegmentation
                y1 = max(min(r * step_h, height - crop_h), 0)
                x1 = max(min(c * step_w, width - crop_w), 0)
                y2, x2 = min(y1 + crop_h, height), min(x1 + crop_w, width)
                window = images[..., y1:y2, x1:x2]
                total[..., y1:y2, x1:x2] += resize(model_logits(model(window)), window.shape[-2:]).float()
                count[..., y1:y2, x1:x2] += 1
        return total / count

    def forward(self, images: Tensor) -> Tensor:
        return self.predict_logits(images)

    # ---- evaluation ---------------------------------------------------------------------------------
    def _evaluate(self, batch: Any, stage: str) -> None:
        batch = self.unpack_batch(batch)
        images, target = batch["image"], batch["target"]
        self.check_labels(target, f"in a {stage} batch")
        size = images.shape[0]
        logits = self.predict_logits(images, size=target.shape[-2:])
        loss = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
        self.log(f"{stage}/loss", loss, batch_size=size, sync_dist=True)
        getattr(self, f"{stage}_student_confusion").update(logits.argmax(1), target)
        if self.teacher_due(stage):
            teacher_logits = self.teacher_logits(images, size=target.shape[-2:])
            getattr(self, f"{stage}_teacher_confusion").update(teacher_logits.argmax(1), target)

    def log_epoch_metrics(self, stage: str) -> None:
        student = getattr(self, f"{stage}_student_confusion")
        if self.trainer.sanity_checking:
            student.reset()
            return
        self._log_scores(student, stage, per_class=True)
        if self.teacher_due(stage):
            self._log_scores(getattr(self, f"{stage}_teacher_confusion"), f"{stage}/teacher", per_class=False)

    def _log_scores(self, confusion: MulticlassConfusionMatrix, prefix: str, per_class: bool) -> None:
        scores = segmentation_scores(confusion.compute())
        confusion.reset()
        if prefix.endswith("teacher"):
            stage = prefix.split("/")[0]
            self.log(f"{stage}/teacher_mIoU", scores["mIoU"])
            self.log(f"{stage}/teacher_aAcc", scores["aAcc"])
            return
        self.log(f"{prefix}/mIoU", scores["mIoU"], prog_bar=True)
        self.log(f"{prefix}/aAcc", scores["aAcc"])
        if per_class:
            names = self.class_names or [str(i) for i in range(self.num_classes)]
            for name, iou in zip(names, scores["iou"].tolist()):
                if not math.isnan(iou):
                    self.log(f"{prefix}/iou/{name}", iou)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = self.batch_images(batch)
        return self.predict_logits(images).argmax(1)


def segmentation_scores(confusion: Tensor) -> dict[str, Tensor]:
    """Per-class IoU, mIoU and pixel accuracy from a confusion matrix (rows: labels, columns: predictions).

    A class absent from both the labels and the predictions has an undefined IoU (NaN) and is left out
    of the mean, as in mmsegmentation's ``IoUMetric``.

    Example:
        >>> scores = segmentation_scores(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
        >>> [round(v, 4) for v in scores["iou"][:2].tolist()], round(scores["mIoU"].item(), 4)
        ([0.75, 0.6667], 0.7083)
    """
    confusion = confusion.double()
    intersection = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = intersection / union  # 0/0 -> NaN for classes absent everywhere
    return {
        "iou": iou,
        "mIoU": iou.nanmean(),
        "aAcc": intersection.sum() / confusion.sum().clamp_min(1),
    }


def _names(layers: str | Sequence[str] | None) -> list[str]:
    if layers is None:
        return []
    return [layers] if isinstance(layers, str) else list(layers)


def resize(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``(N, C, h, w)`` maps to ``size`` (no-op when already that size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
