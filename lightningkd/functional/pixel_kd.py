"""Pixel-wise knowledge distillation for semantic segmentation, functional form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import (
    check_dense_pair,
    check_label_map,
    check_positive,
    match_spatial,
    resize_labels,
)


def pixel_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` over the classes of every pixel, averaged over pixels.

    Pixel-wise distillation of Liu, Chen, Liu, Qin, Luo & Wang, "Structured Knowledge Distillation for
    Semantic Segmentation", CVPR 2019, arXiv:1903.04197, in the KL form used by Yang, Zhou, An, Wu, Huang &
    Xu, "Cross-Image Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022,
    arXiv:2204.06986. Authors' code: winycg/CIRKD ``losses/kd.py`` ``CriterionKD`` (commit 05a2753).

    Every pixel is one sample: the KL divergence is summed over the classes and averaged over the pixels.

    - ``target=None`` (the official CIRKD value): the mean is over all ``N*H*W`` pixels, ignored ones
      included (CIRKD has no ignore-label handling).
    - ``target`` given: pixels whose label is ``ignore_index`` are left out and the mean is over the valid
      pixels only (0 when there is none). The labels are resized to the logits' ``(H, W)`` with nearest
      interpolation (the logits are usually at 1/8 of the label resolution).

    Other implementations, for reference (not offered here): irfanICMLL/TorchDistiller ``CriterionKD``
    divides by ``N*C*H*W`` and has no ``T^2`` (its value is this one ``/ (C * T^2)``); the original
    irfanICMLL/structure_knowledge_distillation ``CriterionPixelWise`` is a cross-entropy
    ``-sum p_t log p_s`` with no temperature, divided by ``H*W`` only.

    When the spatial sizes differ, the teacher logits are resized to the student's ``(H, W)`` (bilinear,
    ``align_corners=False``) before the softmax; CIRKD feeds logits of equal size. Half-precision inputs
    are computed in float32.

    Args:
        student_logits: logits of the student.
        teacher_logits: logits of the teacher (same classes; resized to the student's size if needed).
        temperature: softening temperature T > 0 (CIRKD: 1).
        target: optional integer label map at any resolution; enables the ignore-aware mean.
        ignore_index: label of the pixels to leave out when ``target`` is given (255 in Cityscapes/VOC;
            CIRKD's training script uses -1).

    Shape:
        student ``(N, C, H, W)``, teacher ``(N, C, H_t, W_t)``, target ``(N, H_label, W_label)``.

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> zs, zt = torch.zeros(1, 2, 1, 2), torch.tensor([[[[0.0, 0.0]], [[0.0, 2.0]]]])
        >>> round(pixel_kd_loss(zs, zt).item(), 4)  # only pixel 2 differs: KL([.12, .88] || [.5, .5]) / 2
        0.1639
        >>> pixel_kd_loss(zs, zt, target=torch.tensor([[[0, 255]]])).item()  # pixel 2 ignored
        0.0
    """
    t = check_positive("pixel_kd_loss", "temperature", temperature)
    zs, zt = check_dense_pair("pixel_kd_loss", student_logits, teacher_logits)
    zt = match_spatial(zt, tuple(zs.shape[-2:]), mode="bilinear")
    log_p_s = F.log_softmax(zs / t, dim=1)
    log_p_t = F.log_softmax(zt / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)  # (N, H, W)
    if target is None:
        return kl.mean() * (t * t)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"pixel_kd_loss: ignore_index must be an integer label, got {ignore_index!r}.")
    check_label_map("pixel_kd_loss", target, kl.shape[0])
    valid = resize_labels(target, tuple(kl.shape[-2:])) != ignore_index
    kl = torch.where(valid, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    return kl.sum() / valid.sum().clamp_min(1) * (t * t)
