"""Decoupled knowledge distillation (DKD), functional form."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightningkd.functional._helpers import (
    at_least_float32,
    check_class_indices,
    check_non_negative,
    check_positive,
)

# Below this gap between the teacher's and the student's binary logits, TCKD is computed from the gap
# itself (log1p/expm1 forms): there the plain KL sum cancels to second order and would lose the digits.
_NEAR = 1.0
# Below this |x| the series sum_{k=2..10} x^k / k! of expm1(x) - x replaces the direct form, which cancels
# (here by less than 8x); the first omitted term is below 1e-12 of the value.
_SERIES = 0.25
_SERIES_COEFFICIENTS = [1.0 / math.factorial(k) for k in range(10, 1, -1)]  # Horner order: x^10 first


def dkd_terms(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float = 4.0
) -> tuple[Tensor, Tensor]:
    """The two unweighted DKD terms ``(TCKD, NCKD)``, each ``T^2 * KL`` summed over classes / batch size.

    Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.
    Authors' code: megvii-research/mdistiller ``mdistiller/distillers/DKD.py`` (commit a08d46f).

    With ``p = softmax(z / T)`` and ``y`` the label of a sample:

    - TCKD (target-class KD) is the KL divergence between the binary distributions
      ``b = [p_y, sum_{c != y} p_c]`` of the teacher and of the student;
    - NCKD (non-target-class KD) is the KL divergence between the teacher's and the student's softmax
      over the ``C - 1`` non-target classes only (renormalised without the target class).

    Both are ``KL(teacher || student)`` summed over the batch, divided by ``N`` and multiplied by ``T^2``,
    as in the official code. The paper shows ``KD = TCKD + (1 - p_y^teacher) * NCKD`` per sample.

    Departures from the official code (same value wherever the official code is finite and exact):

    - NCKD drops the target column (a sync-free ``gather`` of the ``C - 1`` other logits) instead of
      subtracting 1000 from the temperature-scaled target logit; the official trick silently gives a
      wrong NCKD when ``|z| / T`` approaches 1000, this form is exact for any logits.
    - TCKD is computed in log space from the binary logit ``u = z_y/T - logsumexp_{c != y}(z_c/T)``
      (``log p_y = -softplus(-u)``, ``log(1 - p_y) = -softplus(u)``) instead of summing probabilities and
      taking a plain ``log`` without eps: no clamp or eps is needed, and a probability that underflows in
      float32 (where the official code returns inf/nan) still gives the correct finite loss. When the two
      binary logits are close, the KL is taken from their gap by log1p/expm1 forms that do not cancel
      (``_binary_kl`` in this module), so float32 stays within a few 1e-6 of float64 (a difference of two
      log-sum-exps for ``log(1 - p_y)`` loses about 1e-3 relative on ordinary logits).

    Args:
        student_logits: logits of the student.
        teacher_logits: logits of the teacher.
        target: integer class labels in ``[0, C)``.
        temperature: softening temperature T > 0 (mdistiller: 4 on CIFAR-100, 1 on ImageNet).

    Shape:
        - student_logits, teacher_logits: ``(N, C)`` with ``C >= 2``.
        - target: ``(N,)``.

    Returns:
        ``(tckd, nckd)``: two 0-dim tensors.

    Example:
        >>> import torch
        >>> zs = torch.tensor([[2.0, 0.0, 1.0]])
        >>> zt = torch.tensor([[3.0, 1.0, 0.0]])
        >>> tckd, nckd = dkd_terms(zs, zt, torch.tensor([0]), temperature=1.0)
        >>> round(tckd.item(), 4), round(nckd.item(), 4)
        (0.0816, 0.4621)
    """
    t = _check_inputs("dkd_terms", student_logits, teacher_logits, target, temperature)
    zs = at_least_float32(student_logits) / t
    zt = at_least_float32(teacher_logits) / t
    target = target.long()

    # Column indices of the C-1 non-target classes of each row, built without a device sync
    # (boolean-mask indexing would need one): 0..C-2, shifted by one from the target column on.
    n, c = zs.shape
    cols = torch.arange(c - 1, device=zs.device)
    others = cols.unsqueeze(0) + (cols.unsqueeze(0) >= target.unsqueeze(1)).long()
    zs_other = zs.gather(1, others)
    zt_other = zt.gather(1, others)

    zs_target = zs.gather(1, target.unsqueeze(1)).squeeze(1)
    zt_target = zt.gather(1, target.unsqueeze(1)).squeeze(1)
    tckd = _binary_kl(zs_target, zs_other, zt_target, zt_other).sum()
    nckd = _kl_rows(torch.log_softmax(zt_other, dim=1), torch.log_softmax(zs_other, dim=1))
    scale = t * t / n
    return tckd * scale, nckd * scale


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled KD: ``alpha * TCKD + beta * NCKD`` (see :func:`dkd_terms` for the two terms).

    Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv:2203.08679.
    Authors' code: megvii-research/mdistiller ``mdistiller/distillers/DKD.py`` (commit a08d46f); the
    numerically safer formulation used here is described in :func:`dkd_terms`.

    The official training multiplies this loss by a warm-up factor ``min(epoch / warmup, 1)``; that
    factor is not part of this function (use :class:`lightningkd.callbacks.KDWeightWarmup`).

    Args:
        student_logits: logits of the student.
        teacher_logits: logits of the teacher.
        target: integer class labels in ``[0, C)``.
        alpha: weight of TCKD (mdistiller: 1).
        beta: weight of NCKD (mdistiller: 8 for CIFAR-100 res32x4 -> res8x4, 2 for res56 -> res20,
            0.5 on ImageNet).
        temperature: softening temperature T > 0 (mdistiller: 4 on CIFAR-100, 1 on ImageNet).

    Shape:
        - student_logits, teacher_logits: ``(N, C)`` with ``C >= 2``.
        - target: ``(N,)``.

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 2.0, 3.0]])
        >>> dkd_loss(z, z, torch.tensor([2])).item()
        0.0
    """
    check_non_negative("dkd_loss", "alpha", alpha)
    check_non_negative("dkd_loss", "beta", beta)
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd


def _binary_kl(zs_target: Tensor, zs_other: Tensor, zt_target: Tensor, zt_other: Tensor) -> Tensor:
    """Per row ``KL([p_t, 1 - p_t] || [p_s, 1 - p_s])`` of the target-class probabilities, shape ``(N,)``.

    With binary logits ``u = z_y - logsumexp(z_other)`` (so ``p = sigmoid(u)``) and their gap
    ``g = u_t - u_s``:

    - far (``|g| >= 1``): ``p_t (log p_t - log p_s) + (1 - p_t) (log(1 - p_t) - log(1 - p_s))`` from the
      log-probabilities ``-softplus(-+u)``; the KL is then of the size of its terms.
    - near (``|g| < 1``): the two terms cancel to second order in ``g``, so the KL is written as the sum of
      non-negative parts ``p_t phi(r_1) + (1 - p_t) phi(r_0)`` with ``phi(r) = r + expm1(-r)`` (which
      follows from ``p_t exp(-r_1) + (1 - p_t) exp(-r_0) = 1``) and the log-ratios taken from the gap
      without subtracting logs: ``r_1 = log(p_t / p_s) = -log1p((1 - p_s) expm1(-g))``,
      ``r_0 = log((1 - p_t) / (1 - p_s)) = -log1p(p_s expm1(g))``; ``g`` itself comes from
      :func:`_logsumexp_gap`, not from two nearly equal log-sum-exps.
    """
    lse_s = torch.logsumexp(zs_other, dim=1)
    lse_t = torch.logsumexp(zt_other, dim=1)
    u_s, u_t = zs_target - lse_s, zt_target - lse_t
    gap = (zt_target - zs_target) - _logsumexp_gap(zs_other, zt_other, lse_t - lse_s)
    zero = torch.zeros((), dtype=u_s.dtype, device=u_s.device)
    log_p_s, log_q_s = -torch.logaddexp(zero, -u_s), -torch.logaddexp(zero, u_s)
    log_p_t, log_q_t = -torch.logaddexp(zero, -u_t), -torch.logaddexp(zero, u_t)
    p_t, q_t = log_p_t.exp(), log_q_t.exp()
    far = p_t * (log_p_t - log_p_s) + q_t * (log_q_t - log_q_s)
    g = gap.clamp(-_NEAR, _NEAR)  # the near branch stays finite (and so its gradient) where it is unused
    r_1 = -torch.log1p(log_q_s.exp() * torch.expm1(-g))
    r_0 = -torch.log1p(log_p_s.exp() * torch.expm1(g))
    near = p_t * _x_plus_expm1_neg(r_1) + q_t * _x_plus_expm1_neg(r_0)
    return torch.where(gap.abs() < _NEAR, near, far)


def _logsumexp_gap(zs: Tensor, zt: Tensor, plain: Tensor) -> Tensor:
    """``logsumexp(zt) - logsumexp(zs)`` per row without cancellation when the rows are close.

    ``= log sum_c q_c exp(d_c)`` with ``q = softmax(zs)``, ``d = zt - zs``; with ``m = sum_c q_c d_c`` and
    ``e = d - m`` (so ``sum_c q_c e_c = 0``) it is ``m + log1p(sum_c q_c (expm1(e_c) - e_c))``, every part
    accurate. Rows with some ``|e_c| > 1`` are far apart and keep ``plain``, the direct difference.
    """
    q = torch.softmax(zs, dim=1)
    d = zt - zs
    m = (q * d).sum(dim=1)
    e = d - m.unsqueeze(1)
    close = e.abs().amax(dim=1) <= 1.0
    stable = m + torch.log1p((q * _expm1_minus_x(e.clamp(-1.0, 1.0))).sum(dim=1))
    return torch.where(close, stable, plain)


def _expm1_minus_x(x: Tensor) -> Tensor:
    """``expm1(x) - x`` (``>= 0``), by its series ``x^2/2 + x^3/6 + ...`` for small ``|x|``."""
    small = x.abs() < _SERIES
    xs = torch.where(small, x, torch.zeros_like(x))
    series = torch.zeros_like(xs)
    for coefficient in _SERIES_COEFFICIENTS:
        series = coefficient + xs * series
    series = xs * xs * series
    xl = torch.where(small, torch.ones_like(x), x)  # the direct branch stays finite where it is unused
    return torch.where(small, series, torch.expm1(xl) - xl)


def _x_plus_expm1_neg(x: Tensor) -> Tensor:
    """``x + expm1(-x)`` (``>= 0``), by its series ``x^2/2 - x^3/6 + ...`` for small ``|x|``."""
    return _expm1_minus_x(-x)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_rows sum_k p_k (log p_k - log q_k)``: KL(p || q) summed over the batch."""
    return (log_p.exp() * (log_p - log_q)).sum()


def _check_inputs(who: str, student: Tensor, teacher: Tensor, target: Tensor, temperature: float) -> float:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"{who}: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "must have the same (N, C) shape."
        )
    if student.shape[0] < 1 or student.shape[1] < 2:
        raise ValueError(
            f"{who}: needs at least 1 sample and 2 classes, got logits {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}."
        )
    check_class_indices(who, target, student.shape[0], student.shape[1], key="target")
    return check_positive(who, "temperature", temperature)
