"""Adapted: any distiller, with adapters applied to the student's and teacher's features first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightningkd.distillers.base import Distiller, Features


class Adapted(Distiller):
    """Run a distiller on features converted by adapters: transformer tokens to maps, resampled strides.

    A feature distiller made for CNN pairs (FitNet, AT, CWD, ...) compares ``(N, C, H, W)`` maps of the
    same size. With a transformer on one side, wrap it: ``teacher=TokensToMap(prefix_tokens=1)`` turns a
    ViT's ``(N, 1 + H*W, C)`` tokens into a map, ``student=Resample(in_stride=8, out_stride=16)`` brings a
    CNN stage to the transformer's grid. The adapters are applied to every layer the inner distiller
    reads, before it sees them; the loss, terms and name are the inner distiller's, and so is the weight
    unless ``weight`` is given. Learnable adapters (e.g.
    :class:`~lightningkd.adapters.ChannelProjection`) train with the distiller; the teacher's adapter
    runs on the no-grad teacher features and its parameters, if any, get no gradient.

    In YAML::

        - class_path: lightningkd.distillers.Adapted
          init_args:
            distiller: {class_path: lightningkd.distillers.FitNet,
                        init_args: {student_layer: layer3, teacher_layer: blocks.11,
                                    student_channels: 256, teacher_channels: 192}}
            teacher: {class_path: lightningkd.adapters.TokensToMap, init_args: {prefix_tokens: 1}}

    Args:
        distiller: the distiller to run on the adapted features.
        student: module applied to each student layer the distiller reads (``None``: unchanged).
        teacher: module applied to each teacher layer the distiller reads (``None``: unchanged).
        weight: the loss weight in the total; default the inner distiller's ``weight``.
        name: logged name; default the inner distiller's.

    Shape:
        whatever the adapters take, giving what the inner distiller takes.

    Returns:
        the inner distiller's 0-dim loss on the adapted features.

    Example:
        >>> import torch
        >>> from lightningkd.adapters import TokensToMap
        >>> from lightningkd.distillers import AT
        >>> d = Adapted(distiller=AT(student_layers=["s"], teacher_layers=["t"]), teacher=TokensToMap(prefix_tokens=1))
        >>> s = {"s": torch.ones(2, 8, 4, 4)}
        >>> t = {"t": torch.ones(2, 17, 6)}  # class token + 4x4 grid
        >>> d(s, t).item()  # identical uniform attention maps
        0.0
    """

    def __init__(
        self,
        *,
        distiller: Distiller,
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        weight: float | None = None,
        name: str | None = None,
    ) -> None:
        if not isinstance(distiller, Distiller):
            raise TypeError(
                f"Adapted: distiller must be a Distiller instance, got {type(distiller).__name__}; in YAML give "
                "it as {class_path: ..., init_args: {...}}."
            )
        for side, adapter in (("student", student), ("teacher", teacher)):
            if adapter is not None and not isinstance(adapter, nn.Module):
                raise TypeError(
                    f"Adapted: {side} must be an nn.Module (e.g. lightningkd.adapters.TokensToMap), got "
                    f"{type(adapter).__name__}."
                )
        if student is None and teacher is None:
            raise ValueError("Adapted: give a student or a teacher adapter (or use the distiller directly).")
        super().__init__(weight=distiller.weight if weight is None else weight, name=name or distiller.name)
        self.distiller = distiller
        self.student_adapter = student
        self.teacher_adapter = teacher
        self.student_layers = distiller.student_layers
        self.teacher_layers = distiller.teacher_layers
        self.needs_labels = distiller.needs_labels
        self.needs_teacher_grad = distiller.needs_teacher_grad

    def attach_teacher(self, teacher: nn.Module) -> None:
        self.distiller.attach_teacher(teacher)

    def adapt(self, student: Features, teacher: Features) -> tuple[dict[str, Any], dict[str, Any]]:
        """The features with the adapters applied to the layers the inner distiller reads."""
        s, t = dict(student), dict(teacher)
        for features, layers, adapter in (
            (s, self.student_layers, self.student_adapter),
            (t, self.teacher_layers, self.teacher_adapter),
        ):
            if adapter is None:
                continue
            for layer in dict.fromkeys(layers):
                if layer in features:  # a missing layer fails inside the distiller, naming it
                    features[layer] = adapter(features[layer])
        return s, t

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return self.distiller(*self.adapt(student, teacher), batch)

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        return self.distiller.terms(*self.adapt(student, teacher), batch)
