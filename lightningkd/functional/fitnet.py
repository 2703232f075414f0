"""FitNets hint loss, functional form."""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import (
    ResizeMode,
    check_choice,
    common_float_dtype,
    match_spatial,
)

FITNET_RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
"""Values of ``resize`` in :func:`fitnet_loss` and ``FitNet(resize=...)``."""


def fitnet_loss(student_feat: Tensor, teacher_feat: Tensor, resize: ResizeMode = "bilinear") -> Tensor:
    """Mean squared error between the (regressed) student hint and the teacher hint.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015,
    arXiv:1412.6550. The paper writes ``1/2 ||u_h - r(v_g)||^2``; this follows the reference
    implementation megvii-research/mdistiller (``mdistiller/distillers/FitNet.py``, a08d46f), which takes
    the mean over *all* elements (``F.mse_loss``) and applies the weight (100 on CIFAR) outside.

    The student feature must already have the teacher's channels: map it with a regressor first (see
    :class:`lightningkd.distillers.fitnet.FitNet`). When two ``(N, C, H, W)`` maps differ in spatial size
    only, the regressed student map is resized to the teacher's ``(H, W)`` by ``resize`` (mdistiller picks
    a strided regressor instead). Half-precision inputs are compared in float32.

    Args:
        student_feat: regressed student feature.
        teacher_feat: teacher feature.
        resize: how a student map of another spatial size is resized: an
            :func:`~torch.nn.functional.interpolate` mode (``"bilinear"``, ``"bicubic"``, ``"nearest"``,
            ``"area"``) or ``"pool"`` (adaptive average pooling).

    Shape:
        identical shapes ``(N, *)``, or student ``(N, C, H_s, W_s)`` and teacher ``(N, C, H_t, W_t)``.

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> fitnet_loss(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)).item()
        1.0
    """
    if not torch.is_tensor(student_feat) or not torch.is_tensor(teacher_feat):
        raise TypeError(
            f"fitnet_loss expects tensors, got {type(student_feat).__name__} and {type(teacher_feat).__name__}."
        )
    check_choice("fitnet_loss", "resize", resize, FITNET_RESIZE_MODES)
    if student_feat.ndim == 4 and teacher_feat.ndim == 4 and student_feat.shape[:2] == teacher_feat.shape[:2]:
        student_feat = match_spatial(student_feat, tuple(teacher_feat.shape[-2:]), mode=resize)
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"fitnet_loss: student feature {tuple(student_feat.shape)} and teacher feature "
            f"{tuple(teacher_feat.shape)} must have the same shape, or be (N, C, H, W) maps that differ in "
            "H, W only (map the student to the teacher's channels with a regressor first)."
        )
    # at least float32: squares of fp16 activations overflow, bf16 sums lose digits
    dtype = common_float_dtype(student_feat, teacher_feat)
    return F.mse_loss(student_feat.to(dtype), teacher_feat.to(dtype))
