"""The :class:`Distiller` contract shared by every knowledge-distillation loss."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightningkd.functional._helpers import (
    at_least_float32,
    check_built_channels,
    check_feature_pair,
    check_non_negative,
    token_map_mismatch,
)
from lightningkd.taps import OUTPUT, Features

__all__ = ["OUTPUT", "Distiller", "Features", "read_aligned_pair", "require", "require_labels", "sum_terms"]


class Distiller(nn.Module, abc.ABC):
    """Base class of the distillation losses.

    A distiller receives the features of the student and of the teacher (tapped by the LightningModule)
    and returns one *unweighted* 0-dim loss. It never runs a model (the one exception, later teacher layers
    run on student-derived features, goes through :meth:`attach_teacher`). Learnable adapters are created in
    ``__init__`` from explicit sizes, so they exist before the optimizer is built and are saved in
    checkpoints with the student.

    Subclasses set :attr:`student_layers` and :attr:`teacher_layers` to the layer names they read (the
    module taps exactly those) and implement :meth:`forward`. A loss made of several terms also overrides
    :meth:`terms`, and its :meth:`forward` returns ``sum_terms(self.terms(...))``: one code path, so the
    logged parts always add up to the loss.

    Precision: under bf16/fp16 autocast a distiller computes its softmaxes, KL divergences, normalisations,
    norms, variances, Gram matrices and large sums in float32 (``at_least_float32`` on the inputs, and
    ``autocast_off`` around products, which autocast would otherwise run in the half dtype) and returns a
    float32 loss; its learnable adapters run under autocast. The shared tests hold every distiller to this.

    Args:
        weight: factor applied by the LightningModule to this loss in the total.
        name: key under which the loss is logged (``train/kd/<name>``); defaults to the lower-cased class
            name.

    Attributes:
        scale: run-time factor set by warm-up callbacks (1.0 otherwise); the module multiplies the loss by
            ``weight * scale``.
        needs_labels: the distiller reads ``batch["target"]``.
        needs_teacher_grad: the teacher's features must keep their autograd graph (rare; e.g. methods that
            back-propagate through frozen teacher layers). Off by default: the teacher runs under no_grad.
            A distiller that only runs frozen teacher layers on features of its own (ScaleKD's teacher
            parameter perception) does not need it: it gets those layers from :meth:`attach_teacher`.
    """

    student_layers: tuple[str, ...] = (OUTPUT,)
    teacher_layers: tuple[str, ...] = (OUTPUT,)
    needs_labels: bool = False
    needs_teacher_grad: bool = False

    def __init__(self, *, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        self.weight = check_non_negative(type(self).__name__, "weight", weight)
        self.name = name or type(self).__name__.lower()
        self.scale = 1.0

    @abc.abstractmethod
    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        """Return the unweighted 0-dim loss from the student's and teacher's features."""

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """The loss split into named 0-dim parts whose sum is :meth:`forward` (for logging).

        Each part is already multiplied by its own coefficient inside the distiller (alpha/beta, edge/body
        weights, ...), never by :attr:`weight` or :attr:`scale`. This default has one part, ``"loss"``;
        multi-term distillers return one entry per term, and the module logs them as
        ``train/kd/<name>/<term>``. Call it instead of :meth:`forward`, not in addition: stateful
        distillers (e.g. a memory bank) update their state on every call.

        Example:
            >>> import torch
            >>> from lightningkd.distillers import KD
            >>> z = torch.zeros(2, 3)
            >>> KD().terms({"output": z}, {"output": z})
            {'loss': tensor(0.)}
        """
        return {"loss": self.forward(student, teacher, batch)}

    def attach_teacher(self, teacher: nn.Module) -> None:
        """Give the distiller the frozen teacher; the default ignores it.

        The one exception to "a distiller never runs a model": a method that runs some of the teacher's
        own layers on features derived from the student (ScaleKD's teacher parameter perception) overrides
        this to look those layers up. :class:`~lightningkd.modules.DistillationModule` calls it once, in its
        ``__init__``, for every distiller when a teacher is given, after freezing the teacher
        (``requires_grad_(False)``, eval mode). An override must keep the layers out of its parameters and
        ``state_dict`` (hold them in a plain attribute, not as submodules), so the teacher is never trained,
        optimised or checkpointed through the distiller.

        Args:
            teacher: the frozen teacher model.

        Example:
            >>> from lightningkd.distillers import KD
            >>> KD().attach_teacher(nn.Linear(2, 2))  # most distillers keep nothing
        """

    def read_pair(self, student: Features, teacher: Features) -> tuple[Tensor, Tensor]:
        """The student's and teacher's features of a one-layer distiller (its first named layers)."""
        who = type(self).__name__
        s = require(student, self.student_layers[0], who, "student")
        t = require(teacher, self.teacher_layers[0], who, "teacher")
        mixed = token_map_mismatch(who, s, t)  # a transformer's tokens against a CNN's map
        if mixed:
            raise ValueError(mixed)
        return s, t

    def extra_repr(self) -> str:
        return f"weight={self.weight}, name={self.name!r}"


def sum_terms(terms: Mapping[str, Tensor]) -> Tensor:
    """The sum of the parts returned by :meth:`Distiller.terms`, added in their order.

    Example:
        >>> import torch
        >>> sum_terms({"a": torch.tensor(1.0), "b": torch.tensor(2.5)})
        tensor(3.5000)
    """
    if not terms:
        raise ValueError("sum_terms: a distiller returned no terms; terms() must return at least one.")
    values = iter(terms.values())
    total = next(values)
    for value in values:
        total = total + value
    return total


def read_aligned_pair(
    distiller: Distiller, student: Features, teacher: Features, *, promote: bool = False
) -> tuple[Tensor, Tensor]:
    """The maps of a one-layer feature distiller with an optional 1x1 ``align`` conv (FGD, MGD, MasKD, ...).

    Both maps are checked against the sizes the distiller was built for (its ``channels`` and
    ``student_channels`` attributes; same batch and spatial size), and the student's map goes through
    ``distiller.align`` when it has one. ``promote`` lifts half precision to float32 first.
    """
    who = type(distiller).__name__
    s, t = distiller.read_pair(student, teacher)
    check_feature_pair(who, s, t)
    channels = distiller.channels
    student_channels = distiller.student_channels
    check_built_channels(who, s, t, channels if student_channels is None else student_channels, channels)
    if promote:
        s, t = at_least_float32(s), at_least_float32(t)
    align = distiller.align
    return (s if align is None else align(s)), t


def require(features: Features, key: str, who: str, side: str) -> Tensor:
    """Return ``features[key]`` or fail with the keys that are available."""
    try:
        return features[key]
    except KeyError:
        raise KeyError(
            f"{who} reads the {side} layer {key!r}, but only {sorted(features)} were tapped. "
            f"Name the layer in the distiller's arguments so the module taps it."
        ) from None


def require_labels(batch: Mapping[str, Any] | None, who: str) -> Tensor:
    """Return the integer class labels of ``batch`` or fail with a clear message."""
    if batch is None or "target" not in batch:
        raise ValueError(
            f"{who} needs the ground-truth labels: call it with batch={{'target': labels}} "
            "(the distillation modules do this for you)."
        )
    target = batch["target"]
    if not torch.is_tensor(target):
        raise TypeError(f"{who} expects batch['target'] to be a tensor of class indices, got {type(target)}.")
    return target
