"""PKD: Pearson-correlation distillation of one detector feature level."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightningkd.distillers.base import Distiller, Features
from lightningkd.functional.pkd import pkd_loss


class PKD(Distiller):
    """Pearson-correlation distillation: ``MSE(standardise(S), standardise(T)) / 2`` on one feature level.

    Cao, Zhang, Gao, Cheng, Cheng & Cheng, "PKD: General Distillation Framework for Object Detectors via Pearson
    Correlation Coefficient", NeurIPS 2022, arXiv:2207.02039; official implementation open-mmlab/mmrazor
    ``mmrazor/models/losses/pkd_loss.py`` ``PKDLoss`` (90c7af1), configs ``configs/distill/mmdet/pkd/``.
    Each map is standardised per channel with statistics pooled over the batch and positions (unbiased
    std, eps 1e-6 added to the std), so the loss is about ``1 - r``, ``r`` the Pearson correlation of
    the two maps, and it ignores the scale and offset of each channel: heterogeneous detectors (one- and
    two-stage, different FPN magnitudes) can teach each other. See
    :func:`~lightningkd.functional.pkd.pkd_loss`.

    There is no learnable part and no channel adapter: the student's and teacher's channel counts must be
    equal (the FPN outputs of torchvision detectors all have 256). Maps of different heights are resized
    as the official code (bilinear, the student to the teacher's size by default).

    One level per instance. mmrazor's ``PKDLoss`` **sums** over the FPN levels it is given and multiplies
    the sum by ``loss_weight``; :class:`~lightningkd.distillers.PerLevel` with this distiller as template
    gives exactly that: ``PerLevel(distiller=PKD(weight=w), levels=...)`` is ``w * sum over levels``.
    Published settings: ``weight=6`` for Faster R-CNN, ``weight=10`` for RetinaNet and FCOS students,
    on the first four FPN outputs; the student is initialised from the teacher's neck and head where
    shapes allow (not part of this loss).

    Args:
        student_layer: the student's feature level (``"<layer>:<key>"`` for an FPN level).
        teacher_layer: the teacher's feature level.
        resize_student: when the heights differ, resize the student to the teacher's size (official
            default); ``False``: the teacher to the student's.
        weight: see :class:`~lightningkd.distillers.base.Distiller` (configs: 6 Faster R-CNN, 10
            RetinaNet / FCOS).
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(N, C, H_s, W_s)``, teacher ``(N, C, H_t, W_t)``.

    Returns:
        the unweighted 0-dim loss from :meth:`forward`.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 8, 4, 4)
        >>> pkd = PKD(weight=10.0)
        >>> loss = pkd({"backbone:0": x}, {"backbone:0": -x})  # anti-correlated: 2 * (n-1)/n, n = 32
        >>> round(loss.item(), 4)
        1.9375
    """

    def __init__(
        self,
        *,
        student_layer: str = "backbone:0",
        teacher_layer: str = "backbone:0",
        resize_student: bool = True,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        if not isinstance(resize_student, bool):
            raise ValueError(f"PKD: resize_student must be True or False, got {resize_student!r}.")
        self.resize_student = resize_student
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        s, t = self.read_pair(student, teacher)
        return pkd_loss(s, t, resize_student=self.resize_student)

    def extra_repr(self) -> str:
        return f"resize_student={self.resize_student}, " + super().extra_repr()
