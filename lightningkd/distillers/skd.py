"""SKD pair-wise distillation: match the similarities between the pooled nodes of a feature map."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightningkd.distillers.base import Distiller, Features
from lightningkd.functional._helpers import check_choice, check_fraction
from lightningkd.functional.skd import SKD_POOLINGS, SKDPooling, skd_loss


class PairwiseSimilarityKD(Distiller):
    """Structured pair-wise distillation: mean squared difference of the node-to-node cosine similarities.

    Liu, Chen, Liu, Qin, Luo & Wang, "Structured Knowledge Distillation for Semantic Segmentation", CVPR
    2019, arXiv:1903.04197 (pair-wise term; the adversarial holistic term is not included). Authors' code:
    irfanICMLL/structure_knowledge_distillation ``utils/criterion.py``
    ``CriterionPairWiseforWholeFeatAfterPool`` (ce208e1); ``pooling="fixed_2x2"`` follows the
    re-implementation winycg/CIRKD ``losses/skd.py`` ``CriterionStructuralKD`` (05a2753), which gives a
    different number. See :func:`~lightningkd.functional.skd.skd_loss` for both.

    Both maps are max-pooled into nodes, so the student and teacher may have different channel counts and
    no adapter is needed. When the spatial sizes differ, the teacher map is resized to the student's size
    (bilinear, ``align_corners=False``) before pooling. No learnable parameters.

    Published setting (authors' run script, Cityscapes, PSPNet-R101 -> R18): on the PSP head output after
    the pyramid pooling module, ``pool_scale=0.5``, ``weight=0.5`` (the argparse default is 1.0), together
    with the pixel-wise term (:class:`~lightningkd.distillers.pixel_kd.PixelKD`) and the adversarial term.

    Args:
        student_layer: tapped student layer (a ``(N, C_s, H, W)`` feature map).
        teacher_layer: tapped teacher layer (a ``(N, C_t, H_t, W_t)`` feature map).
        pooling: ``"original"`` (window = ``pool_scale`` of the map, about 2x2 nodes) or ``"fixed_2x2"``
            (CIRKD: 2x2 windows, about ``H/2 x W/2`` nodes).
        pool_scale: window size as a fraction of the map for ``pooling="original"`` (authors: 0.5), in
            (0, 1]; leave it at 0.5 with ``"fixed_2x2"``.
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(N, C_s, H, W)``, teacher ``(N, C_t, H_t, W_t)``.

    Returns:
        the unweighted 0-dim loss from :meth:`forward`.

    Example:
        >>> import torch
        >>> skd = PairwiseSimilarityKD(student_layer="psp", teacher_layer="psp", weight=0.5)
        >>> f = torch.randn(2, 16, 8, 8)
        >>> loss = skd({"psp": f}, {"psp": torch.cat([f, f], dim=1)})  # same directions, twice the channels
        >>> round(loss.item(), 6)
        0.0
    """

    def __init__(
        self,
        *,
        student_layer: str,
        teacher_layer: str,
        pooling: SKDPooling = "original",
        pool_scale: float = 0.5,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        check_choice("PairwiseSimilarityKD", "pooling", pooling, SKD_POOLINGS)
        check_fraction("PairwiseSimilarityKD", "pool_scale", pool_scale)
        if pooling == "fixed_2x2" and pool_scale != 0.5:
            raise ValueError(
                f"PairwiseSimilarityKD: pool_scale={pool_scale} has no effect with pooling='fixed_2x2' (fixed "
                "2x2 windows); remove it or use pooling='original'."
            )
        self.pooling = pooling
        self.pool_scale = float(pool_scale)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        s, t = self.read_pair(student, teacher)
        return skd_loss(s, t, self.pooling, self.pool_scale)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, pool_scale={self.pool_scale}, " + super().extra_repr()


SKD = PairwiseSimilarityKD
"""Short alias of :class:`PairwiseSimilarityKD`."""
