"""Hinton knowledge distillation, functional form."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import at_least_float32, check_positive


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, summed over classes, averaged over the batch.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS-W 2015, arXiv:1503.02531.
    Matches ``kd_loss`` of megvii-research/mdistiller (mdistiller/distillers/KD.py). The T^2 factor keeps
    the gradient scale independent of T.

    Args:
        student_logits: ``(N, C)`` logits of the student.
        teacher_logits: ``(N, C)`` logits of the teacher.
        temperature: softening temperature T > 0.

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> z = torch.tensor([[1.0, 2.0, 3.0]])
        >>> kd_loss(z, z).item()
        0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape."
        )
    temperature = check_positive("kd_loss", "temperature", temperature)
    log_p_s = F.log_softmax(at_least_float32(student_logits) / temperature, dim=1)
    log_p_t = F.log_softmax(at_least_float32(teacher_logits) / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2
