"""Pixel-wise knowledge distillation on segmentation logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightningkd.distillers.base import OUTPUT, Distiller, Features, require_labels
from lightningkd.functional._helpers import check_positive
from lightningkd.functional.pixel_kd import pixel_kd_loss


class PixelKD(Distiller):
    """Per-pixel soft-target distillation: ``T^2 * KL(p_t^T || p_s^T)`` over the classes, mean over pixels.

    Pixel-wise distillation of Liu, Chen, Liu, Qin, Luo & Wang, "Structured Knowledge Distillation for
    Semantic Segmentation", CVPR 2019, arXiv:1903.04197, in the KL form used as the logit term of Yang et
    al., "Cross-Image Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022,
    arXiv:2204.06986. Authors' code: winycg/CIRKD ``losses/kd.py`` ``CriterionKD`` (commit 05a2753); see
    :func:`~lightningkd.functional.pixel_kd.pixel_kd_loss`.

    Ignored pixels: by default (``ignore_index=255``) the pixels labelled ``ignore_index`` in
    ``batch["target"]`` (resized to the logits' size with nearest interpolation) are left out and the loss
    is the mean over the valid pixels, so unlabelled borders and padding do not pull the student towards
    the teacher there. This is a deliberate departure from CIRKD, which averages over all ``N*H*W`` pixels;
    ``ignore_index=None`` reproduces the official value exactly and then reads no labels
    (:attr:`needs_labels` is ``ignore_index is not None``).

    When the student's and teacher's logits have different spatial sizes, the teacher logits are resized
    to the student's size (bilinear, ``align_corners=False``).

    Published setting (CIRKD, Cityscapes): ``temperature=1``, weight 1, on the un-upsampled 1/8-resolution
    logits of DeepLabV3/PSPNet, with the cross-entropy task loss (weight 1).

    Args:
        temperature: softening temperature T > 0 (CIRKD: 1).
        ignore_index: label of the pixels to leave out (``batch["target"]`` is then required), or ``None``
            for the official CIRKD mean over every pixel.
        student_layer: where the student's logits are read (``"output"``: the model's output).
        teacher_layer: where the teacher's logits are read (``"output"``: the model's output).
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student logits ``(N, C, H, W)``, teacher logits ``(N, C, H_t, W_t)``; ``batch["target"]``:
        ``(N, H_label, W_label)`` integer labels.

    Returns:
        the unweighted 0-dim loss from :meth:`forward`.

    Example:
        >>> import torch
        >>> z = torch.randn(2, 19, 8, 8)
        >>> labels = torch.full((2, 64, 64), 255)
        >>> PixelKD()({"output": z}, {"output": z}, {"target": labels}).item()
        0.0
        >>> PixelKD(ignore_index=None).needs_labels
        False
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        ignore_index: int | None = 255,
        student_layer: str = OUTPUT,
        teacher_layer: str = OUTPUT,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.temperature = check_positive("PixelKD", "temperature", temperature)
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise ValueError(
                f"PixelKD: ignore_index must be an integer label or None (no masking), got {ignore_index!r}."
            )
        self.ignore_index = ignore_index
        self.needs_labels = ignore_index is not None
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        s, t = self.read_pair(student, teacher)
        if self.ignore_index is None:
            return pixel_kd_loss(s, t, self.temperature)
        if batch is None or "target" not in batch:
            raise ValueError(
                f"PixelKD with ignore_index={self.ignore_index} needs the label map to find the ignored pixels: "
                "call it with batch={'target': labels} (the distillation modules do this for you), or pass "
                "ignore_index=None to average over every pixel as CIRKD does."
            )
        target = require_labels(batch, "PixelKD")
        return pixel_kd_loss(s, t, self.temperature, target, self.ignore_index)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ignore_index={self.ignore_index}, " + super().extra_repr()
