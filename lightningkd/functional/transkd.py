"""TransKD: cross selective fusion, hierarchical context loss and patch-embedding alignment, functional form.

Liu, Yang, Roitberg, Zhang, Peng, Liu, Wang & Stiefelhagen, "TransKD: Transformer Knowledge Distillation for
Efficient Semantic Segmentation", IEEE Transactions on Intelligent Transportation Systems (2024),
arXiv:2202.13393. Official code: RuipingL/TransKD (39ab795), ``train/CSF.py`` (``SK``, ``SKF``, ``hcl``),
``train/train_TransKDBase.py`` (the embedding loss and its weights), ``train/models/Segformer4EmbeddingKD.py``
(where the patch embeddings are read). The learnable parts (the fusion modules and the embedding
projections) and the resizing are in :mod:`lightningkd.distillers.transkd`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import at_least_float32, check_non_negative, shape_of

HCL_LEVELS: tuple[int, ...] = (4, 2, 1)
"""Sides of the pooled grids of HCL, in the order their weights halve (``hcl`` in ``train/CSF.py``)."""

PEA_WEIGHTS: tuple[float, ...] = (0.1, 0.1, 0.5, 1.0)
"""Per-stage weights of PEA, shallow to deep (``--embed-weights`` of ``train/train_TransKDBase.py``)."""


def transkd_hcl_levels(height: int, levels: Sequence[int] = HCL_LEVELS) -> list[tuple[int, float]]:
    """The pooled levels HCL uses on a map of height ``height``, with their weights.

    As ``hcl`` in the official ``train/CSF.py``: a level ``l`` is used when ``l < height`` (the height
    only, as the official code), and each *used* level gets half the weight of the previous one, starting
    at 1/2. The stage's loss is divided by ``1 + sum(weights)``: 1.875 when 4, 2 and 1 all apply.

    Example:
        >>> transkd_hcl_levels(16), transkd_hcl_levels(3), transkd_hcl_levels(1)
        ([(4, 0.5), (2, 0.25), (1, 0.125)], [(2, 0.5), (1, 0.25)], [])
    """
    used, weight = [], 1.0
    for level in levels:
        if level >= height:
            continue
        weight /= 2.0
        used.append((int(level), weight))
    return used


def _check_maps(who: str, student: Sequence[Tensor], teacher: Sequence[Tensor], what: str) -> None:
    if len(student) != len(teacher) or not len(student):
        raise ValueError(
            f"{who}: expected one teacher {what} per student {what} (at least one), got {len(student)} student "
            f"and {len(teacher)} teacher {what}s."
        )


def transkd_hcl_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], levels: Sequence[int] = HCL_LEVELS
) -> Tensor:
    """Hierarchical context loss: per stage, MSE of the maps and of their pooled grids, normalised.

    ``L = sum_i [MSE(S_i, T_i) + sum_k w_k MSE(pool_{l_k}(S_i), pool_{l_k}(T_i))] / (1 + sum_k w_k)``
    with adaptive average pooling to ``l x l`` and the levels and weights of :func:`transkd_hcl_levels`
    (ReviewKD's HCL as used by TransKD, official ``hcl`` in ``train/CSF.py``). MSE is the mean over all
    elements.

    Args:
        student: the student's maps after cross selective fusion, one per stage, each the shape of its
            teacher map.
        teacher: the teacher's stage maps.
        levels: sides of the pooled grids (official: 4, 2, 1).

    Shape:
        stage ``i``: student and teacher ``(N, C_i, H_i, W_i)``.

    Returns:
        0-dim loss (summed over stages), at least float32.

    Example:
        >>> import torch
        >>> s, t = torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
        >>> transkd_hcl_loss([s], [t])  # every level has error 1: (1 + 0.875) / 1.875
        tensor(1.)
    """
    who = "transkd_hcl_loss"
    _check_maps(who, student, teacher, "map")
    total = None
    for i, (s, t) in enumerate(zip(student, teacher)):
        if (
            not torch.is_tensor(s)
            or not torch.is_tensor(t)
            or s.ndim != 4
            or s.shape != t.shape
            or not s.numel()
        ):
            raise ValueError(
                f"{who}: stage {i}: the student map {shape_of(s)} and the teacher map {shape_of(t)} must be "
                "non-empty (N, C, H, W) maps of the same shape (the fused student map has the teacher's "
                "channels; resize it to the teacher's size first)."
            )
        s, t = at_least_float32(s), at_least_float32(t)
        loss = F.mse_loss(s, t)
        denominator = 1.0
        for level, weight in transkd_hcl_levels(s.shape[2], levels):
            pooled = F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
            loss = loss + weight * pooled
            denominator += weight
        loss = loss / denominator
        total = loss if total is None else total + loss
    return total


def transkd_pea_loss(
    student: Sequence[Tensor], teacher: Sequence[Tensor], weights: Sequence[float] = PEA_WEIGHTS
) -> Tensor:
    """Patch-embedding alignment: ``sum_i w_i MSE(e_s_i, e_t_i)`` over the projected student embeddings.

    The official ``train/train_TransKDBase.py`` (``--embed 5``): the student's patch embeddings of each
    stage, through a per-stage ``nn.Linear(C_s_i, C_t_i)``, against the teacher's patch embeddings read
    after the ``OverlapPatchEmbed`` LayerNorm; MSE is the mean over all elements.

    Args:
        student: the projected student embeddings, one per stage.
        teacher: the teacher's patch embeddings.
        weights: one weight per stage (official, shallow to deep: 0.1, 0.1, 0.5, 1.0).

    Shape:
        stage ``i``: student and teacher ``(N, L_i, C_t_i)`` tokens.

    Returns:
        0-dim loss, at least float32.

    Example:
        >>> import torch
        >>> s, t = [torch.ones(1, 4, 2)] * 2, [torch.zeros(1, 4, 2)] * 2
        >>> transkd_pea_loss(s, t, weights=(0.1, 1.0))
        tensor(1.1000)
    """
    who = "transkd_pea_loss"
    _check_maps(who, student, teacher, "embedding")
    if len(weights) != len(student):
        raise ValueError(
            f"{who}: {len(weights)} weights for {len(student)} embedding stages; give one per stage."
        )
    total = None
    for i, (s, t, w) in enumerate(zip(student, teacher, weights)):
        if (
            not torch.is_tensor(s)
            or not torch.is_tensor(t)
            or s.ndim != 3
            or s.shape != t.shape
            or not s.numel()
        ):
            raise ValueError(
                f"{who}: stage {i}: the projected student embedding {shape_of(s)} and the teacher embedding "
                f"{shape_of(t)} must be non-empty (N, L, C) tokens of the same shape (same token grid, the "
                "teacher's channels)."
            )
        loss = check_non_negative(who, f"weights[{i}]", w) * F.mse_loss(
            at_least_float32(s), at_least_float32(t)
        )
        total = loss if total is None else total + loss
    return total


def transkd_fuse(x: Tensor, y: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Selective-kernel fusion of two maps: ``a_x * x + a_y * y`` with per-channel branch weights.

    ``(a_x, a_y) = softmax(logits)`` across the two branches (dim 1), so ``a_x + a_y = 1`` for every
    sample and channel (SK attention as in ``SK.forward`` of the official ``train/CSF.py``).

    Args:
        x: this stage's map (after the 1x1 reduction).
        y: the fused map passed up from the deeper stage, already resized to ``x``'s size.
        logits: the branch logits.

    Shape:
        ``x``, ``y``: ``(N, C, H, W)``; ``logits``: ``(N, 2, C, 1, 1)``.

    Returns:
        the fused ``(N, C, H, W)`` map and the weights ``(N, 2, C, 1, 1)``.

    Example:
        >>> import torch
        >>> fused, w = transkd_fuse(torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 2, 1, 1))
        >>> fused[0, :, 0, 0].tolist(), w.sum(dim=1).flatten().tolist()
        ([0.5, 0.5], [1.0, 1.0])
    """
    if x.ndim != 4 or y.shape != x.shape:
        raise ValueError(
            f"transkd_fuse: x {shape_of(x)} and y {shape_of(y)} must be (N, C, H, W) maps of the same shape."
        )
    n, c = x.shape[:2]
    if tuple(logits.shape) != (n, 2, c, 1, 1):
        raise ValueError(f"transkd_fuse: logits must have shape {(n, 2, c, 1, 1)}, got {shape_of(logits)}.")
    weights = logits.softmax(dim=1)
    return weights[:, 0] * x + weights[:, 1] * y, weights


def transkd_terms(
    fused: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    student_embeddings: Sequence[Tensor] | None = None,
    teacher_embeddings: Sequence[Tensor] | None = None,
    *,
    hcl_weight: float = 1.0,
    embedding_weights: Sequence[float] = PEA_WEIGHTS,
) -> dict[str, Tensor]:
    """TransKD-Base's distillation terms: ``{"hcl": hcl_weight * HCL, "pea": PEA}`` (``"pea"`` with embeddings).

    The learnable and layout steps come first, in the distiller
    (:class:`~lightningkd.distillers.TransKD`): cross selective fusion of the student's stage maps to the
    teacher's channels, resizing of each fused map to its teacher map's size, and the per-stage channel
    projection of the student's embeddings. This function adds the two losses:
    :func:`transkd_hcl_loss` and :func:`transkd_pea_loss`.

    Args:
        fused: the student's fused maps, one per stage, each the shape of its teacher map.
        teacher_maps: the teacher's stage maps.
        student_embeddings: the projected student embeddings; ``None`` (with ``teacher_embeddings``): no
            PEA term (e.g. a CNN teacher, which has no patch embeddings).
        teacher_embeddings: the teacher's patch embeddings.
        hcl_weight: factor of the HCL term (official ``--review-kd-loss-weight`` 1.0).
        embedding_weights: PEA's per-stage weights (official 0.1, 0.1, 0.5, 1.0).

    Shape:
        stage ``i``: maps ``(N, C_t_i, H_i, W_i)``, embeddings ``(N, L_i, C_t_i)``.

    Returns:
        dict of 0-dim terms.

    Example:
        >>> import torch
        >>> maps = [torch.ones(2, 3, 4, 4)]
        >>> tokens = [torch.zeros(2, 16, 3)]
        >>> transkd_terms(maps, maps, tokens, [torch.ones(2, 16, 3)], embedding_weights=[0.5])
        {'hcl': tensor(0.), 'pea': tensor(0.5000)}
    """
    who = "transkd_terms"
    terms = {"hcl": check_non_negative(who, "hcl_weight", hcl_weight) * transkd_hcl_loss(fused, teacher_maps)}
    if student_embeddings is None and teacher_embeddings is None:
        return terms
    if student_embeddings is None or teacher_embeddings is None:
        raise ValueError(f"{who}: PEA needs both student_embeddings and teacher_embeddings (or neither).")
    terms["pea"] = transkd_pea_loss(student_embeddings, teacher_embeddings, embedding_weights)
    return terms
