"""Attention Transfer: match the normalised spatial attention maps of several layer pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightningkd.distillers.base import Distiller, Features, require, sum_terms
from lightningkd.functional._helpers import check_choice, check_positive
from lightningkd.functional.at import AT_RESIZE_MODES, ATResize, at_loss


class AT(Distiller):
    """Activation-based attention transfer, summed over layer pairs.

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
    Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928. Follows
    szagoruyko/attention-transfer ``utils.py`` (893df54): for each pair, the mean over batch and positions
    of the squared difference of the L2-normalised maps ``mean_c |A_c|^p``
    (:func:`~lightningkd.functional.at.at_loss`); the pairs are summed. No learnable parameters; channel
    counts may differ. :meth:`terms` gives one term per pair, keyed by the student layer (or ``"pair<i>"``
    when a student layer is used twice).

    Published setting: ``weight=1000`` (beta in the README commands; the paper writes beta/2 but the code
    applies beta with no 1/2; mdistiller also uses 1000) with p = 2, on the outputs of the residual groups
    (3 groups of a CIFAR WRN; mdistiller uses every stage after the stem).

    The official code requires equal spatial sizes. Here ``resize="pool_larger"`` adaptive-average-pools
    the larger *feature map* to the smaller size before the attention map (mdistiller's choice) and
    ``"interpolate_student"`` bilinearly resizes the student map to the teacher's.

    Args:
        student_layers: tapped student layers, one per pair.
        teacher_layers: tapped teacher layers, same length and order.
        p: exponent of the attention map (2 in the paper).
        resize: ``"pool_larger"`` or ``"interpolate_student"``.
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        every student layer ``(N, C_s, H_s, W_s)`` and its teacher layer ``(N, C_t, H_t, W_t)``.

    Returns:
        the unweighted 0-dim loss (sum over pairs) from :meth:`forward`.

    Example:
        >>> import torch
        >>> at = AT(student_layers=["layer1", "layer2"], teacher_layers=["layer1", "layer2"], weight=1000.0)
        >>> s = {"layer1": torch.randn(2, 8, 8, 8), "layer2": torch.randn(2, 16, 4, 4)}
        >>> t = {"layer1": torch.randn(2, 32, 8, 8), "layer2": torch.randn(2, 64, 4, 4)}
        >>> at(s, t).ndim
        0
    """

    def __init__(
        self,
        *,
        student_layers: list[str],
        teacher_layers: list[str],
        p: float = 2.0,
        resize: ATResize = "pool_larger",
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        for side, layers in (("student_layers", student_layers), ("teacher_layers", teacher_layers)):
            if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
                raise ValueError(f"AT: {side} must be a non-empty list of layer names, got {layers!r}.")
        if len(student_layers) != len(teacher_layers):
            raise ValueError(
                f"AT: student_layers and teacher_layers must have the same length (one pair each), got "
                f"{len(student_layers)} student layers {list(student_layers)} and {len(teacher_layers)} "
                f"teacher layers {list(teacher_layers)}."
            )
        self.p = check_positive("AT", "p", p)
        self.resize = check_choice("AT", "resize", resize, AT_RESIZE_MODES)
        self.student_layers = tuple(student_layers)
        self.teacher_layers = tuple(teacher_layers)
        unique = len(set(self.student_layers)) == len(self.student_layers)
        self.term_names = (
            self.student_layers if unique else tuple(f"pair{i}" for i in range(len(student_layers)))
        )

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """One loss per layer pair, keyed by :attr:`term_names`."""
        return {
            key: at_loss(
                require(student, s, "AT", "student"),
                require(teacher, t, "AT", "teacher"),
                self.p,
                self.resize,
            )
            for key, s, t in zip(self.term_names, self.student_layers, self.teacher_layers)
        }

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return sum_terms(self.terms(student, teacher, batch))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, resize={self.resize!r}, pairs={len(self.student_layers)}"
