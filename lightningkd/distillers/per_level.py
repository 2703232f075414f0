"""PerLevel: one single-level distiller applied to every level of a feature pyramid."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightningkd.distillers.base import Distiller, Features, sum_terms
from lightningkd.taps import ITEM_SEPARATOR

_EMPTY = nn.ModuleDict()


def _module_key(level: str) -> str:
    """A valid ``nn.ModuleDict`` key for ``level``: dots become underscores, and names that clash with a
    ``ModuleDict`` attribute (``keys``, ``items``, ...) get a ``level_`` prefix."""
    key = level.replace(".", "_")
    return f"level_{key}" if hasattr(_EMPTY, key) else key


class PerLevel(Distiller):
    """Apply one single-level distiller to every FPN level and add the losses: ``sum_l w * loss_l``.

    Detection distillers work on each level of the feature pyramid with their own learnable parts and
    add the per-level losses (yzd-v/FGD and yzd-v/MGD build one loss module per FPN level in their
    configs; mmrazor's ``PKDLoss`` and the CWD detection configs sum over the levels). ``PerLevel`` does
    that from one template, so a recipe names the levels once::

        - class_path: lightningkd.distillers.PerLevel
          init_args:
            distiller: {class_path: lightningkd.distillers.FGD, init_args: {channels: 256}}
            levels: ["0", "1", "2", "p6", "p7"]
            student_layer: backbone
            teacher_layer: backbone

    It holds one deep copy of ``distiller`` per level (in the ``nn.ModuleDict`` :attr:`per_level`, keyed
    by the level name; :meth:`level` returns one), each reading the student's
    ``"<student_layer>:<level>"`` and the teacher's ``"<teacher_layer>:<level>"`` (the template's own
    layer names are replaced). Each copy's learnable parts are re-initialised independently with its
    ``reset_parameters()`` when the template defines one (FGD, MGD), as the official code builds one
    module per level.

    The template's ``weight`` is the per-level loss weight of the official configs: :meth:`forward` is
    ``sum over levels of template.weight * loss_level``, and PerLevel's own ``weight`` (default 1)
    multiplies that sum in the total. :meth:`terms` gives ``"<level>"`` for single-term distillers and
    ``"<level>/<term>"`` for multi-term ones (e.g. ``"p6/fg"``), each multiplied by the template's
    weight, so they add up to :meth:`forward`. The template's ``name`` names the sum (default
    ``"fgd"`` for an FGD template).

    Args:
        distiller: the single-level template (reads one student and one teacher layer).
        levels: the level keys (FPN keys of torchvision detectors: ``"0"``, ``"1"``, ``"2"``, ``"p6"``,
            ``"p7"`` for RetinaNet / FCOS, ``"0"`` .. ``"3"``, ``"pool"`` for Faster R-CNN); non-empty,
            no duplicates.
        student_layer: the student's layer returning the levels (a dict of maps).
        teacher_layer: the teacher's layer returning the levels.
        weight: see :class:`~lightningkd.distillers.base.Distiller` (multiplies the sum over levels).
        name: see :class:`~lightningkd.distillers.base.Distiller`; default: the template's name.

    Shape:
        the template's, at every level.

    Returns:
        the 0-dim sum over levels of the template-weighted losses from :meth:`forward`.

    Example:
        >>> import torch
        >>> from lightningkd.distillers import PKD
        >>> pkd = PerLevel(distiller=PKD(weight=10.0), levels=["0", "1"])
        >>> pkd.student_layers
        ('backbone:0', 'backbone:1')
        >>> s = {"backbone:0": torch.randn(2, 4, 8, 8), "backbone:1": torch.randn(2, 4, 4, 4)}
        >>> t = {k: -v for k, v in s.items()}
        >>> {k: round(v.item(), 3) for k, v in pkd.terms(s, t).items()}  # 10 * 2 * (n-1)/n, n = 128 and 32
        {'0': 19.844, '1': 19.375}
    """

    def __init__(
        self,
        *,
        distiller: Distiller,
        levels: Sequence[str],
        student_layer: str = "backbone",
        teacher_layer: str = "backbone",
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        if not isinstance(distiller, Distiller):
            raise TypeError(
                f"PerLevel: distiller must be a Distiller instance (the single-level template), got "
                f"{type(distiller).__name__}; in YAML give it as {{class_path: ..., init_args: {{...}}}}."
            )
        super().__init__(weight=weight, name=name or distiller.name)
        if isinstance(levels, str) or not isinstance(levels, Sequence) or len(levels) == 0:
            raise ValueError(
                f"PerLevel: levels must be a non-empty list of level keys, e.g. ['0', '1', '2', 'p6', 'p7'], "
                f"got {levels!r}."
            )
        if any(not isinstance(level, str) or not level for level in levels):
            raise ValueError(f"PerLevel: every level must be a non-empty string, got {list(levels)!r}.")
        duplicates = sorted({level for level in levels if list(levels).count(level) > 1})
        if duplicates:
            raise ValueError(
                f"PerLevel: levels must be distinct, {duplicates} appear more than once in {list(levels)}."
            )
        keys = [_module_key(level) for level in levels]
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"PerLevel: the levels {list(levels)} give clashing module names {keys} ('.' becomes '_'); "
                "rename the levels."
            )
        if len(distiller.student_layers) != 1 or len(distiller.teacher_layers) != 1:
            raise ValueError(
                f"PerLevel: the template {type(distiller).__name__} reads the student layers "
                f"{list(distiller.student_layers)} and teacher layers {list(distiller.teacher_layers)}; it must "
                "read exactly one of each (a single-level distiller such as FGD, PKD, MGD or CWD). Give the "
                "template one level and let PerLevel repeat it."
            )
        for key in ("student_layer", "teacher_layer"):
            value = student_layer if key == "student_layer" else teacher_layer
            if not isinstance(value, str) or not value:
                raise ValueError(f"PerLevel: {key} must be a non-empty layer name, got {value!r}.")
        self.levels = tuple(levels)
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self._keys = dict(zip(self.levels, keys))
        self.per_level = nn.ModuleDict()
        for level, key in self._keys.items():
            level_distiller = copy.deepcopy(distiller)
            level_distiller.student_layers = (f"{student_layer}{ITEM_SEPARATOR}{level}",)
            level_distiller.teacher_layers = (f"{teacher_layer}{ITEM_SEPARATOR}{level}",)
            level_distiller.scale = 1.0
            reset = getattr(level_distiller, "reset_parameters", None)
            if callable(reset):
                reset()
            self.per_level[key] = level_distiller
        copies = list(self.per_level.values())
        self.student_layers = tuple(d.student_layers[0] for d in copies)
        self.teacher_layers = tuple(d.teacher_layers[0] for d in copies)
        self.needs_labels = any(d.needs_labels for d in copies)
        self.needs_teacher_grad = any(d.needs_teacher_grad for d in copies)

    def level(self, level: str) -> Distiller:
        """The distiller of ``level`` (one of :attr:`levels`)."""
        if level not in self._keys:
            raise KeyError(f"PerLevel: no level {level!r}; the levels are {list(self.levels)}.")
        return self.per_level[self._keys[level]]  # type: ignore[return-value]

    def attach_teacher(self, teacher: nn.Module) -> None:
        """Forward the frozen teacher to every level's copy (see
        :meth:`~lightningkd.distillers.base.Distiller.attach_teacher`)."""
        for distiller in self.per_level.values():
            distiller.attach_teacher(teacher)

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for level in self.levels:
            distiller = self.level(level)
            parts = distiller.terms(student, teacher, batch)
            if list(parts) == ["loss"]:
                out[level] = distiller.weight * parts["loss"]
            else:
                for term, value in parts.items():
                    out[f"{level}/{term}"] = distiller.weight * value
        return out

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return sum_terms(self.terms(student, teacher, batch))

    def extra_repr(self) -> str:
        return (
            f"levels={list(self.levels)}, student_layer={self.student_layer!r}, "
            f"teacher_layer={self.teacher_layer!r}, " + super().extra_repr()
        )
