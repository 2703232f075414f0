"""MGD: masked generative distillation of one feature map."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightningkd.distillers.base import Distiller, Features, read_aligned_pair
from lightningkd.functional._helpers import (
    check_choice,
    check_non_negative,
    check_positive_int,
)
from lightningkd.functional.mgd import MGD_MASKS, MGDMask, check_mask_ratio, mgd_loss


class MGD(Distiller):
    """Masked generative distillation: ``alpha * sum((G(align(S) * M) - T)^2) / N`` with a random mask ``M``.

    Yang, Li, Shao, Shi, Yuan & Yuan, "Masked Generative Distillation", ECCV 2022, arXiv:2205.01529.
    Authors' code: yzd-v/MGD ``det/mmdet/distillation/losses/mgd.py`` ``FeatureLoss``,
    ``seg/mmseg/distillation/losses/mgd.py``, ``cls/mmcls/distillation/losses/mgd.py`` ``MGDLoss``
    (2c9da0b); matches the parity fixtures made from them. The student's map (through a 1x1 ``align``
    conv with bias when ``student_channels`` differs from ``channels``) is masked at random and a
    generator (Conv3x3 -> ReLU -> Conv3x3, ``C_t -> C_t`` with biases) must regenerate the teacher's
    full map from it; see :func:`~lightningkd.functional.mgd.mgd_loss`. A fresh mask is drawn with
    :func:`torch.rand` on the features' device at every call (it follows the global seed). The align
    conv and the generator are trained and checkpointed with the student and unused at inference.

    The paper covers the three tasks; the authors' settings:

    - detection: each FPN level (one MGD per level, added:
      :class:`~lightningkd.distillers.PerLevel`), ``mask="spatial", mask_ratio=0.65, alpha=2e-5``;
      student initialised from the teacher's neck and head where shapes allow;
    - semantic segmentation: the backbone's last stage (e.g. ResNet-18 512 -> ResNet-101 2048 channels),
      ``mask="spatial", mask_ratio=0.75, alpha=2e-5``, plus CWD on the logits (``temperature=4``,
      ``weight=3``; :class:`~lightningkd.distillers.ChannelWiseDivergence`);
    - classification: the last stage's map, ``mask="channel", mask_ratio=0.15, alpha=7e-5``.

    The loss weight is 1 in every config (``alpha`` carries the scale).

    Args:
        student_layer: the student's feature map (``"<layer>:<key>"`` for an FPN level).
        teacher_layer: the teacher's feature map.
        channels: C_t, the teacher's channels (the generator's width).
        student_channels: C_s when it differs from ``channels`` (adds the align conv); ``None``: equal.
        alpha: loss coefficient (det / seg 2e-5, cls 7e-5).
        mask: ``"spatial"`` (zero a position where ``rand > 1 - mask_ratio``; det, seg) or ``"channel"``
            (zero a channel where ``rand < mask_ratio``; cls).
        mask_ratio: fraction masked in ``[0, 1]`` (det 0.65, seg 0.75, cls 0.15).
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(N, C_s, H, W)``, teacher ``(N, C_t, H, W)`` (same spatial size).

    Returns:
        the unweighted 0-dim loss from :meth:`forward` (``alpha`` included).

    Example:
        >>> import torch
        >>> mgd = MGD(student_layer="layer4", teacher_layer="layer4", channels=16, student_channels=8,
        ...           mask="channel", mask_ratio=0.15, alpha=7e-5)
        >>> mgd({"layer4": torch.randn(2, 8, 4, 4)}, {"layer4": torch.randn(2, 16, 4, 4)}).ndim
        0
    """

    def __init__(
        self,
        *,
        student_layer: str = "backbone:0",
        teacher_layer: str = "backbone:0",
        channels: int = 256,
        student_channels: int | None = None,
        alpha: float = 2e-5,
        mask: MGDMask = "spatial",
        mask_ratio: float = 0.65,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        who = "MGD"
        self.channels = check_positive_int(who, "channels", channels)
        if student_channels is not None:
            check_positive_int(who, "student_channels", student_channels)
        self.student_channels = student_channels
        self.alpha = check_non_negative(who, "alpha", alpha)
        self.mask = check_choice(who, "mask", mask, MGD_MASKS)
        self.mask_ratio = check_mask_ratio(who, mask_ratio)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)
        self.align: nn.Conv2d | None = None
        if student_channels is not None and student_channels != channels:
            self.align = nn.Conv2d(student_channels, channels, kernel_size=1)
        self.generator = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )

    def reset_parameters(self) -> None:
        """Re-initialise the align conv and the generator with PyTorch's default init (as the official
        code; :class:`~lightningkd.distillers.PerLevel` calls this on every level's copy)."""
        if self.align is not None:
            self.align.reset_parameters()
        self.generator[0].reset_parameters()
        self.generator[2].reset_parameters()

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        s, t = read_aligned_pair(self, student, teacher)
        return mgd_loss(s, t, self.generator, alpha=self.alpha, mask=self.mask, mask_ratio=self.mask_ratio)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, student_channels={self.student_channels}, alpha={self.alpha}, "
            f"mask={self.mask!r}, mask_ratio={self.mask_ratio}, " + super().extra_repr()
        )
