"""Object-detection distillation for torchvision detectors: one padded batch for both models, COCO mAP."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from lightningkd.distillers.base import Distiller
from lightningkd.models.detection import fpn_levels
from lightningkd.modules.base import DistillationModule, LabelRangeError, default_optimizer
from lightningkd.taps import ITEM_SEPARATOR, OUTPUT, Features

__all__ = ["DetectionDistillationModule", "PaddedBatch", "inherit_weights", "pad_batch", "padded_size"]

Detections = list[dict[str, Tensor]]
"""One dict per image: ``boxes`` ``(K, 4)`` xyxy pixels, ``scores`` ``(K,)``, ``labels`` ``(K,)`` (1-based)."""

# what the module logs from torchmetrics' MeanAveragePrecision, and under which name
MAP_KEYS = {
    "map": "mAP",
    "map_50": "mAP50",
    "map_75": "mAP75",
    "map_small": "mAP_small",
    "map_medium": "mAP_medium",
    "map_large": "mAP_large",
}


def padded_size(sizes: Sequence[tuple[int, int]], size_divisible: int = 32) -> tuple[int, int]:
    """The ``(H, W)`` of the batch that :func:`pad_batch` makes from images of these ``(h, w)`` sizes.

    Example:
        >>> padded_size([(5, 7), (6, 4)], size_divisible=4)
        (8, 8)
    """
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    return (
        int(math.ceil(height / size_divisible) * size_divisible),
        int(math.ceil(width / size_divisible) * size_divisible),
    )


def pad_batch(images: Sequence[Tensor], size_divisible: int = 32) -> Tensor:
    """Stack ``(C, h, w)`` images into one ``(N, C, H, W)`` tensor, zero-padded at the bottom and right.

    ``H`` and ``W`` are the largest height and width rounded up to a multiple of ``size_divisible``, as
    torchvision's ``GeneralizedRCNNTransform`` batches images (so FPN strides divide the batch size).

    Example:
        >>> pad_batch([torch.ones(3, 5, 7), torch.ones(3, 6, 4)], size_divisible=4).shape
        torch.Size([2, 3, 8, 8])
    """
    if not images:
        raise ValueError("pad_batch: no images.")
    channels = images[0].shape[0]
    height, width = padded_size([(int(i.shape[-2]), int(i.shape[-1])) for i in images], size_divisible)
    batch = images[0].new_zeros((len(images), channels, height, width))
    for out, image in zip(batch, images):
        out[:, : image.shape[-2], : image.shape[-1]].copy_(image)
    return batch


class PaddedBatch(nn.Module):
    """Stand-in for a torchvision detector's ``transform`` while the module runs it: batch, nothing else.

    The datamodule has already resized and normalised the images; this pads them with :func:`pad_batch`
    (the function the module uses for the teacher's batch too, so both models get the same tensor) and
    leaves boxes where they are: predictions come back in the coordinates of the given images.
    """

    def __init__(self, size_divisible: int = 32) -> None:
        super().__init__()
        self.size_divisible = size_divisible

    def forward(
        self, images: Sequence[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        return ImageList(pad_batch(images, self.size_divisible), sizes), targets

    def postprocess(self, result: Detections, image_shapes: Any, original_image_sizes: Any) -> Detections:
        return result


class DetectionDistillationModule(DistillationModule):
    """Distil a torchvision object detector (RetinaNet, FCOS, Faster R-CNN, ...).

    torchvision detectors resize, normalise and pad their inputs inside ``forward`` (their
    ``transform``). Here the datamodule resizes and normalises (once, with the boxes), and the module
    pads the batch once: while it runs a detector, the detector's own ``transform`` is replaced by
    :class:`PaddedBatch`, which only pads with the same function. The teacher and the student therefore
    see bit-identical batch tensors and their FPN levels have the same sizes; boxes in ``batch`` are in
    the same pixels as the features. A detector without a torchvision ``GeneralizedRCNNTransform`` (whose
    preprocessing the module cannot take over) is refused at construction.

    Features are tapped by name; FPN levels are entries of the backbone's output, named
    ``"backbone:<level>"`` (``"backbone:0"`` ... ``"backbone:p7"`` for RetinaNet and FCOS,
    ``"backbone:0"`` ... ``"backbone:pool"`` for Faster R-CNN; ``lightningkd layers`` lists them). When
    every teacher layer a distiller reads lies in the backbone, only the teacher's backbone runs in
    training (no heads, no box decoding); otherwise the whole teacher runs in eval mode.

    Training: the student's own loss dict (its sum is the task loss; each term is logged as
    ``train/task/<term>``) plus the weighted distillers, which receive ``batch`` with ``"target"`` (boxes
    and labels per image, in the pixels of the resized image), ``"image_sizes"`` (the un-padded ``(h, w)``
    of each image) and ``"padded_size"`` (the ``(H, W)`` of the batch tensor). Images without boxes
    train as background.

    Validation and test: COCO box mAP from torchmetrics' ``MeanAveragePrecision`` (pycocotools backend),
    computed in the original image coordinates (``orig_size`` of the targets): ``<stage>/mAP``,
    ``mAP50``, ``mAP75``, ``mAP_small``, ``mAP_medium``, ``mAP_large`` and ``<stage>/ap/<class>`` per class;
    the teacher's ``val/teacher_mAP`` and ``val/teacher_mAP50`` once. ``predict`` returns detections in the
    original image coordinates.

    Args:
        student: a torchvision detector (e.g. from :func:`lightningkd.models.detector`).
        teacher: a frozen torchvision detector, or ``None`` (no distillation).
        distillers: see :class:`~lightningkd.modules.base.DistillationModule`.
        num_classes: number of foreground classes (labels ``1..num_classes``; 0 is background), the
            datamodule's ``num_classes``. The detectors' heads have ``num_classes + 1`` outputs.
        class_names: names of the foreground classes for the per-class AP; taken from the datamodule's
            ``classes`` when omitted.
        size_divisible: the padded batch's height and width are multiples of this (32 in torchvision).
        inherit_from_teacher: parameter-name prefixes (e.g. ``["backbone.fpn", "head"]``) whose teacher
            weights initialise the student where names and shapes match: the neck and head inheritance of
            the FGD and MGD detection configs (mmrazor's PKD configs do not inherit). Each prefix must
            match at least one tensor.
        task_weight: see :class:`~lightningkd.modules.base.DistillationModule`.
        optimizer: see :class:`~lightningkd.modules.base.DistillationModule`.
        lr_scheduler: see :class:`~lightningkd.modules.base.DistillationModule`.
        lr_scheduler_interval: see :class:`~lightningkd.modules.base.DistillationModule`.
        teacher_input: applied to the teacher's padded batch (e.g. other normalisation statistics); it
            must keep the batch's size, so that boxes and FPN levels stay aligned.
        compile_student: see :class:`~lightningkd.modules.base.DistillationModule`. A detector's
            data-dependent parts (proposals, NMS, the image-size transform) break the graph into pieces and
            recompile for new image sizes, so measure before relying on it.
        compile_teacher: see :class:`~lightningkd.modules.base.DistillationModule`. When the
            distillers read only the teacher's backbone, the backbone runs alone and eagerly.
        on_nonfinite: see :class:`~lightningkd.modules.base.DistillationModule`.

    Example:
        >>> from lightningkd.models import detector
        >>> module = DetectionDistillationModule(detector("fcos_resnet18_fpn", num_classes=2), num_classes=2)
        >>> [sorted(d) for d in module.detect([torch.zeros(3, 64, 64)])]
        [['boxes', 'labels', 'scores']]
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        distillers: Sequence[Distiller] = (),
        num_classes: int = 80,
        class_names: list[str] | None = None,
        size_divisible: int = 32,
        inherit_from_teacher: Sequence[str] = (),
        task_weight: float = 1.0,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        teacher_input: nn.Module | None = None,
        compile_student: bool = False,
        compile_teacher: bool = False,
        on_nonfinite: Literal["stop", "skip"] = "stop",
    ) -> None:
        for who, model in (("student", student), ("teacher", teacher)):
            if model is not None:
                _check_detector(model, who, num_classes)
        _check_levels(student, [n for d in distillers for n in d.student_layers], "student")
        if teacher is not None:
            _check_levels(teacher, [n for d in distillers for n in d.teacher_layers], "teacher")
        super().__init__(
            student,
            teacher,
            distillers,
            task_weight=task_weight,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            lr_scheduler_interval=lr_scheduler_interval,
            teacher_input=teacher_input,
            compile_student=compile_student,
            compile_teacher=compile_teacher,
            on_nonfinite=on_nonfinite,
        )
        if num_classes < 1:
            raise ValueError(f"num_classes (foreground classes) must be >= 1, got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes is {num_classes}.")
        if size_divisible < 1:
            raise ValueError(f"size_divisible must be >= 1, got {size_divisible}.")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.size_divisible = size_divisible
        self.padded_batch = PaddedBatch(size_divisible)
        teacher_layers = [n for d in self.distillers for n in d.teacher_layers]
        self.teacher_backbone_only = all(_module_of(n).split(".")[0] == "backbone" for n in teacher_layers)
        self.inherited: list[str] = []
        if inherit_from_teacher:
            if teacher is None:
                raise ValueError("inherit_from_teacher needs a teacher to copy the weights from.")
            self.inherited = inherit_weights(student, teacher, inherit_from_teacher)
        for stage in ("val", "test"):
            for who in ("student", "teacher"):
                setattr(self, f"{stage}_{who}_map", _mean_average_precision())

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.class_names is None:
            names = getattr(getattr(self.trainer, "datamodule", None), "classes", None)
            if names is not None and len(names) == self.num_classes:
                self.class_names = list(names)

    def label_bounds(self) -> None:
        return None  # detection labels are checked per image in unpack_batch (1..num_classes)

    # ---- batches ------------------------------------------------------------------------------------
    def unpack_batch(self, batch: Any) -> dict[str, Any]:
        """``(images, targets)`` lists (or a dict with ``"image"``/``"target"``) checked and described."""
        if isinstance(batch, Mapping):
            images, targets = batch.get("image"), batch.get("target")
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            images, targets = batch
        else:
            raise TypeError(
                "A detection batch is (list of images, list of targets), as the detection datamodules' "
                f"collate_detection makes it; got {type(batch).__name__}."
            )
        if torch.is_tensor(images):
            images = list(images)
        if not isinstance(images, (list, tuple)) or not all(
            torch.is_tensor(i) and i.ndim == 3 for i in images
        ):
            raise TypeError("Detection images must be a list of (C, H, W) tensors (sizes may differ).")
        if targets is not None:
            if len(targets) != len(images):
                raise ValueError(f"The batch has {len(images)} images but {len(targets)} targets.")
            for index, target in enumerate(targets):
                self._check_target(target, index)
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        padded = padded_size(sizes, self.size_divisible)
        return {"image": list(images), "target": targets, "image_sizes": sizes, "padded_size": padded}

    def _check_target(self, target: Any, index: int) -> None:
        if not isinstance(target, Mapping) or "boxes" not in target or "labels" not in target:
            raise TypeError(
                f"Target {index} of the batch must be a dict with 'boxes' (K, 4) and 'labels' (K,), got "
                f"{type(target).__name__}"
                + (f" with keys {sorted(target)}" if isinstance(target, Mapping) else "")
            )
        boxes, labels = target["boxes"], target["labels"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"Target {index}: boxes must be (K, 4) and labels (K,), got {tuple(boxes.shape)} and "
                f"{tuple(labels.shape)}."
            )
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > self.num_classes):
            raise LabelRangeError(
                f"Target {index}: box labels must be 1..{self.num_classes} (0 is background), got values "
                f"{sorted({int(v) for v in labels.unique()[:8]})}. Set num_classes of the module and of the "
                "detectors to the datamodule's foreground class count."
            )

    def prepare_images(self, images: Any) -> Any:
        return images

    # ---- running the detectors ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _padded(self, model: nn.Module) -> Iterator[None]:
        """Swap ``model.transform`` for :class:`PaddedBatch` while the module runs ``model``."""
        own = model.transform
        model.transform = self.padded_batch
        try:
            yield
        finally:
            model.transform = own

    def student_features(self, images: list[Tensor], batch: Mapping[str, Any] | None = None) -> Features:
        targets = None if batch is None else batch.get("target")
        with self._padded(self.student):
            return self.student_tap(images, targets)

    def teacher_batch(self, images: Sequence[Tensor]) -> Tensor:
        """The teacher's padded batch tensor (``teacher_input`` applied, size checked)."""
        padded = pad_batch(images, self.size_divisible)
        if self.teacher_input is not None:
            converted = self.teacher_input(padded)
            if converted.shape != padded.shape:
                raise ValueError(
                    f"teacher_input changed the batch from {tuple(padded.shape)} to {tuple(converted.shape)}: "
                    "in detection it may only change the values (e.g. normalisation), so that boxes and "
                    "FPN levels stay aligned with the student's."
                )
            padded = converted
        return padded

    def teacher_features(self, images: list[Tensor], batch: Mapping[str, Any] | None = None) -> Features:
        assert self.teacher is not None and self.teacher_tap is not None
        padded = self.teacher_batch(images)
        grad = any(d.needs_teacher_grad for d in self.distillers)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if self.teacher_backbone_only:
                return self.teacher_tap.run(self.teacher.backbone, padded)
            sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
            crops = [image[:, :h, :w] for image, (h, w) in zip(padded, sizes)]
            with self._padded(self.teacher):
                return self.teacher_tap(crops)

    @torch.no_grad()
    def detect(self, images: Sequence[Tensor], model: nn.Module | None = None) -> Detections:
        """Detections of ``model`` (the student by default) in the pixels of the given images.

        The model runs in eval mode (restored afterwards); the teacher gets ``teacher_input``.
        """
        model = self.student if model is None else model
        images = list(images)
        if model is self.teacher and self.teacher_input is not None:
            padded = self.teacher_batch(images)
            images = [p[:, : i.shape[-2], : i.shape[-1]] for p, i in zip(padded, images)]
        was_training = model.training
        model.eval()
        try:
            with self._padded(model):
                return model(images)
        finally:
            model.train(was_training)

    def forward(self, images: Sequence[Tensor]) -> Detections:
        return self.detect(images)

    # ---- training -----------------------------------------------------------------------------------
    def task_loss(self, student_output: Any, batch: Mapping[str, Any]) -> Tensor:
        if not isinstance(student_output, Mapping) or not student_output:
            raise TypeError(
                "The student returned no loss dict in training mode: DetectionDistillationModule needs a "
                f"torchvision detector, which returns its losses when given targets (got {type(student_output).__name__})."
            )
        total = sum(student_output.values())
        if self.log_due():
            for name, value in student_output.items():
                self.log(f"train/task/{name}", value, batch_size=len(batch["image"]))
        return total

    # ---- evaluation ---------------------------------------------------------------------------------
    def _evaluate(self, batch: Any, stage: str) -> None:
        batch = self.unpack_batch(batch)
        images, targets = batch["image"], batch["target"]
        if targets is None:
            raise ValueError(f"A {stage} batch needs targets (boxes and labels) to score mAP.")
        self.update_map(f"{stage}_student_map", self.detect(images), targets)
        if self.teacher_due(stage):
            self.update_map(f"{stage}_teacher_map", self.detect(images, self.teacher), targets)

    def update_map(self, metric: str, detections: Detections, targets: Sequence[Mapping[str, Any]]) -> None:
        """Add a batch to the ``MeanAveragePrecision`` named ``metric``, in original image coordinates."""
        preds, truths = [], []
        for det, target in zip(detections, targets):
            scale = _to_original(target)
            preds.append(
                {
                    "boxes": (det["boxes"].float() * scale).cpu(),
                    "scores": det["scores"].float().cpu(),
                    "labels": det["labels"].cpu(),
                }
            )
            truths.append(
                {"boxes": (target["boxes"].float() * scale).cpu(), "labels": target["labels"].cpu()}
            )
        getattr(self, metric).update(preds, truths)

    def log_epoch_metrics(self, stage: str) -> None:
        student = getattr(self, f"{stage}_student_map")
        if self.trainer.sanity_checking:
            student.reset()
            return
        scores = self.compute_map(f"{stage}_student_map")
        for key, name in MAP_KEYS.items():
            self.log(f"{stage}/{name}", scores[key], prog_bar=name == "mAP")
        names = self.class_names or [f"class{i}" for i in range(1, self.num_classes + 1)]
        for label, ap in zip(scores["classes"].tolist(), scores["map_per_class"].tolist()):
            if 1 <= label <= self.num_classes and ap >= 0:  # -1: no ground truth of that class
                self.log(f"{stage}/ap/{names[label - 1]}", ap)
        if self.teacher_due(stage):
            teacher = self.compute_map(f"{stage}_teacher_map")
            self.log(f"{stage}/teacher_mAP", teacher["map"])
            self.log(f"{stage}/teacher_mAP50", teacher["map_50"])

    def compute_map(self, metric: str) -> dict[str, Tensor]:
        """Compute and reset the ``MeanAveragePrecision`` named ``metric`` (per-class values as 1-D tensors)."""
        values = getattr(self, metric).compute()
        getattr(self, metric).reset()
        values = {k: v.float() if torch.is_tensor(v) else v for k, v in values.items()}
        values["classes"] = values["classes"].reshape(-1).long()
        values["map_per_class"] = values["map_per_class"].reshape(-1)
        return values

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Detections:
        """Student detections in the original image coordinates (``orig_size`` of the targets, if given).

        ``batch``: ``(images, targets)`` from a detection datamodule, a dict with ``"image"`` (and
        ``"target"``), a list of ``(C, H, W)`` images or an ``(N, C, H, W)`` tensor.
        """
        images, targets = batch, None
        if isinstance(batch, Mapping):
            images, targets = batch["image"], batch.get("target")
        elif isinstance(batch, tuple) or (
            isinstance(batch, list) and len(batch) == 2 and isinstance(batch[1], (list, tuple))
        ):
            images, targets = batch
        detections = self.detect(list(images))
        if targets is None:
            return detections
        return [
            {**d, "boxes": d["boxes"] * _to_original(t).to(d["boxes"].device)}
            for d, t in zip(detections, targets)
        ]


def _mean_average_precision() -> MeanAveragePrecision:
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools"
    )
    metric.warn_on_many_detections = False  # detectors keep up to 300 boxes; COCO scores the best 100
    return metric


def _to_original(target: Mapping[str, Any]) -> Tensor:
    """``(4,)`` factors taking xyxy boxes from the transformed image to the original one (ones if unknown)."""
    if "orig_size" not in target or "size" not in target:
        return torch.ones(4)
    (orig_h, orig_w), (h, w) = (torch.as_tensor(target[k]).tolist() for k in ("orig_size", "size"))
    return torch.tensor([orig_w / w, orig_h / h, orig_w / w, orig_h / h])


def _module_of(name: str) -> str:
    return name.partition(ITEM_SEPARATOR)[0]


def _check_detector(model: nn.Module, who: str, num_classes: int) -> None:
    """Refuse a model whose preprocessing the module cannot take over, or whose head has other classes."""
    transform = getattr(model, "transform", None)
    if not isinstance(transform, GeneralizedRCNNTransform):
        raise TypeError(
            f"The {who} ({type(model).__name__}) is not a torchvision detector with a GeneralizedRCNNTransform "
            f"(its transform is {type(transform).__name__}). The module replaces that transform by one padded "
            "batch shared by both models, so that the teacher and the student see the same pixels and the "
            "boxes line up with the features; with another preprocessing it cannot guarantee this. Build the "
            "models with lightningkd.models.detector or torchvision.models.detection."
        )
    head_classes = _head_classes(model)
    if head_classes is not None and head_classes != num_classes + 1:
        raise ValueError(
            f"The {who}'s head predicts {head_classes} classes (background included) but num_classes is "
            f"{num_classes} foreground classes: build the detector with num_classes={num_classes} "
            f"(lightningkd.models.detector adds the background), or set the module's num_classes to {head_classes - 1}."
        )


def _head_classes(model: nn.Module) -> int | None:
    head = getattr(model, "head", None)
    classification = getattr(head, "classification_head", None)
    if classification is not None and hasattr(classification, "num_classes"):
        return int(classification.num_classes)
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if predictor is not None and hasattr(predictor, "cls_score"):
        return int(predictor.cls_score.out_features)
    return None


def _check_levels(model: nn.Module, names: Sequence[str], who: str) -> None:
    """Refuse ``"backbone:<level>"`` names of levels the model's FPN does not return, listing its levels."""
    wanted = [n for n in names if n != OUTPUT and ITEM_SEPARATOR in n and _module_of(n) == "backbone"]
    if not wanted:
        return
    levels = fpn_levels(model)
    unknown = [n for n in wanted if n.partition(ITEM_SEPARATOR)[2] not in levels]
    if unknown:
        raise ValueError(
            f"The {who} ({type(model).__name__}) has no FPN level {[n.partition(ITEM_SEPARATOR)[2] for n in unknown]} "
            f"(asked for {unknown}). Its levels are {[f'backbone{ITEM_SEPARATOR}{lv}' for lv in levels]}."
        )


def inherit_weights(student: nn.Module, teacher: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Copy the teacher's tensors under ``prefixes`` into the student where names and shapes match.

    A module is copied whole or not at all: when one of its tensors differs in shape (a lateral FPN
    convolution reading a wider backbone), its bias stays the student's too. Returns the copied names. A
    prefix that names no tensor of the teacher, or none of whose modules fit, raises a ``ValueError``.

    Example:
        >>> a, b = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 3)), nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 3))
        >>> inherit_weights(a, b, ["1"])
        ['1.weight', '1.bias']
        >>> torch.equal(a[1].weight, b[1].weight)
        True
    """
    source, target = teacher.state_dict(), student.state_dict()
    copied, skipped = [], []
    for prefix in prefixes:
        keys = [k for k in source if k == prefix or k.startswith(prefix + ".")]
        if not keys:
            tops = sorted({k.split(".")[0] for k in source})
            raise ValueError(
                f"inherit_from_teacher: the teacher has no weights under {prefix!r}; its top-level modules are {tops}."
            )
        misfit_modules = {
            k.rpartition(".")[0] for k in keys if k not in target or target[k].shape != source[k].shape
        }
        fits = [k for k in keys if k.rpartition(".")[0] not in misfit_modules]
        if not fits:
            raise ValueError(
                f"inherit_from_teacher: no tensor under {prefix!r} has the same name and shape in the student "
                f"(e.g. {keys[0]}: teacher {tuple(source[keys[0]].shape)}, student "
                f"{tuple(target[keys[0]].shape) if keys[0] in target else 'absent'})."
            )
        copied += fits
        skipped += [k for k in keys if k not in fits]
    with torch.no_grad():
        for key in copied:
            target[key].copy_(source[key])
    rank_zero_info(
        f"inherit_from_teacher: copied {len(copied)} tensors from the teacher"
        + (
            f"; {len(skipped)} differ in shape and keep the student's init (e.g. {skipped[:3]})"
            if skipped
            else ""
        )
    )
    return copied
