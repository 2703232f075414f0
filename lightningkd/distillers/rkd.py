"""Relational knowledge distillation (RKD) on embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightningkd.distillers.base import Distiller, Features, sum_terms
from lightningkd.functional._helpers import check_non_negative
from lightningkd.functional.rkd import rkd_terms


class RKD(Distiller):
    """Transfer the distance and angle structure of a batch of embeddings from the teacher to the student.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068. Authors' code:
    lenscloth/RKD ``metric/loss.py`` ``RkdDistance`` / ``RKdAngle`` (commit 0a6c3c0); see
    :func:`lightningkd.functional.rkd.rkd_loss`. Only pairwise geometry is compared, so the student and
    teacher widths may differ and no adapter is needed. :meth:`terms` returns
    ``{"distance": distance_weight * distance, "angle": angle_weight * angle}``.

    Reads the pooled penultimate features, as mdistiller does: name the layers, e.g. ``"avgpool"`` for
    torchvision ResNets (``(N, D, 1, 1)``); un-pooled ``(N, C, H, W)`` maps are global-average-pooled
    and ``(N, L, D)`` tokens averaged.

    Published settings: mdistiller CIFAR-100 ``distance_weight=25, angle_weight=50`` with CE weight 1;
    the authors' metric-learning scripts use 1 and 2.

    Args:
        student_layer: student layer whose output is the embedding (required).
        teacher_layer: teacher layer whose output is the embedding (required).
        distance_weight: weight of the distance term.
        angle_weight: weight of the angle term.
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(N, D_s)``, teacher ``(N, D_t)``, ``N >= 2``, or the pooled forms above.

    Example:
        >>> import torch
        >>> e = torch.randn(4, 8)
        >>> rkd = RKD(student_layer="avgpool", teacher_layer="avgpool")
        >>> rkd({"avgpool": e}, {"avgpool": 3 * e}).item() < 1e-6
        True
    """

    def __init__(
        self,
        *,
        student_layer: str,
        teacher_layer: str,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.distance_weight = check_non_negative("RKD", "distance_weight", distance_weight)
        self.angle_weight = check_non_negative("RKD", "angle_weight", angle_weight)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """``{"distance": distance_weight * distance, "angle": angle_weight * angle}``."""
        distance, angle = rkd_terms(*self.read_pair(student, teacher))
        return {"distance": self.distance_weight * distance, "angle": self.angle_weight * angle}

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return sum_terms(self.terms(student, teacher, batch))

    def extra_repr(self) -> str:
        return (
            f"distance_weight={self.distance_weight}, angle_weight={self.angle_weight}, "
            + super().extra_repr()
        )
