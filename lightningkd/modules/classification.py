"""Classification distillation: cross-entropy task loss, top-1/top-5 accuracy for student and teacher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightningkd.distillers.base import Distiller
from lightningkd.modules.base import DistillationModule, default_optimizer, model_logits


class ClassificationDistillationModule(DistillationModule):
    """Distil an image classifier.

    Task loss: cross-entropy with optional label smoothing. Validation and test log ``val/acc1``,
    ``val/acc5`` and ``val/loss`` of the student, and once (first real validation epoch)
    ``val/teacher_acc1`` / ``val/teacher_acc5`` for reference. ``predict`` returns class probabilities.

    Args:
        student: classifier returning ``(N, num_classes)`` logits.
        teacher: frozen classifier (same classes), or ``None`` to train without distillation.
        distillers: see :class:`~lightningkd.modules.base.DistillationModule`.
        num_classes: number of classes, for the metrics.
        label_smoothing: cross-entropy label smoothing (0 disables it).
        task_weight: see :class:`~lightningkd.modules.base.DistillationModule`.
        optimizer: see :class:`~lightningkd.modules.base.DistillationModule`.
        lr_scheduler: see :class:`~lightningkd.modules.base.DistillationModule`.
        lr_scheduler_interval: see :class:`~lightningkd.modules.base.DistillationModule`.
        teacher_input: see :class:`~lightningkd.modules.base.DistillationModule`.
        channels_last: see :class:`~lightningkd.modules.base.DistillationModule`.
        compile_student: see :class:`~lightningkd.modules.base.DistillationModule`.
        compile_teacher: see :class:`~lightningkd.modules.base.DistillationModule`.
        on_nonfinite: see :class:`~lightningkd.modules.base.DistillationModule`.
        teacher_cache: see :class:`~lightningkd.modules.base.DistillationModule`.

    Example:
        >>> import torch.nn as nn
        >>> from lightningkd.distillers import KD
        >>> student, teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> module = ClassificationDistillationModule(student, teacher, [KD(temperature=4.0)], num_classes=3)
        >>> [d.name for d in module.distillers]
        ['kd']
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        distillers: Sequence[Distiller] = (),
        num_classes: int = 1000,
        label_smoothing: float = 0.0,
        task_weight: float = 1.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        teacher_input: nn.Module | None = None,
        channels_last: bool = False,
        compile_student: bool = False,
        compile_teacher: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
        teacher_cache: str | None = None,
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
            teacher_cache=teacher_cache,
        )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        top_k = min(5, num_classes)
        self.top_k = top_k
        for stage in ("val", "test"):
            for who in ("student", "teacher"):
                setattr(
                    self, f"{stage}_{who}_acc1", MulticlassAccuracy(num_classes, top_k=1, average="micro")
                )
                setattr(
                    self,
                    f"{stage}_{who}_acc{top_k}",
                    MulticlassAccuracy(num_classes, top_k=top_k, average="micro"),
                )

    def task_loss(self, student_output: Tensor, batch: Mapping[str, Any]) -> Tensor:
        logits = model_logits(student_output)
        target = batch["target"]
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"The student returned logits of shape {tuple(logits.shape)}, expected (N, {self.num_classes}): "
                "check num_classes of the model and of the module."
            )
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)

    def forward(self, images: Tensor) -> Tensor:
        return model_logits(self.student(self.prepare_images(images)))

    def _evaluate(self, batch: Any, stage: str) -> None:
        batch = self.unpack_batch(batch)
        images, target = batch["image"], batch["target"]
        self.check_labels(target, f"in a {stage} batch")
        logits = self.predict_logits(images)
        size = images.shape[0]
        self.log(f"{stage}/loss", F.cross_entropy(logits, target), batch_size=size, sync_dist=True)
        for k in (1, self.top_k):
            metric = getattr(self, f"{stage}_student_acc{k}")
            metric(logits, target)
            self.log(f"{stage}/acc{k}", metric, prog_bar=(k == 1), batch_size=size)
        if self.teacher_due(stage):
            teacher_logits = self.teacher_logits(images)
            for k in (1, self.top_k):
                metric = getattr(self, f"{stage}_teacher_acc{k}")
                metric(teacher_logits, target)
                self.log(f"{stage}/teacher_acc{k}", metric, batch_size=size)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = self.batch_images(batch)
        return self(images).softmax(dim=1)
