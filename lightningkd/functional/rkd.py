"""Relational knowledge distillation (RKD), functional form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import (
    at_least_float32,
    autocast_off,
    check_non_negative,
    flatten_embedding,
)

# Floor of the squared pairwise distance before the square root, as in the authors' ``pdist``
# (lenscloth/RKD metric/utils.py): keeps sqrt differentiable for coincident embeddings.
_PDIST_EPS = 1e-12


def rkd_distance_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD distance term: smooth L1 between the mean-normalised pairwise distance matrices.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068. Authors' code:
    lenscloth/RKD ``metric/loss.py`` ``RkdDistance`` with ``metric/utils.py`` ``pdist`` (commit 0a6c3c0).

    Reproduces the official reductions: ``d_ij = sqrt(max(|x_i|^2 + |x_j|^2 - 2 <x_i, x_j>, 1e-12))``
    with the diagonal set to 0, divided by the mean of its strictly positive entries; then smooth L1
    (threshold 1) averaged over all ``N^2`` entries, the zero diagonal included. The teacher side is
    detached. See :func:`rkd_loss` for the accepted embedding shapes.

    Args:
        student_emb: embeddings of the student.
        teacher_emb: embeddings of the teacher (no gradient flows into them).

    Shape:
        ``(N, D_s)`` and ``(N, D_t)`` with ``N >= 2`` (``D_s`` and ``D_t`` may differ); ``(N, D, 1, 1)``,
        ``(N, C, H, W)`` and ``(N, L, D)`` are pooled first (see :func:`rkd_loss`).

    Returns:
        0-dim loss (unweighted).

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
        >>> rkd_distance_loss(x, 2 * x).item()
        0.0
    """
    s, t = _embeddings("rkd_distance_loss", student_emb, teacher_emb)
    with torch.no_grad():
        t_d = _normalised_pdist(t)
    return F.smooth_l1_loss(_normalised_pdist(s), t_d, reduction="mean", beta=1.0)


def rkd_angle_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """RKD angle term: smooth L1 between the cosines of the angles formed by every triple of samples.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068. Authors' code:
    lenscloth/RKD ``metric/loss.py`` ``RKdAngle`` (commit 0a6c3c0).

    ``cos_ijk = <e_ij, e_ik>`` with ``e_ij = normalize(x_j - x_i)`` (``F.normalize``, so the zero vector
    stays 0). Like the official code the smooth L1 (threshold 1) is averaged over **all** ``N^3``
    triples, degenerate ones included (``j = i`` or ``k = i`` give 0 on both sides, ``j = k`` gives 1 on
    both sides): they add nothing to the sum but count in the denominator. Memory is ``O(N^2 D)`` for the
    difference vectors, as in the official code. The teacher side is detached.

    Args:
        student_emb: embeddings of the student.
        teacher_emb: embeddings of the teacher (no gradient flows into them).

    Shape:
        ``(N, D_s)`` and ``(N, D_t)`` with ``N >= 2``; pooled first like :func:`rkd_loss`.

    Returns:
        0-dim loss (unweighted).

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
        >>> rkd_angle_loss(x, 2 * x + 1).item()
        0.0
    """
    s, t = _embeddings("rkd_angle_loss", student_emb, teacher_emb)
    with torch.no_grad():
        t_cos = _triplet_cosines(t)
    return F.smooth_l1_loss(_triplet_cosines(s), t_cos, reduction="mean", beta=1.0)


def rkd_loss(
    student_emb: Tensor, teacher_emb: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> Tensor:
    """Relational KD: ``distance_weight * distance + angle_weight * angle`` on embeddings.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068. Authors' code:
    lenscloth/RKD ``metric/loss.py`` (commit 0a6c3c0); the terms are :func:`rkd_distance_loss` and
    :func:`rkd_angle_loss`. The default weights 25 / 50 are mdistiller's RKD defaults for classification
    (the authors' metric-learning scripts use 1 / 2).

    RKD compares only the geometry of the batch, so the student and teacher dimensions may differ. The
    embeddings are the pooled penultimate features (mdistiller uses ``pooled_feat``). Accepted inputs,
    turned into ``(N, D)`` first: ``(N, D)``; ``(N, D, 1, 1)``
    (e.g. torchvision ResNet ``avgpool``); un-pooled ``(N, C, H, W)`` maps, **global-average-pooled**
    (mdistiller would flatten them with ``view(N, -1)`` instead; it only ever passes pooled features);
    and ``(N, L, D)`` tokens, averaged over tokens.

    Args:
        student_emb: embeddings of the student.
        teacher_emb: embeddings of the teacher (no gradient flows into them).
        distance_weight: weight of the distance term.
        angle_weight: weight of the angle term.

    Shape:
        student ``(N, D_s)``, teacher ``(N, D_t)`` with ``N >= 2``, or the pooled forms above.

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> t = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
        >>> rkd_loss(s, t).item()
        0.0
    """
    check_non_negative("rkd_loss", "distance_weight", distance_weight)
    check_non_negative("rkd_loss", "angle_weight", angle_weight)
    distance, angle = rkd_terms(student_emb, teacher_emb)
    return distance_weight * distance + angle_weight * angle


def rkd_terms(student_emb: Tensor, teacher_emb: Tensor) -> tuple[Tensor, Tensor]:
    """The two unweighted RKD terms ``(distance, angle)`` (:func:`rkd_distance_loss`, :func:`rkd_angle_loss`).

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, arXiv:1904.05068. The embeddings
    are pooled once, as in :func:`rkd_loss`.

    Args:
        student_emb: embeddings of the student.
        teacher_emb: embeddings of the teacher (no gradient flows into them).

    Shape:
        student ``(N, D_s)``, teacher ``(N, D_t)`` with ``N >= 2``, or the pooled forms of :func:`rkd_loss`.

    Returns:
        ``(distance, angle)``: two 0-dim tensors.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
        >>> [round(v.item(), 6) for v in rkd_terms(x, 2 * x)]
        [0.0, 0.0]
    """
    s, t = _embeddings("rkd_terms", student_emb, teacher_emb)
    return rkd_distance_loss(s, t), rkd_angle_loss(s, t)


def _pdist(x: Tensor) -> Tensor:
    """Euclidean distance matrix from the Gram matrix, floored at sqrt(1e-12), with an exact 0 diagonal."""
    with autocast_off(x):  # the Gram matrix in float32: in fp16 squared norms overflow, in bf16 cancel
        sq = x.pow(2).sum(dim=1)
        d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * x @ x.t()).clamp(min=_PDIST_EPS)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def _normalised_pdist(x: Tensor) -> Tensor:
    d = _pdist(x)
    # Mean of the strictly positive entries, written as sum / count (the zeros add nothing to the sum)
    # so that it needs no data-dependent indexing and hence no device sync.
    return d / (d.sum() / (d > 0).sum())


def _triplet_cosines(x: Tensor) -> Tensor:
    """Flat ``(N^3,)`` cosines ``<normalize(x_j - x_i), normalize(x_k - x_i)>`` in (i, j, k) order."""
    diff = x.unsqueeze(0) - x.unsqueeze(1)  # diff[i, j] = x_j - x_i: anchor i first
    unit = F.normalize(diff, p=2, dim=2)
    with autocast_off(unit):
        return torch.bmm(unit, unit.transpose(1, 2)).flatten()


def _embeddings(who: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Check and pool both embeddings to ``(N, D)``."""
    if student.ndim not in (2, 3, 4) or teacher.ndim not in (2, 3, 4):
        raise ValueError(
            f"{who}: expected embeddings (N, D), (N, D, 1, 1), (N, C, H, W) or (N, L, D), got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}."
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{who}: student embeddings {tuple(student.shape)} and teacher embeddings "
            f"{tuple(teacher.shape)} must have the same batch size."
        )
    if student.shape[0] < 2:
        raise ValueError(
            f"{who}: relations need at least 2 samples, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}."
        )
    return flatten_embedding(at_least_float32(student)), flatten_embedding(at_least_float32(teacher))
