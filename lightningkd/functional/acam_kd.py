"""ACAM-KD: adaptive and cooperative attention masking, functional form.

Lan & Tian, "ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge Distillation", ICCV 2025,
arXiv:2503.06307. No official code is public and the paper text could not be read: these functions follow
the shape-consistent reading of the secondary descriptions, and every uncertain choice is an argument.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import at_least_float32, autocast_off, check_choice, shape_of
from lightningkd.functional.maskd import dice_diversity

Diversity = Literal["spatial", "both", "none"]
"""Which masks the Dice diversity term covers: the spatial masks, spatial and channel masks, or none."""

DIVERSITIES: tuple[str, ...] = get_args(Diversity)


def cross_attention_fusion(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """STCA-FF: every teacher position (query) attends over the student's positions (keys, values).

    ``F_fused = V softmax(Q^T K / sqrt(C_q))^T``: row ``i`` of the ``P_q x P_k`` attention is teacher
    position ``i``'s softmax over student positions. Computed with
    :func:`torch.nn.functional.scaled_dot_product_attention`, whose fused kernels (CPU flash attention,
    CUDA flash and memory-efficient attention) never hold the ``P_q x P_k`` matrix: memory grows with
    the number of positions, not its square. Those kernels need equal query, key and value widths, so
    ``Q`` and ``K`` are zero-padded to ``C`` channels (zeros add nothing to ``Q^T K``) and the scale stays
    ``1 / sqrt(C_q)``.

    Args:
        query: ``(N, C_q, P_q)``, from the teacher.
        key: ``(N, C_q, P_k)``, from the student.
        value: ``(N, C, P_k)``, from the student.

    Shape:
        ``(N, C, P_q)``.

    Example:
        >>> import torch
        >>> v = torch.arange(6.0).reshape(1, 2, 3)
        >>> cross_attention_fusion(torch.zeros(1, 1, 2), torch.zeros(1, 1, 3), v)  # uniform attention
        tensor([[[1., 1.],
                 [4., 4.]]])
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not torch.is_tensor(x) or x.ndim != 3:
            raise ValueError(f"cross_attention_fusion expects (N, C, P) {name}, got {shape_of(x)}.")
    if query.shape[:2] != key.shape[:2] or key.shape[0] != value.shape[0] or key.shape[2] != value.shape[2]:
        raise ValueError(
            "cross_attention_fusion: query (N, C_q, P_q), key (N, C_q, P_k) and value (N, C, P_k) disagree: "
            f"got {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}."
        )
    c_q, c = query.shape[1], value.shape[1]
    if c_q > c:
        raise ValueError(f"cross_attention_fusion: the query width {c_q} exceeds the value width {c}.")
    pad = (0, c - c_q)
    # the fused kernels need a unit stride on the channel dim (else the math path materialises P_q x P_k)
    q = F.pad(query.transpose(1, 2), pad).contiguous().unsqueeze(1)  # (N, 1, P_q, C)
    k = F.pad(key.transpose(1, 2), pad).contiguous().unsqueeze(1)
    v = value.transpose(1, 2).contiguous().unsqueeze(1)  # (N, 1, P_k, C)
    fused = F.scaled_dot_product_attention(q, k, v, scale=c_q**-0.5)
    return fused.squeeze(1).transpose(1, 2)


def acam_masks(fused: Tensor, channel_tokens: Tensor, spatial_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """ASCM: channel masks ``sigmoid(m_c * mean_hw(F))`` and spatial masks ``sigmoid(m_s . F)``.

    Args:
        fused: the fused map ``(N, C, H, W)``.
        channel_tokens: ``(M, 1)`` (one scalar per mask, the notes' ``m_c``) or ``(M, C)`` (one weight per
            channel and mask, the element-wise reading ``sigmoid(m_c * v)``).
        spatial_tokens: ``(M, C)``, one token per mask (as MasKD's receptive tokens).

    Returns:
        ``(channel_masks (N, M, C), spatial_masks (N, M, H, W))``, in float32 or wider.

    Example:
        >>> import torch
        >>> c, s = acam_masks(torch.zeros(2, 3, 4, 4), torch.ones(5, 1), torch.ones(5, 3))
        >>> tuple(c.shape), tuple(s.shape), c.unique().item()
        ((2, 5, 3), (2, 5, 4, 4), 0.5)
    """
    if not torch.is_tensor(fused) or fused.ndim != 4:
        raise ValueError(f"acam_masks expects a (N, C, H, W) fused map, got {shape_of(fused)}.")
    c = fused.shape[1]
    m = spatial_tokens.shape[0]
    if spatial_tokens.ndim != 2 or spatial_tokens.shape[1] != c:
        raise ValueError(f"acam_masks: spatial_tokens must be (M, {c}), got {shape_of(spatial_tokens)}.")
    if channel_tokens.ndim != 2 or channel_tokens.shape[0] != m or channel_tokens.shape[1] not in (1, c):
        raise ValueError(
            f"acam_masks: channel_tokens must be ({m}, 1) or ({m}, {c}), got {shape_of(channel_tokens)}."
        )
    channel, spatial = acam_mask_logits(fused, channel_tokens, spatial_tokens)
    return channel.sigmoid(), spatial.sigmoid()


def acam_mask_logits(fused: Tensor, channel_tokens: Tensor, spatial_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The logits of :func:`acam_masks` (before the sigmoid): ``m_c * mean_hw(F)`` and ``m_s . F``.

    :func:`acam_terms` with ``logits=True`` takes them, to normalise by the masks' sums without dividing
    0 by 0 when a sigmoid underflows.
    """
    fused = at_least_float32(fused)
    pooled = fused.mean((2, 3))  # (N, C)
    channel = channel_tokens.to(fused.dtype)[None] * pooled[:, None, :]
    with autocast_off(fused):  # float32 logits (autocast would run einsum in half precision)
        spatial = torch.einsum("mc,nchw->nmhw", spatial_tokens.to(fused.dtype), fused)
    return channel, spatial


def acam_terms(
    student: Tensor,
    teacher: Tensor,
    channel_masks: Tensor,
    spatial_masks: Tensor,
    *,
    mask_power: int = 1,
    normalize_by_mask_sum: bool = True,
    diversity: Diversity = "spatial",
    channel_weight: float = 1.0,
    spatial_weight: float = 1.0,
    diversity_weight: float = 1.0,
    logits: bool = False,
) -> dict[str, Tensor]:
    """ACAM-KD's masked channel and spatial losses and the Dice diversity of the masks.

    With ``D = T - S`` (student aligned to the teacher's channels), ``P = H W`` positions and ``M`` masks,
    per image::

        L_c = 1/M sum_m [sum_k Mc[m, k]^p sum_hw D[k]^2] / (P * sum_k Mc[m, k])
        L_s = 1/M sum_m [sum_hw Ms[m]^p sum_k D[:, hw]^2] / (C * sum_hw Ms[m])

    averaged over images; ``p`` is ``mask_power``. Without ``normalize_by_mask_sum`` the divisor is
    ``P * C`` (the mean, so that all-one masks give the plain mean squared error either way). The
    diversity is :func:`~lightningkd.functional.maskd.dice_diversity` of the spatial masks (``"both"``:
    plus that of the channel masks). ``mask_power``, the normaliser and the diversity's reach are the
    uncertain choices of the reading (see :class:`~lightningkd.distillers.ACAMKD`).

    Args:
        student: the aligned student map ``(N, C, H, W)``.
        teacher: the teacher map, same shape.
        channel_masks: ``(N, M, C)``.
        spatial_masks: ``(N, M, H, W)``.
        mask_power: 1 (the mask weighs the squared error once) or 2 (the mask multiplies both maps before
            the square, as MasKD).
        normalize_by_mask_sum: divide each mask's sum by its total instead of by ``P * C``.
        diversity: ``"spatial"``, ``"both"`` or ``"none"``.
        channel_weight: the channel term's coefficient (the paper's alpha, 1); 0 drops the term.
        spatial_weight: the spatial term's coefficient (the paper's alpha, 1); 0 drops the term.
        diversity_weight: the diversity term's coefficient (the paper's lambda, 1); 0 drops the term.
        logits: ``channel_masks`` and ``spatial_masks`` are the masks' logits (:func:`acam_mask_logits`):
            the mask-sum normaliser is then computed in log space, finite even where a sigmoid underflows
            to 0 (masks trained by this loss can be driven there).

    Returns:
        ``{"channel", "spatial", "diversity"}`` (those with a non-zero weight), each 0-dim and weighted.

    Example:
        >>> import torch
        >>> s, t = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
        >>> c, sp = torch.full((1, 3, 2), 0.5), torch.full((1, 3, 2, 2), 0.5)
        >>> {k: v.item() for k, v in acam_terms(s, t, c, sp, diversity="none").items()}
        {'channel': 1.0, 'spatial': 1.0}
    """
    who = "acam_terms"
    if mask_power not in (1, 2):
        raise ValueError(f"{who}: mask_power must be 1 or 2, got {mask_power!r}.")
    check_choice(who, "diversity", diversity, DIVERSITIES)
    if student.ndim != 4 or student.shape != teacher.shape:
        raise ValueError(
            f"{who}: the student map {shape_of(student)} and the teacher map {shape_of(teacher)} must be "
            "(N, C, H, W) of the same shape (align the student's channels first)."
        )
    n, c, h, w = teacher.shape
    if channel_masks.ndim != 3 or channel_masks.shape[0] != n or channel_masks.shape[2] != c:
        raise ValueError(f"{who}: channel_masks must be ({n}, M, {c}), got {shape_of(channel_masks)}.")
    m = channel_masks.shape[1]
    if tuple(spatial_masks.shape) != (n, m, h, w):
        raise ValueError(f"{who}: spatial_masks must be ({n}, {m}, {h}, {w}), got {shape_of(spatial_masks)}.")
    positions = h * w
    sq = (at_least_float32(teacher) - at_least_float32(student)).pow(2)
    channel_logits = spatial_logits = None
    if logits:
        channel_logits, spatial_logits = at_least_float32(channel_masks), at_least_float32(spatial_masks)
        channel_masks, spatial_masks = channel_logits.sigmoid(), spatial_logits.sigmoid()
    out: dict[str, Tensor] = {}
    if channel_weight:
        per_channel = sq.sum((2, 3)) / positions  # (N, C)
        out["channel"] = (
            channel_weight
            * _masked_mean(
                channel_masks, channel_logits, per_channel, mask_power, normalize_by_mask_sum
            ).mean()
        )
    if spatial_weight:
        per_position = sq.sum(1).flatten(1) / c  # (N, HW)
        out["spatial"] = (
            spatial_weight
            * _masked_mean(
                spatial_masks.flatten(2),
                _flat(spatial_logits),
                per_position,
                mask_power,
                normalize_by_mask_sum,
            ).mean()
        )
    if diversity != "none" and diversity_weight and m > 1:
        dice = dice_diversity(spatial_masks)
        if diversity == "both":
            dice = dice + dice_diversity(channel_masks)
        out["diversity"] = diversity_weight * dice
    if not out:
        raise ValueError(f"{who}: every term has weight 0; give at least one a positive weight.")
    return out


def _flat(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.flatten(2)


def _masked_mean(masks: Tensor, logits: Tensor | None, error: Tensor, power: int, normalize: bool) -> Tensor:
    """``sum_k m[n, j, k]^p e[n, k] / sum_k m[n, j, k]`` (``normalize``) or ``/ K``, per image and mask.

    From ``logits``, the normaliser is computed as ``exp((p - 1) L) sum_k w^p e / sum_k w`` with
    ``w = exp(log m - L)`` and ``L`` the largest ``log m`` of the mask: the same value, and finite even when
    every ``m`` underflows to 0 (then the plain ratio is 0 / 0, and its gradient NaN).
    """
    with autocast_off(error):  # the weighted sums in float32 (autocast would run einsum in half)
        if not normalize:
            return torch.einsum("njk,nk->nj", masks.pow(power), error) / error.shape[-1]
        if logits is None:
            return torch.einsum("njk,nk->nj", masks.pow(power), error) / masks.sum(-1)
        log_masks = F.logsigmoid(logits)
        top = log_masks.amax(-1, keepdim=True)
        weights = (log_masks - top).exp()
        ratio = torch.einsum("njk,nk->nj", weights.pow(power), error) / weights.sum(-1)
        return ratio * ((power - 1) * top.squeeze(-1)).exp()
