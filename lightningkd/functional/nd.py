"""ND (norm and direction) loss of KD++, functional form."""

from __future__ import annotations

import torch
from torch import Tensor

from lightningkd.functional._helpers import check_class_indices, common_float_dtype, flatten_embedding


def nd_loss(student_emb: Tensor, teacher_emb: Tensor, class_centers: Tensor, labels: Tensor) -> Tensor:
    """``mean_i [1 - <s_i, c_{y_i} / ||c_{y_i}||> / max(||s_i||, ||t_i||)]``.

    Wang, Cheng, Duan, Wang, Feng & Kong, "Improving Knowledge Distillation via Regularizing Feature Norm
    and Direction", arXiv:2305.17007 (ECCV 2024). Matches ``DirectNormLoss`` of WangYZ1608/Knowledge-Distillation-via-ND
    (``CIFAR/utils.py``, fc6f3f9) with ``nd_loss_factor`` = 1; the factor is the distiller's weight. The
    student embedding is pulled towards the direction of its class centre (the mean *teacher* embedding
    of that class over the training set) and its norm towards at least the teacher's norm; the teacher
    embedding enters only through its norm. As in the official code there is no eps and no detach: the
    gradient flows through ``||s_i||`` when it is the larger norm (``torch.maximum``; on an exact tie it
    splits the gradient in half where Python's ``max`` gives it all to the student). Half-precision inputs
    are computed in float32. Un-pooled maps ``(N, D, H, W)`` are global-average-pooled and tokens
    ``(N, L, D)`` averaged first (so the two models' maps may differ in spatial size).

    Args:
        student_emb: student embeddings (already projected to the teacher's dimension).
        teacher_emb: teacher embeddings of the same images.
        class_centers: row k is the centre of class k (per-class mean teacher embedding).
        labels: integer class indices.

    Shape:
        student_emb, teacher_emb ``(N, D)`` (or ``(N, D, H, W)`` / ``(N, L, D)``); class_centers ``(K, D)``;
        labels ``(N,)``.

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> centers = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
        >>> t = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
        >>> nd_loss(s, t, centers, torch.tensor([0, 1])).item()  # (0 + (1 - 0.5)) / 2
        0.25
    """
    for key, value in (("student_emb", student_emb), ("teacher_emb", teacher_emb)):
        if not torch.is_tensor(value) or value.ndim not in (2, 3, 4):
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(
                f"nd_loss expects {key} of shape (N, D), (N, D, H, W) or (N, L, D), got {shape}."
            )
    if not torch.is_tensor(class_centers) or class_centers.ndim != 2:
        shape = tuple(class_centers.shape) if torch.is_tensor(class_centers) else type(class_centers).__name__
        raise ValueError(f"nd_loss expects class_centers of shape (K, D), got {shape}.")
    student_emb, teacher_emb = flatten_embedding(student_emb), flatten_embedding(teacher_emb)
    if student_emb.shape != teacher_emb.shape:
        raise ValueError(
            f"nd_loss: student embedding {tuple(student_emb.shape)} and teacher embedding "
            f"{tuple(teacher_emb.shape)} must have the same shape (project the student to the teacher's "
            "dimension first)."
        )
    if class_centers.shape[1] != student_emb.shape[1]:
        raise ValueError(
            f"nd_loss: class centres {tuple(class_centers.shape)} must have the embedding dimension of "
            f"the embeddings {tuple(student_emb.shape)}."
        )
    check_class_indices("nd_loss", labels, student_emb.shape[0], len(class_centers))
    dtype = common_float_dtype(student_emb, teacher_emb, class_centers)
    s, t = student_emb.to(dtype), teacher_emb.to(dtype)
    centers = class_centers.to(device=s.device, dtype=dtype)[labels.to(s.device)]
    direction = centers / centers.norm(dim=1, keepdim=True)
    max_norm = torch.maximum(s.norm(dim=1), t.norm(dim=1))
    return (1.0 - (s * direction).sum(dim=1) / max_norm).mean()
