"""DIST: inter- and intra-class correlation distillation on the logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightningkd.distillers.base import OUTPUT, Distiller, Features, sum_terms
from lightningkd.functional._helpers import check_non_negative, check_positive
from lightningkd.functional.dist import dist_terms


class DIST(Distiller):
    """Match the Pearson correlations of the softened predictions across classes and across the batch.

    Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
    arXiv:2205.10536. Authors' code: hunto/image_classification_sota ``lib/models/losses/dist_kd.py``
    (commit 6f7a70a), segmentation variant hunto/DIST_KD ``segmentation/losses/dist_kd.py``. The loss is
    ``tau^2 * (beta * inter + gamma * intra)``, see :func:`lightningkd.functional.dist.dist_terms`.

    Published settings: ImageNet ``beta=gamma=1, temperature=1`` with KD weight 2 and CE weight 1;
    CIFAR-100 ``temperature=4`` (``dist_t4``), KD weight 2; segmentation ``temperature=1`` on
    ``(N, C, H, W)`` logits (pixels as samples), KD weight 1.

    Dense logits of different spatial sizes: the teacher logits are resized to the student's ``(H, W)``
    (bilinear, ``align_corners=False``) before the loss; the authors' segmentation code receives logits of
    equal size. :meth:`terms` returns ``{"inter": beta * inter, "intra": gamma * intra}``.

    Args:
        beta: weight of the inter-class relation.
        gamma: weight of the intra-class relation.
        temperature: softening temperature tau > 0.
        student_layer: where the student's logits are read (``"output"``: the model's output).
        teacher_layer: where the teacher's logits are read (``"output"``: the model's output).
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        logits ``(N, C)`` for both models, or dense student ``(N, C, H, W)`` and teacher ``(N, C, H_t, W_t)``.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
        >>> round(DIST()({"output": z}, {"output": z.flip(1)}).item(), 4)
        2.3344
    """

    def __init__(
        self,
        *,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        student_layer: str = OUTPUT,
        teacher_layer: str = OUTPUT,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.beta = check_non_negative("DIST", "beta", beta)
        self.gamma = check_non_negative("DIST", "gamma", gamma)
        self.temperature = check_positive("DIST", "temperature", temperature)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """``{"inter": beta * inter, "intra": gamma * intra}`` (both already multiplied by ``tau^2``)."""
        inter, intra = dist_terms(*self.read_pair(student, teacher), self.temperature)
        return {"inter": self.beta * inter, "intra": self.gamma * intra}

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return sum_terms(self.terms(student, teacher, batch))

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, " + super().extra_repr()
        )
