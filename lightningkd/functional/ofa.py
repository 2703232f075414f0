"""OFA: the one-for-all KD loss with adaptive target enhancement, functional form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import (
    at_least_float32,
    check_class_indices,
    check_positive,
    common_float_dtype,
    shape_of,
)


def ofa_class_indices(target: Tensor, num_samples: int, num_classes: int, who: str = "ofa_loss") -> Tensor:
    """The ``(N,)`` class indices of ``target``: integer labels as they are, soft or one-hot rows by argmax.

    The authors' OFA takes the argmax of a 2-D target (mixup / label-smoothed labels) before building the
    one-hot mask; integer labels are checked to lie in ``[0, num_classes)``.

    Example:
        >>> import torch
        >>> ofa_class_indices(torch.tensor([[0.1, 0.7, 0.2], [0.8, 0.1, 0.1]]), 2, 3)
        tensor([1, 0])
    """
    if torch.is_tensor(target) and target.is_floating_point():
        if tuple(target.shape) != (num_samples, num_classes):
            raise ValueError(
                f"{who}: soft targets {tuple(target.shape)} must have shape (N, C) = ({num_samples}, "
                f"{num_classes}), like the logits; or pass (N,) integer class indices."
            )
        return target.argmax(dim=1)
    check_class_indices(who, target, num_samples, num_classes, key="target")
    return target


def ofa_target_weights(
    teacher_logits: Tensor, target: Tensor, eps: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """OFA's enhanced target ``(p_t + e_y)^eps - e_y``: ``p_t^eps`` off the label, ``(1 + p_t[y])^eps - 1`` on it.

    Hao et al., NeurIPS 2023, arXiv:2310.19444; Hao840/OFAKD ``distillers/ofa.py`` (f7bb896). The weights
    that :func:`ofa_loss` puts on ``-log p_s``; they depend only on the teacher and the labels, so a loss
    with several student heads (the OFA distiller's stage branches) computes them once.

    Args:
        teacher_logits: ``(N, C)`` logits of the teacher.
        target: ``(N,)`` integer class indices, or ``(N, C)`` soft / one-hot labels (argmax).
        eps: the enhancement exponent, ``> 0``.
        temperature: softmax temperature ``T > 0``.

    Shape:
        ``(N, C)`` in, ``(N, C)`` out.

    Returns:
        the weights, in the logits' dtype (at least float32).

    Example:
        >>> import torch
        >>> w = ofa_target_weights(torch.tensor([[0.0, 0.0]]), torch.tensor([1]), eps=2.0)
        >>> w.tolist()  # [0.5^2, 1.5^2 - 1]
        [[0.25, 1.25]]
    """
    who = "ofa_target_weights"
    _check_logits(who, "teacher", teacher_logits)
    eps = check_positive(who, "eps", eps)
    temperature = check_positive(who, "temperature", temperature)
    n, c = teacher_logits.shape
    labels = ofa_class_indices(target, n, c, who)
    p_t = F.softmax(at_least_float32(teacher_logits) / temperature, dim=1)
    one_hot = F.one_hot(labels.to(p_t.device), c).to(p_t.dtype)
    return (p_t + one_hot).pow(eps) - one_hot


def ofa_cross_entropy(student_logits: Tensor, weights: Tensor, temperature: float = 1.0) -> Tensor:
    """``-mean_i sum_c w_ic log softmax(z_s / T)_ic`` for given target weights (see :func:`ofa_loss`).

    Args:
        student_logits: ``(N, C)`` logits of the student or of a branch.
        weights: ``(N, C)`` weights from :func:`ofa_target_weights`.
        temperature: softmax temperature ``T > 0``.

    Returns:
        0-dim loss (at least float32).

    Example:
        >>> import math, torch
        >>> loss = ofa_cross_entropy(torch.zeros(1, 4), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
        >>> round(loss.item(), 6) == round(math.log(4), 6)
        True
    """
    who = "ofa_cross_entropy"
    _check_logits(who, "student", student_logits)
    if tuple(weights.shape) != tuple(student_logits.shape):
        raise ValueError(
            f"{who}: student logits {tuple(student_logits.shape)} and teacher logits / target weights "
            f"{tuple(weights.shape)} must have the same shape (same batch, same classes)."
        )
    temperature = check_positive(who, "temperature", temperature)
    dtype = common_float_dtype(at_least_float32(student_logits), weights)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    return -(weights.to(dtype) * log_p_s).sum(dim=1).mean()


def _check_logits(who: str, side: str, z: object) -> None:
    if not torch.is_tensor(z) or z.ndim != 2 or z.numel() == 0:
        raise ValueError(f"{who} expects non-empty (N, C) {side} logits, got {shape_of(z)}.")


def ofa_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    eps: float = 1.0,
    temperature: float = 1.0,
) -> Tensor:
    """``-mean_i sum_c [(p_t + e_y)^eps - e_y]_c log p_s,c``: OFA's cross-entropy with an enhanced target.

    Hao, Guo, Han, Tang, Hu, Wang & Xu, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
    Knowledge Distillation", NeurIPS 2023, arXiv:2310.19444. Authors' code: Hao840/OFAKD
    ``distillers/ofa.py`` ``ofa_loss`` (f7bb896); matches the parity fixtures made from it.

    ``p_s = softmax(z_s / T)``, ``p_t = softmax(z_t / T)`` and ``e_y`` the one-hot label. The weight of a
    non-target class is ``p_t^eps``; that of the target class ``(1 + p_t[y])^eps - 1``, so for ``eps > 1``
    the target is raised more where the teacher is confident (the paper's adaptive target enhancement) and
    the weights no longer sum to 1. It is a cross-entropy, not a KL divergence: with ``eps = 1`` it equals
    ``H(p_t, p_s)``, which includes the teacher's entropy (so it is not zero when the two agree). There is
    no ``T^2`` factor; the sum over classes is averaged over the batch.

    The official code takes ``log(softmax(z_s / T))``; this uses ``log_softmax``, which gives the same
    value wherever the official one is finite and stays finite where a float32 probability underflows to 0.
    Half precision is promoted to float32.

    Args:
        student_logits: ``(N, C)`` logits of the student (or of one of its stage branches).
        teacher_logits: ``(N, C)`` logits of the teacher.
        target: ``(N,)`` integer class indices, or ``(N, C)`` soft / one-hot labels (their argmax is used,
            as the official code does for mixup and label-smoothed targets).
        eps: the exponent of the target enhancement, ``> 0`` (official: 1.5 on ImageNet with a CNN
            student, 1.0 on CIFAR-100; default 1).
        temperature: softmax temperature ``T > 0`` (official default 1).

    Shape:
        logits ``(N, C)``; target ``(N,)`` or ``(N, C)``.

    Returns:
        0-dim loss, in the logits' dtype (at least float32).

    Example:
        >>> import torch
        >>> z = torch.tensor([[0.0, 0.0]])  # p_s = p_t = (1/2, 1/2): H(p_t, p_s) = log 2
        >>> round(ofa_loss(z, z, torch.tensor([0])).item(), 6)
        0.693147
    """
    who = "ofa_loss"
    _check_logits(who, "student", student_logits)
    _check_logits(who, "teacher", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{who}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (same batch, same classes)."
        )
    weights = ofa_target_weights(teacher_logits, target, eps, temperature)
    return ofa_cross_entropy(student_logits, weights, temperature)
