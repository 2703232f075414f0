"""The distillation LightningModule: a frozen teacher, a trainable student and a list of distillers."""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightningkd.distillers.base import OUTPUT, Distiller, Features
from lightningkd.taps import FeatureTap

TEACHER_PREFIX = "teacher."


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


class DistillationModule(L.LightningModule, abc.ABC):
    """Wire a student, a frozen teacher and distillers into one Lightning training loop.

    The total loss is ``task_weight * task_loss + sum(d.weight * d.scale * d(student, teacher, batch))``.
    Every term is logged raw (``train/kd/<name>``) and weighted (``train/kd/<name>_weighted``) beside
    ``train/task_loss`` and ``train/loss``.

    The teacher is frozen (``requires_grad_(False)``), kept in eval mode by :meth:`train`, run under
    ``torch.no_grad()`` and never given to the optimizer. It is left out of checkpoints: on resume the
    teacher built from the recipe (with its own weights) is used. With no distillers the teacher may be
    ``None``: that is how a teacher, or a student baseline, is trained.

    Subclasses (one per task) implement :meth:`task_loss` and the metrics.

    Args:
        student: the model to train.
        teacher: the model to distil from (frozen here), or ``None`` when ``distillers`` is empty.
        distillers: distillation losses; their adapters are trained with the student.
        task_weight: weight of the task loss (e.g. 0.1 for CIFAR KD in mdistiller).
        optimizer: callable building the optimizer from the trainable parameters (LightningCLI fills it
            from ``optimizer:`` in a recipe).
        lr_scheduler: optional callable building a scheduler from the optimizer.
        lr_scheduler_interval: ``"epoch"`` or ``"step"``: when the scheduler steps.
        teacher_input: optional module applied to the batch images before the teacher (e.g.
            :class:`lightningkd.teacher.Renormalize` when the teacher was trained with other statistics or
            another resolution). Computed once per batch.
        channels_last: run both models in channels-last memory format (faster convolutions on GPUs).
        extra_student_layers: student layers a task module taps for itself (e.g. an auxiliary head).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        distillers: Sequence[Distiller] = (),
        task_weight: float = 1.0,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: str = "epoch",
        teacher_input: nn.Module | None = None,
        channels_last: bool = False,
        extra_student_layers: Sequence[str] = (),
    ) -> None:
        super().__init__()
        distillers = list(distillers)
        for d in distillers:
            if not isinstance(d, Distiller):
                raise TypeError(f"distillers must be Distiller instances, got {type(d).__name__}.")
        if distillers and teacher is None:
            raise ValueError("Distillers were given but no teacher: pass teacher=... or drop the distillers.")
        if teacher is not None and teacher is student:
            raise ValueError("The teacher and the student are the same module object: build two models.")
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}."
            )
        _deduplicate_names(distillers)

        self.student = student
        self.teacher = teacher
        self.distillers = nn.ModuleList(distillers)
        self.task_weight = float(task_weight)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.teacher_input = teacher_input
        self.channels_last = channels_last
        self.teacher_validated = False

        self.student_tap = FeatureTap(
            student, [*extra_student_layers, *(n for d in distillers for n in d.student_layers)]
        )
        self.teacher_tap = (
            FeatureTap(teacher, [n for d in distillers for n in d.teacher_layers])
            if teacher is not None
            else None
        )
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        if channels_last:
            self.to(memory_format=torch.channels_last)

    # ---- the frozen teacher -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    def teacher_features(self, images: Tensor) -> Features:
        """Run the teacher (under no_grad unless a distiller needs its graph) and return its features."""
        assert self.teacher_tap is not None
        if self.teacher_input is not None:
            images = self.teacher_input(images)
        if any(d.needs_teacher_grad for d in self.distillers):
            return self.teacher_tap(images)
        with torch.no_grad():
            return self.teacher_tap(images)

    def student_features(self, images: Tensor) -> Features:
        return self.student_tap(images)

    # ---- task hooks for subclasses ------------------------------------------------------------------
    def unpack_batch(self, batch: Any) -> dict[str, Any]:
        """Turn a data-loader batch into ``{"image": ..., "target": ...}`` (tuples or dicts accepted)."""
        if isinstance(batch, Mapping):
            if "image" not in batch:
                raise KeyError(f"A dict batch needs an 'image' key; got keys {sorted(batch)}.")
            return dict(batch)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return {"image": batch[0], "target": batch[1]}
        raise TypeError(
            "Expected a batch (images, targets) or a dict with 'image' and 'target', "
            f"got {type(batch).__name__}."
        )

    @staticmethod
    def batch_images(batch: Any) -> Tensor:
        """The images of a predict batch: a dict's ``"image"``, a tuple's first item, or the tensor itself."""
        if isinstance(batch, Mapping):
            return batch["image"]
        if isinstance(batch, (list, tuple)):
            return batch[0]
        return batch

    def teacher_due(self, stage: str) -> bool:
        """Whether to score the teacher now: every test, and the first real validation only."""
        if self.teacher is None or self.trainer.sanity_checking:
            return False
        return stage == "test" or not self.teacher_validated

    def prepare_images(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    @abc.abstractmethod
    def task_loss(self, student_output: Any, batch: Mapping[str, Any]) -> Tensor:
        """The supervised loss of the student on the ground truth."""

    def task_loss_from_features(self, student: Features, batch: Mapping[str, Any]) -> Tensor:
        """The task loss from all tapped student features; override to use more than the output."""
        return self.task_loss(student[OUTPUT], batch)

    # ---- training -----------------------------------------------------------------------------------
    def distillation_losses(
        self, student: Features, teacher: Features, batch: Mapping[str, Any]
    ) -> dict[str, Tensor]:
        return {d.name: d(student, teacher, batch) for d in self.distillers}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        batch = self.unpack_batch(batch)
        images = self.prepare_images(batch["image"])
        student = self.student_features(images)
        task = self.task_loss_from_features(student, batch)
        total = self.task_weight * task
        size = images.shape[0]
        self.log("train/task_loss", task, batch_size=size)
        if len(self.distillers):
            teacher = self.teacher_features(images)
            for d, (name, raw) in zip(
                self.distillers, self.distillation_losses(student, teacher, batch).items()
            ):
                weighted = d.weight * d.scale * raw
                total = total + weighted
                self.log(f"train/kd/{name}", raw, batch_size=size)
                self.log(f"train/kd/{name}_weighted", weighted, batch_size=size)
        self.log("train/loss", total, prog_bar=True, batch_size=size)
        return total

    # ---- optimisation -------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student and distiller (adapter) parameters; never the teacher's."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.distillers.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval},
        }

    # ---- checkpoints: student + adapters, never the teacher -----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]
        checkpoint["lightningkd"] = {"teacher_validated": self.teacher_validated}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the teacher comes from the recipe, not the checkpoint: put its current weights back in so
        # strict loading still checks every student and adapter key
        if self.teacher is not None:
            for key, value in self.teacher.state_dict().items():
                checkpoint["state_dict"].setdefault(TEACHER_PREFIX + key, value)
        self.teacher_validated = checkpoint.get("lightningkd", {}).get("teacher_validated", False)


def model_logits(output: Any) -> Tensor:
    """Logits from a model output: a tensor, the first item of a tuple (some timm models), or the ``"out"``
    entry of a dict (torchvision segmentation models)."""
    if isinstance(output, Mapping):
        if "out" not in output:
            raise KeyError(
                f"A dict model output needs an 'out' entry with the logits; got keys {sorted(output)}."
            )
        return output["out"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _deduplicate_names(distillers: Sequence[Distiller]) -> None:
    seen: dict[str, int] = {}
    for d in distillers:
        count = seen.get(d.name, 0)
        seen[d.name] = count + 1
        if count:
            d.name = f"{d.name}_{count}"
