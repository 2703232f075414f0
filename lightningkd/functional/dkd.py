"""Decoupled knowledge distillation (DKD), functional form."""

from __future__ import annotations

import torch
from torch import Tensor


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
    - TCKD is computed in log space: ``log b = [z_y/T, logsumexp_{c != y}(z_c/T)] - logsumexp(z/T)``,
      instead of summing probabilities and taking a plain ``log`` without eps. No clamp or eps is
      needed, and a probability that underflows in float32 (where the official code returns inf/nan)
      still gives the correct finite loss.

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
    _check_inputs("dkd_terms", student_logits, teacher_logits, target, temperature)
    t = float(temperature)
    zs = student_logits / t
    zt = teacher_logits / t
    target = target.long()

    # Column indices of the C-1 non-target classes of each row, built without a device sync
    # (boolean-mask indexing would need one): 0..C-2, shifted by one from the target column on.
    n, c = zs.shape
    cols = torch.arange(c - 1, device=zs.device)
    others = cols.unsqueeze(0) + (cols.unsqueeze(0) >= target.unsqueeze(1)).long()
    zs_other = zs.gather(1, others)
    zt_other = zt.gather(1, others)

    tckd = _kl_rows(_binary_log_probs(zt, zt_other, target), _binary_log_probs(zs, zs_other, target))
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
    _check_weights("dkd_loss", alpha=alpha, beta=beta)
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    return alpha * tckd + beta * nckd


def _binary_log_probs(z: Tensor, z_other: Tensor, target: Tensor) -> Tensor:
    """``log [p_y, 1 - p_y]`` as ``(N, 2)``, from logsumexps so that neither entry underflows to -inf."""
    log_norm = torch.logsumexp(z, dim=1, keepdim=True)
    log_mass = torch.cat([z.gather(1, target.unsqueeze(1)), torch.logsumexp(z_other, dim=1, keepdim=True)], 1)
    return log_mass - log_norm


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_rows sum_k p_k (log p_k - log q_k)``: KL(p || q) summed over the batch."""
    return (log_p.exp() * (log_p - log_q)).sum()


def _check_inputs(who: str, student: Tensor, teacher: Tensor, target: Tensor, temperature: float) -> None:
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
    if (
        not torch.is_tensor(target)
        or target.is_floating_point()
        or target.is_complex()
        or target.dtype == torch.bool
    ):
        raise TypeError(
            f"{who}: target must be an integer tensor of class indices, got "
            f"{target.dtype if torch.is_tensor(target) else type(target).__name__} (soft labels are not supported)."
        )
    if target.shape != student.shape[:1]:
        raise ValueError(
            f"{who}: target {tuple(target.shape)} must have shape (N,) = ({student.shape[0]},) for logits "
            f"{tuple(student.shape)}."
        )
    # One host sync per call (a single .any()); an out-of-range label would otherwise surface on a GPU
    # as an opaque device-side assert inside gather.
    if bool(((target < 0) | (target >= student.shape[1])).any()):
        raise ValueError(
            f"{who}: target values must lie in [0, {student.shape[1]}) for logits {tuple(student.shape)}, "
            f"got min {int(target.min())} and max {int(target.max())}."
        )
    if not temperature > 0:
        raise ValueError(f"{who}: temperature must be > 0, got {temperature}.")


def _check_weights(who: str, **weights: float) -> None:
    for key, value in weights.items():
        if not value >= 0:
            raise ValueError(f"{who}: {key} must be >= 0, got {value}.")
