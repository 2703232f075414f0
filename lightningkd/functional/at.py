"""Attention Transfer (activation-based), functional form."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import (
    at_least_float32,
    check_choice,
    check_positive,
    match_spatial,
    shape_of,
)

ATResize = Literal["pool_larger", "interpolate_student"]
"""How :func:`at_loss` reconciles different spatial sizes (the official code does not)."""

AT_RESIZE_MODES: tuple[str, ...] = get_args(ATResize)


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention map ``normalize(vec(mean_c |A_c|^p))`` of a ``(N, C, H, W)`` feature map.

    Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
    Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928. Follows
    szagoruyko/attention-transfer ``utils.py`` function ``at`` (893df54): the mean (not the sum) over
    channels, which is the same after the per-sample L2 normalisation (eps 1e-12, as
    :func:`torch.nn.functional.normalize`). The official code hard-codes p = 2; other p use ``|A|^p`` as in
    the paper. Half-precision inputs are computed in float32.

    Args:
        feat: feature map.
        p: exponent p > 0 (2 in the paper's experiments).

    Shape:
        feat ``(N, C, H, W)``; returns ``(N, H * W)``.

    Returns:
        the L2-normalised attention map of every sample.

    Example:
        >>> import torch
        >>> attention_map(torch.ones(1, 3, 2, 2))
        tensor([[0.5000, 0.5000, 0.5000, 0.5000]])
    """
    if not torch.is_tensor(feat) or feat.ndim != 4:
        shape = tuple(feat.shape) if torch.is_tensor(feat) else type(feat).__name__
        raise ValueError(f"attention_map expects a (N, C, H, W) feature map, got {shape}.")
    check_positive("attention_map", "p", p)
    feat = at_least_float32(feat)
    # x.pow(2) is bit-identical to |x|^2, so p=2 matches the official x.pow(2) exactly.
    am = feat.abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(am, p=2.0, dim=1, eps=1e-12)


def at_loss(
    student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0, resize: ATResize = "pool_larger"
) -> Tensor:
    """Attention-transfer loss: mean over batch and positions of ``(Q_s - Q_t)^2``.

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017, arXiv:1612.03928. Matches
    ``at_loss`` of szagoruyko/attention-transfer ``utils.py`` (893df54): the squared difference of the
    normalised attention maps (:func:`attention_map`) averaged over the batch *and* the H*W positions, with
    no square root (the paper writes a per-sample L2 distance). The training objective is
    ``beta * sum over layer pairs``, beta = 1000 (the paper writes beta/2, the code has no 1/2).

    Channel counts may differ. The official code fails when the spatial sizes differ; here they are
    reconciled first, by ``resize``:

    - ``"pool_larger"`` (default, as megvii-research/mdistiller's ``single_stage_at_loss``): the larger
      *feature map* is adaptive-average-pooled to the smaller size (per side, so non-square maps work),
      then the attention maps are taken.
    - ``"interpolate_student"``: the student feature map is bilinearly resized to the teacher's size.

    Args:
        student_feat: student feature map.
        teacher_feat: teacher feature map of the same images.
        p: exponent of the attention map (2 in the paper).
        resize: ``"pool_larger"`` or ``"interpolate_student"``.

    Shape:
        student ``(N, C_s, H_s, W_s)``, teacher ``(N, C_t, H_t, W_t)``.

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 4, 8, 8)
        >>> at_loss(x, 3 * x.repeat(1, 2, 1, 1)).abs().item() < 1e-12
        True
    """
    for what, t in (("student", student_feat), ("teacher", teacher_feat)):
        if not torch.is_tensor(t) or t.ndim != 4:
            raise ValueError(
                f"at_loss expects (N, C, H, W) feature maps, got student "
                f"{shape_of(student_feat)} and teacher {shape_of(teacher_feat)} ({what} is not 4-D)."
            )
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(
            f"at_loss: student feature {tuple(student_feat.shape)} and teacher feature "
            f"{tuple(teacher_feat.shape)} must have the same batch size."
        )
    check_positive("at_loss", "p", p)
    check_choice("at_loss", "resize", resize, AT_RESIZE_MODES)
    # float32 before the resize too: pooling or interpolating in half precision rounds the maps
    student_feat, teacher_feat = at_least_float32(student_feat), at_least_float32(teacher_feat)
    s_size, t_size = tuple(student_feat.shape[-2:]), tuple(teacher_feat.shape[-2:])
    if s_size != t_size:
        if resize == "pool_larger":
            size = (min(s_size[0], t_size[0]), min(s_size[1], t_size[1]))
            student_feat = match_spatial(student_feat, size, mode="pool")
            teacher_feat = match_spatial(teacher_feat, size, mode="pool")
        else:
            student_feat = match_spatial(student_feat, t_size, mode="bilinear")
    q_s = attention_map(student_feat, p)
    q_t = attention_map(teacher_feat, p)
    dtype = torch.promote_types(q_s.dtype, q_t.dtype)
    return (q_s.to(dtype) - q_t.to(dtype)).pow(2).mean()
