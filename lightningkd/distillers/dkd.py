"""Decoupled knowledge distillation (DKD) on the logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightningkd.distillers.base import OUTPUT, Distiller, Features, require_labels, sum_terms
from lightningkd.functional._helpers import check_non_negative, check_positive
from lightningkd.functional.dkd import dkd_terms


class DKD(Distiller):
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` on the models' logits, split at the true class.

    Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.
    Authors' code: megvii-research/mdistiller ``mdistiller/distillers/DKD.py`` (commit a08d46f). TCKD is
    the KL divergence of the binary target / non-target probabilities, NCKD the KL divergence of the
    softmax over the non-target classes; both ``T^2 * KL`` summed over classes and averaged over the
    batch. See :func:`lightningkd.functional.dkd.dkd_terms` for the numerically safer formulation used
    here (no 1000-subtraction trick, no plain ``log`` of probabilities).

    The labels are read from ``batch["target"]`` (:attr:`needs_labels` is set). :meth:`terms` returns
    ``{"tckd": alpha * TCKD, "nckd": beta * NCKD}``.

    The official DKD multiplies its loss by a warm-up factor ``min(epoch / warmup, 1)`` (20 epochs on
    CIFAR-100, 1 on ImageNet). That factor is **not** part of this loss: add
    :class:`lightningkd.callbacks.KDWeightWarmup` (``epochs=20`` on CIFAR-100) to the trainer.

    In short schedules (a few thousand steps or fewer) ``beta=8`` can wreck the student: the weighted
    NCKD term is 5-15x the cross-entropy early on and the gradient norm spikes during the warm-up.
    Clipping the gradient norm at 1.0 (``Trainer(gradient_clip_val=1.0)``) removed the collapse in the
    project's measurement (README, "DKD in short schedules").

    Published settings (mdistiller configs): CIFAR-100 ``alpha=1, beta=8, temperature=4`` (res32x4 ->
    res8x4; ``beta=2`` for res56 -> res20, beta is tuned per pair), CE weight 1; ImageNet R34 -> R18
    ``alpha=1, beta=0.5, temperature=1``.

    Args:
        alpha: weight of TCKD.
        beta: weight of NCKD.
        temperature: softening temperature T > 0.
        student_layer: where the student's logits are read (``"output"``: the model's output).
        teacher_layer: where the teacher's logits are read (``"output"``: the model's output).
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        logits ``(N, C)`` for both models; ``batch["target"]``: ``(N,)`` integer labels in ``[0, C)``.

    Example:
        >>> import torch
        >>> z = torch.randn(4, 10)
        >>> DKD()({"output": z}, {"output": z}, {"target": torch.tensor([0, 3, 9, 1])}).item()
        0.0
    """

    needs_labels = True

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        student_layer: str = OUTPUT,
        teacher_layer: str = OUTPUT,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.alpha = check_non_negative("DKD", "alpha", alpha)
        self.beta = check_non_negative("DKD", "beta", beta)
        self.temperature = check_positive("DKD", "temperature", temperature)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """``{"tckd": alpha * TCKD, "nckd": beta * NCKD}``."""
        s, t = self.read_pair(student, teacher)
        tckd, nckd = dkd_terms(s, t, require_labels(batch, "DKD"), self.temperature)
        return {"tckd": self.alpha * tckd, "nckd": self.beta * nckd}

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return sum_terms(self.terms(student, teacher, batch))

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, " + super().extra_repr()
        )
