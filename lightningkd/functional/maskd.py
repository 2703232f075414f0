"""MasKD: masked distillation with receptive tokens, functional form."""

from __future__ import annotations

import torch
from torch import Tensor

from lightningkd.functional._helpers import at_least_float32, autocast_off, check_non_negative, shape_of

DICE_EPS = 1e-12
"""Added to each mask's squared norm in :func:`dice_diversity` (the official ``dice_coeff``)."""


def token_masks(feat: Tensor, tokens: Tensor) -> Tensor:
    """MasKD's receptive-token masks ``sigmoid(K_t . F[:, :, h, w])``: one spatial mask per token.

    Huang, Zhang, You, Wang, Qian, Cao & Xu, "Masked Distillation with Receptive Tokens", ICLR 2023,
    arXiv:2205.14589; hunto/MasKD ``MaskModule.forward_mask``.

    Args:
        feat: the feature map (or logits) the tokens read, ``(N, C, H, W)``.
        tokens: the receptive tokens, ``(T, C)``.

    Shape:
        ``(N, T, H, W)``, values in (0, 1).

    Example:
        >>> import torch
        >>> token_masks(torch.zeros(1, 2, 3, 3), torch.ones(4, 2)).unique()
        tensor([0.5000])
    """
    if not torch.is_tensor(feat) or feat.ndim != 4 or not torch.is_tensor(tokens) or tokens.ndim != 2:
        raise ValueError(
            f"token_masks expects a (N, C, H, W) map and (T, C) tokens, got {shape_of(feat)} and "
            f"{shape_of(tokens)}."
        )
    if feat.shape[1] != tokens.shape[1]:
        raise ValueError(
            f"token_masks: the tokens {tuple(tokens.shape)} have {tokens.shape[1]} channels but the map "
            f"{tuple(feat.shape)} has {feat.shape[1]}; learn the tokens on this layer (or set channels)."
        )
    feat = at_least_float32(feat)
    with autocast_off(feat):  # float32 logits (autocast would run einsum in half precision)
        logits = torch.einsum("tc,nchw->nthw", tokens.to(feat.dtype), feat)
    return logits.sigmoid()


def dice_diversity(masks: Tensor, eps: float = DICE_EPS) -> Tensor:
    """Mean Dice similarity between different masks of the same image (lower: more diverse masks).

    ``mean over n and ordered pairs i != j of 2 <m_i, m_j> / ((|m_i|^2 + eps) + (|m_j|^2 + eps))``: the
    official ``dice_coeff`` of hunto/MasKD, minimised in MasKD's mask-learning stage (and in ACAM-KD's
    training, per the paper's description).

    Args:
        masks: ``(N, T, ...)``: T masks per image, flattened over the remaining dimensions; T >= 2.
        eps: added to each squared norm.

    Returns:
        0-dim tensor in [0, 1].

    Example:
        >>> import torch
        >>> dice_diversity(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))  # disjoint masks
        tensor(0.)
        >>> dice_diversity(torch.ones(1, 3, 4))  # identical masks
        tensor(1.)
    """
    if not torch.is_tensor(masks) or masks.ndim < 3 or masks.shape[1] < 2:
        raise ValueError(
            f"dice_diversity expects (N, T, ...) masks with at least 2 masks per image, got {shape_of(masks)}."
        )
    flat = at_least_float32(masks).flatten(2)
    with autocast_off(flat):  # the Gram matrix in float32 (autocast would run it in half precision)
        inner = flat @ flat.transpose(1, 2)  # (N, T, T)
    norms = inner.diagonal(dim1=1, dim2=2) + eps
    dice = 2 * inner / (norms[:, :, None] + norms[:, None, :])
    t = flat.shape[1]
    off_diagonal = ~torch.eye(t, dtype=torch.bool, device=flat.device)
    return dice[:, off_diagonal].mean()


def maskd_loss(
    student: Tensor,
    teacher: Tensor,
    masks: Tensor,
    *,
    token_weights: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """MasKD's masked feature loss: per token and channel ``sum_hw (m S - m T)^2 / (sum_hw m + eps)``.

    Huang, Zhang, You, Wang, Qian, Cao & Xu, "Masked Distillation with Receptive Tokens", ICLR 2023,
    arXiv:2205.14589; hunto/MasKD ``mmrazor/.../losses/maskd.py`` ``MasKDLoss`` (detection) and
    ``segmentation/losses/maskd.py`` (segmentation). The mask multiplies both maps before the square, so
    it enters **squared** in the numerator and linearly in the normaliser, as in the official code. The
    per-(image, token, channel) values are averaged over channels, then either weighted by
    ``token_weights`` and summed over tokens (``weight_mask=True``) or averaged over tokens, then averaged
    over images. Computed as ``einsum(m^2, (S - T)^2)``, without the official ``(N, T, C, H, W)``
    intermediate (same value, a T-th of the memory). A mask that is 0 everywhere (its sigmoid underflows
    on an extreme map) adds 0 where the official code, without ``eps``, divides 0 by 0.

    Args:
        student: the (aligned) student map, ``(N, C, H, W)``.
        teacher: the teacher map, same shape.
        masks: the masks, ``(N, T, H, W)`` (:func:`token_masks` of the teacher, times the student's after
            the warm-up).
        token_weights: ``(N, T)`` weights that sum to 1 over tokens (the softmax head), or ``None``.
        eps: added to each mask's sum (detection 0, segmentation 1e-5 in the official code).

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> s, t = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
        >>> maskd_loss(s, t, torch.full((1, 3, 2, 2), 0.5))  # 4 * 0.25 / 2 per token and channel
        tensor(0.5000)
    """
    who = "maskd_loss"
    eps = check_non_negative(who, "eps", eps)
    for side, x in (("student", student), ("teacher", teacher)):
        if not torch.is_tensor(x) or x.ndim != 4 or x.numel() == 0:
            raise ValueError(f"{who} expects non-empty (N, C, H, W) {side} maps, got {shape_of(x)}.")
    if student.shape != teacher.shape:
        raise ValueError(
            f"{who}: the student map {tuple(student.shape)} and the teacher map {tuple(teacher.shape)} must "
            "have the same shape (align the student's channels first; tap layers of the same stride)."
        )
    n, _, h, w = teacher.shape
    if not torch.is_tensor(masks) or masks.ndim != 4 or masks.shape[0] != n or masks.shape[2:] != (h, w):
        raise ValueError(
            f"{who}: masks must be (N, T, H, W) = ({n}, T, {h}, {w}) for maps {tuple(teacher.shape)}, got "
            f"{shape_of(masks)}."
        )
    masks = at_least_float32(masks)
    diff = (at_least_float32(student) - at_least_float32(teacher)).pow(2)
    with autocast_off(diff):  # the masked sums in float32 (autocast would run einsum in half precision)
        per_channel = torch.einsum("nthw,nchw->ntc", masks.pow(2), diff)
    # a mask that is 0 everywhere (sigmoid underflow on extreme maps) contributes 0, not 0 / 0
    mass = (masks.sum((2, 3)) + eps).clamp_min(torch.finfo(masks.dtype).tiny)
    per_channel = per_channel / mass[:, :, None]
    per_token = per_channel.mean(-1)  # (N, T)
    if token_weights is None:
        return per_token.mean()
    if tuple(token_weights.shape) != tuple(per_token.shape):
        raise ValueError(
            f"{who}: token_weights must be (N, T) = {tuple(per_token.shape)}, got {shape_of(token_weights)}."
        )
    return (per_token * at_least_float32(token_weights)).sum(-1).mean()
