"""The distillation LightningModule: a frozen teacher, a trainable student and a list of distillers."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightningkd.checkpoint_io import describe_key_mismatch
from lightningkd.distillers.base import Distiller, sum_terms
from lightningkd.taps import OUTPUT, Features, FeatureTap
from lightningkd.teacher_cache import TeacherCache, expected_hit_rate, teacher_fingerprint

TEACHER_PREFIX = "teacher."
# consecutive skipped steps after which on_nonfinite="skip" gives up: the weights no longer change, so every
# later step would be skipped too
MAX_CONSECUTIVE_SKIPS = 20


class NonFiniteError(FloatingPointError):
    """A loss term, a model output or a weight became NaN or infinite."""


class LabelRangeError(ValueError):
    """A batch holds class labels outside ``0..num_classes-1`` (other than the ignore index)."""


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


class DistillationModule(L.LightningModule, abc.ABC):
    """Wire a student, a frozen teacher and distillers into one Lightning training loop.

    The total loss is ``task_weight * task_loss + sum(d.weight * d.scale * d(student, teacher, batch))``.
    Every term is logged raw (``train/kd/<name>``, and ``train/kd/<name>/<term>`` for the parts of a
    multi-term distiller, see :meth:`~lightningkd.distillers.base.Distiller.terms`) and weighted
    (``train/kd/<name>_weighted``) beside ``train/task_loss`` and ``train/loss``, at the Trainer's logging
    interval (``log_every_n_steps``): logging every step would cost more than a small model's step.

    The teacher is frozen (``requires_grad_(False)``), kept in eval mode by :meth:`train`, run under
    ``torch.no_grad()`` and never given to the optimizer. It is left out of checkpoints: on resume the
    teacher built from the recipe (with its own weights) is used. With no distillers the teacher may be
    ``None``: that is how a teacher, or a student baseline, is trained. Each distiller gets the frozen
    teacher once through :meth:`~lightningkd.distillers.base.Distiller.attach_teacher` (ScaleKD runs the
    teacher's later stages on student-derived features, with autograd on, so gradients pass through the
    frozen stages to the student while no teacher parameter gets one).

    Faults stop the run where they appear, with the cause named: class labels outside ``0..num_classes-1``
    (:class:`LabelRangeError`); a NaN or infinite loss term (:class:`NonFiniteError` naming the term, the
    step and whether the student's or the teacher's output is non-finite; ``on_nonfinite="skip"`` skips
    such steps instead); non-finite teacher or student weights when a run starts, or non-finite teacher
    outputs in its first validation; and a checkpoint is never written with non-finite weights.

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
        compile_student: run the student's forward in training steps through ``torch.compile`` (default
            options), compiled at the first training step (a recompilation follows for a new input shape,
            e.g. a smaller last batch). The taps' hooks are traced into the graph, so feature distillers
            read the same features. Only the calls through the tap are compiled: the ``student`` module
            itself is unchanged, so ``state_dict`` keys, checkpoints, evaluation (eager), prediction and
            export are those of the plain model. A model that cannot compile stops the first step with a
            :class:`~lightningkd.taps.ModelCompileError` naming it; set this to false to run it eagerly.
        compile_teacher: the same for the teacher's forward in training steps (its evaluation runs once
            per run, eagerly).
        extra_student_layers: student layers a task module taps for itself (e.g. an auxiliary head).
        on_nonfinite: ``"stop"`` (raise :class:`NonFiniteError` at the first non-finite loss) or ``"skip"``
            (skip that optimizer step with a warning; the run still stops after
            ``MAX_CONSECUTIVE_SKIPS`` skipped steps in a row).
        teacher_cache: a teacher-output cache folder written by ``lightningkd cache`` (see
            :mod:`lightningkd.teacher_cache`): training reads the teacher's outputs from it by the batch's
            ``key`` instead of running the teacher (inputs not in the cache still run it). The datamodule
            must have ``replays`` set; a cache written for another teacher, data set, augmentation or
            replay seed is refused when fitting starts, with what differs.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        distillers: Sequence[Distiller] = (),
        task_weight: float = 1.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        teacher_input: nn.Module | None = None,
        channels_last: bool = False,
        compile_student: bool = False,
        compile_teacher: bool = False,
        extra_student_layers: Sequence[str] = (),
        on_nonfinite: Literal["stop", "skip"] = "stop",
        teacher_cache: str | None = None,
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
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}.")
        _deduplicate_names(distillers)
        if teacher_cache is not None:
            _check_cacheable(teacher, distillers)

        self.student = student
        self.teacher = teacher
        self.distillers = nn.ModuleList(distillers)
        self.task_weight = float(task_weight)
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.teacher_input = teacher_input
        self.channels_last = channels_last
        self.on_nonfinite = on_nonfinite
        self.teacher_validated = False
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self.teacher_cache_path = teacher_cache
        self.teacher_cache: TeacherCache | None = None  # opened and checked when fitting starts

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
            for d in distillers:  # after freezing: e.g. ScaleKD looks up the teacher stages it runs
                d.attach_teacher(teacher)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile_teacher and self.teacher_tap is None:
            raise ValueError("compile_teacher was set but there is no teacher: drop compile_teacher.")
        self.compile_student = compile_student
        self.compile_teacher = compile_teacher
        if compile_student:  # lazy: compiled at the first training step, after every tap is in place
            self.student_tap.compile("the student", _eager_hint("student"))
        if compile_teacher and self.teacher_tap is not None:
            self.teacher_tap.compile("the teacher", _eager_hint("teacher"))

    # ---- the frozen teacher -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    def teacher_features(self, images: Tensor, batch: Mapping[str, Any] | None = None) -> Features:
        """Run the teacher (under no_grad unless a distiller needs its graph) and return its features.

        ``batch`` (the unpacked training batch) is for tasks whose models read more than the images.
        """
        assert self.teacher_tap is not None
        if self.teacher_cache is not None and self.training:
            return self._cached_teacher_features(images, batch)
        return self._run_teacher(images)

    def _run_teacher(self, images: Tensor) -> Features:
        assert self.teacher_tap is not None
        if self.teacher_input is not None:
            images = self.teacher_input(images)
        if any(d.needs_teacher_grad for d in self.distillers):
            return self.teacher_tap(images)
        with torch.no_grad():
            return self.teacher_tap(images)

    def distilled_teacher_layers(self) -> list[str]:
        """The teacher layers the distillers read (``"output"`` for the logits), sorted."""
        return sorted({name for d in self.distillers for name in d.teacher_layers})

    def _cached_teacher_features(self, images: Tensor, batch: Mapping[str, Any] | None) -> Features:
        """The teacher layers the distillers read, from the cache by key; cache misses run the teacher."""
        assert self.teacher_cache is not None
        keys = None if batch is None else batch.get("key")
        if keys is None:
            raise ValueError(
                "teacher_cache is set but the training batches carry no 'key': set data.init_args.replays "
                "(the value the cache was written with) so that every batch names its exact inputs."
            )
        hit, rows = self.teacher_cache.lookup(keys)
        layers = self.distilled_teacher_layers()
        if self.log_due():
            self.log("train/teacher_cache_hit_rate", len(rows) / len(keys), batch_size=len(keys))
        if len(rows) == len(keys):
            return {name: self.teacher_cache.read(name, rows, images.device) for name in layers}
        ran = self._run_teacher(images[~hit])
        features: Features = {}
        for name in layers:
            computed = ran[name].float()
            value = computed.new_empty((len(keys), *computed.shape[1:]))
            value[~hit] = computed
            if len(rows):
                value[hit] = self.teacher_cache.read(name, rows, images.device)
            features[name] = value
        return features

    def student_features(self, images: Tensor, batch: Mapping[str, Any] | None = None) -> Features:
        """Run the student through its tap; ``batch`` is for tasks whose models also read the targets."""
        return self.student_tap(images)

    # ---- evaluation: one path for the student and the teacher ---------------------------------------
    def predict_logits(self, images: Tensor, model: nn.Module | None = None) -> Tensor:
        """Evaluation logits of ``model`` (the student by default) for ``images``; tasks may override."""
        model = self.student if model is None else model
        return model_logits(model(self.prepare_images(images)))

    @torch.no_grad()
    def teacher_logits(self, images: Tensor, **kwargs: Any) -> Tensor:
        """The teacher's evaluation logits: ``teacher_input`` applied once, then :meth:`predict_logits`.

        The teacher is scored the same way as the student (sliding windows, ``eval_scale`` ... are
        forwarded through ``kwargs``). Outputs are checked while the teacher has not been scored yet: a
        non-finite output then raises :class:`NonFiniteError` naming the teacher as the cause.
        """
        assert self.teacher is not None
        if self.teacher_input is not None:
            images = self.teacher_input(images)
        logits = self.predict_logits(images, model=self.teacher, **kwargs)
        if not self.teacher_validated and not bool(torch.isfinite(logits).all()):
            raise NonFiniteError(
                f"The teacher ({type(self.teacher).__name__}) returned NaN or infinite logits on a "
                "validation batch, although its weights are finite: the teacher is the cause, not the "
                "student. Check its checkpoint (the model it was trained as), teacher_input (normalisation, "
                "resolution) and the precision it runs in (fp16 overflows more easily than bf16)."
            )
        return logits

    def teacher_due(self, stage: str) -> bool:
        """Whether to score the teacher now: every test, and the first real validation only."""
        if self.teacher is None or self.trainer.sanity_checking:
            return False
        return stage == "test" or not self.teacher_validated

    def log_epoch_metrics(self, stage: str) -> None:
        """Task hook: log what the epoch accumulated (metrics that are not logged per batch)."""

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")
        if self.teacher_due("val"):
            self.teacher_validated = True  # the one place that marks the teacher as scored

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

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

    def prepare_images(self, images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    @abc.abstractmethod
    def task_loss(self, student_output: Any, batch: Mapping[str, Any]) -> Tensor:
        """The supervised loss of the student on the ground truth."""

    def task_loss_from_features(self, student: Features, batch: Mapping[str, Any]) -> Tensor:
        """The task loss from all tapped student features; override to use more than the output."""
        return self.task_loss(student[OUTPUT], batch)

    # ---- labels -------------------------------------------------------------------------------------
    def label_bounds(self) -> tuple[int, int | None] | None:
        """``(num_classes, ignore_index or None)`` of integer class labels to check, or ``None`` (no check)."""
        num_classes = getattr(self, "num_classes", None)
        return None if num_classes is None else (int(num_classes), getattr(self, "ignore_index", None))

    def _invalid_labels(self, target: Any) -> Tensor | None:
        """Boolean mask of labels outside ``0..num_classes-1`` and not the ignore index (no device sync)."""
        bounds = self.label_bounds()
        if bounds is None or not torch.is_tensor(target) or target.is_floating_point():
            return None
        num_classes, ignore = bounds
        invalid = (target < 0) | (target >= num_classes)
        return invalid & (target != ignore) if ignore is not None else invalid

    def check_labels(self, target: Any, where: str) -> None:
        """Raise :class:`LabelRangeError` when ``target`` holds a class label out of range."""
        invalid = self._invalid_labels(target)
        if invalid is not None and bool(invalid.any()):
            raise self._label_error(target, invalid, where)

    def _label_error(self, target: Tensor, invalid: Tensor, where: str) -> LabelRangeError:
        num_classes, ignore = self.label_bounds()  # type: ignore[misc]
        bad = target[invalid]
        values = sorted({int(v) for v in bad.unique()[:8]})
        ignore_text = f"ignore_index is {ignore}" if ignore is not None else "there is no ignore index"
        data = getattr(getattr(self._trainer, "datamodule", None), "num_classes", None)
        data_text = f" (the datamodule has {data} classes)" if data is not None else ""
        return LabelRangeError(
            f"Class labels out of range {where}: {bad.numel()} label(s) outside 0..{num_classes - 1}, the "
            f"largest {int(bad.max())}, the smallest {int(bad.min())} (values {values}); num_classes is "
            f"{num_classes} and {ignore_text}. Set num_classes of the module and of the models to the data "
            f"set's class count{data_text}, or fix the label encoding of the data (e.g. masks saved as "
            "colours or with another ignore value)."
        )

    # ---- training -----------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        batch = self.unpack_batch(batch)
        images = self.prepare_images(batch["image"])
        raw_target = batch.get("target")
        invalid = self._invalid_labels(raw_target)
        if invalid is not None:
            # out-of-range labels become the ignore value so the losses cannot hit a device assert; the
            # check below then stops the run with the real labels named
            _, ignore = self.label_bounds()  # type: ignore[misc]
            batch["target"] = raw_target.masked_fill(invalid, -100 if ignore is None else ignore)
            invalid = invalid.any()

        student = self.student_features(images, batch)
        task = self.task_loss_from_features(student, batch)
        total = self.task_weight * task
        parts: list[tuple[Distiller, dict[str, Tensor], Tensor]] = []
        teacher: Features | None = None
        if len(self.distillers):
            teacher = self.teacher_features(images, batch)
            for d in self.distillers:
                terms = d.terms(student, teacher, batch)
                raw = sum_terms(terms)
                parts.append((d, terms, raw))
                total = total + (d.weight * d.scale) * raw

        healthy = torch.isfinite(total)
        if invalid is not None:
            healthy = healthy & ~invalid
        if not self._all_ranks(bool(healthy)):  # one device sync per step
            if invalid is not None and bool(invalid):
                raise self._label_error(raw_target, self._invalid_labels(raw_target), "in a training batch")
            return self._non_finite_step(task, parts, student, teacher, batch_idx)
        self._consecutive_skips = 0

        if self.log_due():
            size = len(images)  # a batch tensor, or a list of images (detection)
            self.log("train/task_loss", task, batch_size=size)
            for d, terms, raw in parts:
                self.log(f"train/kd/{d.name}", raw, batch_size=size)
                self.log(f"train/kd/{d.name}_weighted", d.weight * d.scale * raw, batch_size=size)
                if len(terms) > 1:
                    for term, value in terms.items():
                        self.log(f"train/kd/{d.name}/{term}", value, batch_size=size)
            self.log("train/loss", total, prog_bar=True, batch_size=size)
        return total

    def log_due(self) -> bool:
        """Whether this training step falls on the Trainer's logging interval (never, outside a Trainer)."""
        trainer = self._trainer
        if trainer is None:
            return False
        return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)

    def _all_ranks(self, ok: bool) -> bool:
        """``ok`` on every process (one collective under multi-process strategies, none otherwise)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return ok
        return bool(trainer.strategy.reduce_boolean_decision(ok, all=True))

    def _non_finite_step(
        self,
        task: Tensor,
        parts: list[tuple[Distiller, dict[str, Tensor], Tensor]],
        student: Features,
        teacher: Features | None,
        batch_idx: int,
    ) -> None:
        """Name the non-finite terms and their likely cause; raise, or skip the step."""
        bad = [] if bool(torch.isfinite(task)) else [f"task loss = {task.item():.4g}"]
        for d, terms, raw in parts:
            if not bool(torch.isfinite(raw)):
                detail = (
                    ", ".join(f"{k} = {v.item():.4g}" for k, v in terms.items()) if len(terms) > 1 else ""
                )
                bad.append(f"distiller {d.name!r} = {raw.item():.4g}" + (f" ({detail})" if detail else ""))
        if not bad:
            bad.append("the weighted total (a weight or warm-up scale is non-finite)")
        where = f"at step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        causes = []
        if teacher is not None and not _features_finite(teacher):
            causes.append(
                "the teacher's outputs are non-finite: the teacher is the cause (check its checkpoint, "
                "teacher_input and precision)"
            )
        if not _features_finite(student):
            causes.append(
                "the student's outputs are non-finite: training diverged (lower the learning rate, clip "
                "gradients with trainer.gradient_clip_val, or warm up the distillation weights)"
            )
        if not causes:
            causes.append(
                "the models' outputs are finite, so a loss overflowed (a very large weight or a very low "
                "temperature; lower the learning rate or clip gradients)"
            )
        message = f"Non-finite loss {where}: {'; '.join(bad)}. Cause: {'; '.join(causes)}."
        if self.on_nonfinite == "skip":
            self.skipped_steps += 1
            self._consecutive_skips += 1
            if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise NonFiniteError(
                    f"{message} {self._consecutive_skips} steps in a row were skipped: the weights no "
                    "longer change, so the run stops."
                )
            rank_zero_warn(f"{message} Skipping this step (on_nonfinite='skip').")
            return None
        raise NonFiniteError(
            f"{message} The run stops here and no checkpoint with non-finite weights is written; "
            "on_nonfinite: skip skips such steps instead."
        )

    # ---- start-up checks ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        for who in ("teacher", "student"):
            model = getattr(self, who)
            if model is not None:
                _check_finite_weights(model, who)
        self._check_datamodule()
        if stage == "fit" and self.teacher_cache_path is not None:
            self.teacher_cache = self._open_teacher_cache()

    def _open_teacher_cache(self) -> TeacherCache:
        """Open ``teacher_cache`` and refuse it unless it fits this teacher, data and augmentation."""
        cache = TeacherCache(self.teacher_cache_path)  # type: ignore[arg-type]
        needed = self.distilled_teacher_layers()
        missing = [name for name in needed if name not in cache.layers]
        if missing:
            raise ValueError(
                f"The distillers read the teacher layers {missing}, which the cache '{cache.folder}' does "
                f"not hold (it has {sorted(cache.layers)}): write it with "
                f"`lightningkd cache ... --layers {' '.join(needed)}`."
            )
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "cache_fingerprint"):
            raise ValueError(
                "teacher_cache needs a classification datamodule with replays (it checks that the cache was "
                "written for the same images and augmentation); pass datamodule=... to Trainer.fit."
            )
        cache.check(teacher_fingerprint(self.teacher, self.teacher_input), datamodule.cache_fingerprint())
        rate = expected_hit_rate(cache.meta["replays"], datamodule.replays)
        if rate < 1.0 and cache.meta["augmented"]:  # unaugmented: every replay is the same input
            rank_zero_warn(
                f"The teacher cache holds {cache.meta['replays']} replays per image but the datamodule draws "
                f"from {datamodule.replays}: about {1 - rate:.0%} of the inputs will run the teacher."
            )
        return cache

    def _check_datamodule(self) -> None:
        """Refuse a datamodule whose classes or ignore index contradict this module's."""
        bounds = self.label_bounds()
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if bounds is None or datamodule is None:
            return
        num_classes, ignore = bounds
        name = type(datamodule).__name__
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes > num_classes:
            raise LabelRangeError(
                f"{name} has {data_classes} classes (labels 0..{data_classes - 1}) but the module's "
                f"num_classes is {num_classes}: set model.init_args.num_classes and the models' num_classes "
                f"to {data_classes}."
            )
        data_ignore = getattr(datamodule, "ignore_index", None)
        if ignore is not None and isinstance(data_ignore, int) and data_ignore != ignore:
            raise LabelRangeError(
                f"{name} marks unlabelled pixels with {data_ignore} but the module's ignore_index is "
                f"{ignore}: set model.init_args.ignore_index to {data_ignore} (and that of the distillers "
                "that take one)."
            )

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
        broken = _non_finite(state.items())
        if broken:
            raise NonFiniteError(
                f"Refusing to write a checkpoint: {len(broken)} weight tensor(s) hold NaN or infinite values "
                f"(e.g. {broken[:5]}). Training diverged before this save; the earlier checkpoints are kept."
            )
        checkpoint["lightningkd"] = {"teacher_validated": self.teacher_validated}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" not in checkpoint:
            # FSDP strategies load (and check, lightningkd.strategies) the weights before this hook runs
            self.teacher_validated = checkpoint.get("lightningkd", {}).get("teacher_validated", False)
            return
        self._check_resumed_state(checkpoint["state_dict"])
        # the teacher comes from the recipe, not the checkpoint: put its current weights back in so
        # strict loading still checks every student and adapter key
        if self.teacher is not None:
            for key, value in self.teacher.state_dict().items():
                checkpoint["state_dict"].setdefault(TEACHER_PREFIX + key, value)
        self.teacher_validated = checkpoint.get("lightningkd", {}).get("teacher_validated", False)

    def _readable(self, key: str) -> str:
        """``distillers.<i>.<rest>`` named by the distiller: ``distillers.<name>.<rest>``."""
        head, _, rest = key.partition(".")
        index, _, tail = rest.partition(".")
        if head == "distillers" and index.isdigit() and int(index) < len(self.distillers):
            return f"distillers.{self.distillers[int(index)].name}.{tail}"
        return key

    def _check_resumed_state(self, saved: Mapping[str, Any], own: Mapping[str, Any] | None = None) -> None:
        """Refuse a checkpoint written by another student or other distillers, saying what changed.

        ``own``: this module's full ``state_dict`` when ``self.state_dict()`` holds shards (FSDP).
        """
        own = self.state_dict() if own is None else own
        own = {k: v for k, v in own.items() if not k.startswith(TEACHER_PREFIX)}
        saved = {k: v for k, v in saved.items() if not k.startswith(TEACHER_PREFIX)}
        missing = [k for k in own if k not in saved]
        unexpected = [k for k in saved if k not in own]
        resized = [
            f"{k}: {tuple(saved[k].shape)} in the file, {tuple(own[k].shape)} here"
            for k in own
            if k in saved and torch.is_tensor(saved[k]) and saved[k].shape != own[k].shape
        ]
        if not (missing or unexpected or resized):
            return
        sections = []
        for part, what in (("student.", "the student architecture"), ("distillers.", "the distillers")):
            part_missing = [self._readable(k)[len(part) :] for k in missing if k.startswith(part)]
            part_unexpected = [k[len(part) :] for k in unexpected if k.startswith(part)]
            part_resized = [k[len(part) :] for k in resized if k.startswith(part)]
            if part_missing or part_unexpected or part_resized:
                lines = [f"{what} changed ({part.rstrip('.')}):"]
                detail = describe_key_mismatch(part_missing, part_unexpected)
                lines += ["  " + line for line in detail.splitlines()]
                lines += [f"  shape differs: {r}" for r in part_resized[:5]]
                sections.append("\n".join(lines))
        others = [k for k in missing + unexpected if not k.startswith(("student.", "distillers."))]
        if others:
            sections.append(f"other keys differ: {others[:5]}")
        raise RuntimeError(
            "The checkpoint does not fit this run: "
            + "\n".join(sections)
            + "\nResume with the recipe that wrote it (same student, same distillers and adapter sizes). To "
            "start a new run from its student weights instead, drop --ckpt_path and set the student's "
            "checkpoint: to the file."
        )


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


def _non_finite(named: Iterable[tuple[str, Any]]) -> list[str]:
    """The names of the floating-point tensors in ``named`` that hold NaN or infinite values."""
    return [
        name
        for name, value in named
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def _features_finite(features: Any) -> bool:
    """Whether every floating-point tensor in ``features`` (nested dicts, lists and tuples) is finite."""
    if torch.is_tensor(features):
        return not _non_finite([("", features)])
    if isinstance(features, Mapping):
        return all(_features_finite(v) for v in features.values())
    if isinstance(features, (tuple, list)):
        return all(_features_finite(v) for v in features)
    return True


def _check_finite_weights(model: nn.Module, who: str) -> None:
    """Refuse a model whose parameters or buffers hold NaN or infinite values, naming them."""
    broken = _non_finite([*model.named_parameters(), *model.named_buffers()])
    if broken:
        raise NonFiniteError(
            f"The {who} ({type(model).__name__}) has NaN or infinite values in {len(broken)} weight tensor(s), "
            f"e.g. {broken[:5]}: its checkpoint is broken (a run that diverged, or a damaged file). "
            f"Point the {who}'s checkpoint at a healthy file."
        )


def _check_cacheable(teacher: nn.Module | None, distillers: Sequence[Distiller]) -> None:
    """Refuse a teacher cache where the teacher must run anyway (its graph, or its layers, are needed)."""
    if teacher is None:
        raise ValueError(
            "teacher_cache was given without a teacher: pass the teacher the cache was written for."
        )
    for d in distillers:
        if d.needs_teacher_grad:
            raise ValueError(
                f"{type(d).__name__} back-propagates through the teacher (needs_teacher_grad), which a cache of "
                "its outputs cannot do: drop teacher_cache for this run."
            )
        for part in d.modules():
            # wrappers (PerLevel, Adapted) override attach_teacher only to pass it on to the distillers inside
            wrapper = any(isinstance(inner, Distiller) for inner in part.modules() if inner is not part)
            if isinstance(part, Distiller) and "attach_teacher" in vars(type(part)) and not wrapper:
                raise ValueError(
                    f"{type(part).__name__} runs the teacher's own layers on student features, so the teacher "
                    "must be present at every step: drop teacher_cache for this run."
                )


def _eager_hint(who: str) -> str:
    return (
        f"Set compile_{who}: false (model.init_args.compile_{who} in a recipe; compile_{who}=False in Python) "
        f"to run the {who} eagerly"
    )


def _deduplicate_names(distillers: Sequence[Distiller]) -> None:
    seen: dict[str, int] = {}
    for d in distillers:
        count = seen.get(d.name, 0)
        seen[d.name] = count + 1
        if count:
            d.name = f"{d.name}_{count}"
