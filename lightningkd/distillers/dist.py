"""DIST: inter- and intra-class correlation distillation on the logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightningkd.adapters import match_spatial
from lightningkd.distillers.base import OUTPUT, Distiller, Features
from lightningkd.functional.dist import dist_loss


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
    equal size.

    Args:
        beta: weight of the inter-class relation.
        gamma: weight of the intra-class relation.
        temperature: softening temperature tau > 0.
        student_layer, teacher_layer: where the logits are read (``"output"``: the model's output).
        weight, name: see :class:`~lightningkd.distillers.base.Distiller`.

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
        if not temperature > 0:
            raise ValueError(f"DIST: temperature must be > 0, got {temperature}.")
        if not beta >= 0 or not gamma >= 0:
            raise ValueError(f"DIST: beta and gamma must be >= 0, got beta={beta}, gamma={gamma}.")
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        s, t = self.read_pair(student, teacher)
        if s.ndim == 4 and t.ndim == 4 and s.shape[:2] == t.shape[:2]:
            t = match_spatial(t, tuple(s.shape[-2:]), mode="bilinear")
        return dist_loss(s, t, self.beta, self.gamma, self.temperature)

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, " + super().extra_repr()
        )
