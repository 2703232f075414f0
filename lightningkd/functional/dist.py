"""DIST: distillation of inter- and intra-class Pearson correlations, functional form."""

from __future__ import annotations

from torch import Tensor

from lightningkd.functional._helpers import (
    at_least_float32,
    check_non_negative,
    check_positive,
    match_spatial,
)

# Additive eps in the Pearson denominator, as in the authors' ``cosine_similarity`` (dist_kd.py).
_PEARSON_EPS = 1e-8


def dist_terms(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The two unweighted DIST terms ``(inter, intra)``, each already multiplied by ``tau^2``.

    Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
    arXiv:2205.10536. Authors' code: hunto/image_classification_sota ``lib/models/losses/dist_kd.py``
    (commit 6f7a70a; hunto/DIST_KD points to it for classification).

    With ``Y = softmax(z / tau)`` over classes and the Pearson correlation
    ``rho(a, b) = <a - mean a, b - mean b> / (||a - mean a|| * ||b - mean b|| + 1e-8)``:

    - inter-class relation: ``tau^2 * (1 - mean_n rho(Y_s[n, :], Y_t[n, :]))`` (across classes, per
      sample);
    - intra-class relation: ``tau^2 * (1 - mean_c rho(Y_s[:, c], Y_t[:, c]))`` (across the batch, per
      class).

    The eps is added to the product of the norms, not used as a clamp, exactly like the official code
    (it changes the value by ~1e-8 relative against an eps-free correlation).

    Dense (segmentation) logits ``(N, C, H, W)`` are flattened to ``(N*H*W, C)``, every pixel being one
    sample, as in hunto/DIST_KD ``segmentation/losses/dist_kd.py`` (the intra-class term then pools the
    pixels of the whole batch). That segmentation code has no temperature; it equals this function with
    ``temperature=1``. When the dense maps differ in size, the teacher logits are first resized to the
    student's ``(H, W)`` (bilinear, ``align_corners=False``); the authors' code receives maps of equal size.

    Args:
        student_logits: logits of the student.
        teacher_logits: logits of the teacher.
        temperature: softening temperature tau > 0 (authors: 1 on ImageNet and in segmentation, 4 on
            CIFAR-100).

    Shape:
        ``(N, C)`` for both models, or dense student ``(N, C, H, W)`` and teacher ``(N, C, H_t, W_t)``.

    Returns:
        ``(inter, intra)``: two 0-dim tensors.

    Example:
        >>> import torch
        >>> zs = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
        >>> inter, intra = dist_terms(zs, zs.flip(1))
        >>> round(inter.item(), 4), round(intra.item(), 4)
        (1.0011, 1.3333)
    """
    zs, zt = _as_rows("dist_terms", student_logits, teacher_logits)
    t = check_positive("dist_terms", "temperature", temperature)
    ys = (zs / t).softmax(dim=1)
    yt = (zt / t).softmax(dim=1)
    inter = 1.0 - _pearson_rows(ys, yt).mean()
    intra = 1.0 - _pearson_rows(ys.t(), yt.t()).mean()
    return t * t * inter, t * t * intra


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """DIST: ``beta * inter + gamma * intra`` Pearson-correlation distances (see :func:`dist_terms`).

    Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022,
    arXiv:2205.10536. Authors' code: hunto/image_classification_sota ``lib/models/losses/dist_kd.py``
    (commit 6f7a70a). ``tau^2`` multiplies both terms, as in the official code.

    Args:
        student_logits: logits of the student.
        teacher_logits: logits of the teacher.
        beta: weight of the inter-class relation (authors: 1).
        gamma: weight of the intra-class relation (authors: 1).
        temperature: softening temperature tau > 0 (authors: 1 on ImageNet, 4 on CIFAR-100).

    Shape:
        ``(N, C)``, or dense ``(N, C, H, W)`` flattened to ``(N*H*W, C)`` (the teacher resized to the
        student's ``(H, W)`` first).

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
        >>> round(dist_loss(z, z).item(), 6)
        0.0
    """
    check_non_negative("dist_loss", "beta", beta)
    check_non_negative("dist_loss", "gamma", gamma)
    inter, intra = dist_terms(student_logits, teacher_logits, temperature)
    return beta * inter + gamma * intra


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: ``(M, K) -> (M,)``."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + _PEARSON_EPS)


def _as_rows(who: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Check the shapes and return ``(rows, C)`` views; dense maps give one row per pixel of the student."""
    # float32 before the resize, the softmax and the Pearson sums (half precision loses ~1e-2 of the loss)
    student, teacher = at_least_float32(student), at_least_float32(teacher)
    if student.ndim == 4 and teacher.ndim == 4 and student.shape[:2] == teacher.shape[:2]:
        teacher = match_spatial(teacher, tuple(student.shape[-2:]), mode="bilinear")
    if student.shape != teacher.shape or student.ndim not in (2, 4):
        raise ValueError(
            f"{who}: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "must be (N, C) logits of the same shape, or (N, C, H, W) maps with the same N and C (the "
            "teacher is resized to the student's H, W)."
        )
    if student.numel() == 0:
        raise ValueError(f"{who}: got empty logits {tuple(student.shape)} and {tuple(teacher.shape)}.")
    if student.ndim == 4:
        c = student.shape[1]
        student = student.movedim(1, -1).reshape(-1, c)
        teacher = teacher.movedim(1, -1).reshape(-1, c)
    return student, teacher
