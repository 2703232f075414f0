"""FitNets hint loss, functional form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fitnet_loss(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Mean squared error between the (regressed) student hint and the teacher hint.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015,
    arXiv:1412.6550. The paper writes ``1/2 ||u_h - r(v_g)||^2``; this follows the reference
    implementation megvii-research/mdistiller (``mdistiller/distillers/FitNet.py``, a08d46f), which takes
    the mean over *all* elements (``F.mse_loss``) and applies the weight (100 on CIFAR) outside.

    The student feature must already have the teacher's shape: map it with a regressor first (see
    :class:`lightningkd.distillers.fitnet.FitNet`). Half-precision inputs are compared in float32.

    Args:
        student_feat: regressed student feature, any shape.
        teacher_feat: teacher feature of the same shape.

    Shape:
        both inputs ``(N, *)`` with identical shapes, e.g. ``(N, C, H, W)``.

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
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"fitnet_loss: student feature {tuple(student_feat.shape)} and teacher feature "
            f"{tuple(teacher_feat.shape)} must have the same shape (map the student with a regressor first)."
        )
    dtype = _loss_dtype(student_feat, teacher_feat)
    return F.mse_loss(student_feat.to(dtype), teacher_feat.to(dtype))


def _loss_dtype(*tensors: Tensor) -> torch.dtype:
    # Common floating dtype, at least float32: squares of fp16 activations overflow, bf16 sums lose digits.
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
