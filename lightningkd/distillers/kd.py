"""Hinton knowledge distillation on the logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightningkd.distillers.base import OUTPUT, Distiller, Features
from lightningkd.functional._helpers import check_positive
from lightningkd.functional.kd import kd_loss


class KD(Distiller):
    """Soft-target distillation: ``T^2 * KL(p_t^T || p_s^T)`` on the models' logits.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS-W 2015, arXiv:1503.02531.
    Follows megvii-research/mdistiller ``kd_loss`` (a08d46f). Published CIFAR-100 setting: T=4, CE weight
    0.1, KD weight 0.9; ImageNet: T=1, 0.5/0.5.

    Args:
        temperature: softening temperature T (mdistiller CIFAR default 4).
        student_layer: where the student's logits are read (``"output"``: the model's output).
        teacher_layer: where the teacher's logits are read (``"output"``: the model's output).
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        logits ``(N, C)`` for both models.

    Example:
        >>> import torch
        >>> z = torch.randn(4, 10)
        >>> KD(temperature=4.0)({"output": z}, {"output": z}).item()
        0.0
    """

    def __init__(
        self,
        *,
        temperature: float = 4.0,
        student_layer: str = OUTPUT,
        teacher_layer: str = OUTPUT,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.temperature = check_positive("KD", "temperature", temperature)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        s, t = self.read_pair(student, teacher)
        return kd_loss(s, t, self.temperature)
