"""Structured (pair-wise similarity) knowledge distillation for segmentation, functional form."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import (
    at_least_float32,
    autocast_off,
    check_choice,
    check_fraction,
    match_spatial,
    shape_of,
)

SKDPooling = Literal["original", "fixed_2x2"]
"""Values of ``pooling`` in :func:`skd_loss`: the authors' code, or CIRKD's re-implementation."""

SKD_POOLINGS: tuple[str, ...] = get_args(SKDPooling)

# The authors' node normaliser adds this to the (detached) L2 norm.
_ORIGINAL_NORM_EPS = 1e-8


def skd_loss(
    student_feat: Tensor, teacher_feat: Tensor, pooling: SKDPooling = "original", pool_scale: float = 0.5
) -> Tensor:
    """Mean squared difference of the student's and teacher's node-to-node cosine-similarity maps.

    Pair-wise distillation of Liu, Chen, Liu, Qin, Luo & Wang, "Structured Knowledge Distillation for
    Semantic Segmentation", CVPR 2019, arXiv:1903.04197. Each map is max-pooled into a few nodes (non-
    overlapping windows, ``ceil_mode``: border windows cover what is left), each node vector is divided by
    its L2 norm over the channels, and the ``HW' x HW'`` matrix of dot products between all nodes of an
    image is formed for the student and for the teacher; the loss is the mean over images and matrix
    entries of their squared difference. Only similarities are compared, so the channel counts may differ.

    ``pooling`` selects the implementation:

    - ``"original"``: irfanICMLL/structure_knowledge_distillation ``utils/criterion.py``
      ``CriterionPairWiseforWholeFeatAfterPool`` + ``utils/utils.py`` (ce208e1). Kernel = stride =
      ``(int(H * pool_scale), int(W * pool_scale))`` from the teacher's size (about 2x2 nodes at 0.5),
      nodes divided by ``||v|| + 1e-8`` with the norm detached (no gradient through the normaliser). The
      official code casts the features to float32; this function keeps the input precision (float64 stays
      float64).
    - ``"fixed_2x2"``: winycg/CIRKD ``losses/skd.py`` ``CriterionStructuralKD`` (05a2753), a fixed 2x2
      kernel and stride (so ``ceil(H/2) x ceil(W/2)`` nodes) and :func:`torch.nn.functional.normalize`
      (``max(||v||, 1e-12)``, not detached). It gives a different number from ``"original"``.

    When the spatial sizes differ, the teacher map is resized to the student's ``(H, W)`` (bilinear,
    ``align_corners=False``) before pooling; the official code receives maps of equal size.
    Half-precision inputs are computed in float32.

    Args:
        student_feat: student feature map.
        teacher_feat: teacher feature map.
        pooling: ``"original"`` or ``"fixed_2x2"``.
        pool_scale: window size as a fraction of the map (``"original"`` only; authors: 0.5), in (0, 1].

    Shape:
        student ``(N, C_s, H, W)``, teacher ``(N, C_t, H_t, W_t)``.

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> fs = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]).reshape(1, 2, 2, 2)  # e1 e2 e1 e2
        >>> ft = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 2, 2, 2)  # e1 everywhere
        >>> skd_loss(fs, ft).item()  # 1x1 windows, 4 nodes: 8 of the 16 cosines differ by 1
        0.5
        >>> round(skd_loss(fs, ft, pooling="fixed_2x2").item(), 6)  # a single node in each map
        0.0
    """
    check_choice("skd_loss", "pooling", pooling, SKD_POOLINGS)
    check_fraction("skd_loss", "pool_scale", pool_scale)
    if (
        not torch.is_tensor(student_feat)
        or not torch.is_tensor(teacher_feat)
        or student_feat.ndim != 4
        or teacher_feat.ndim != 4
        or student_feat.shape[0] != teacher_feat.shape[0]
        or student_feat.numel() == 0
        or teacher_feat.numel() == 0
    ):
        raise ValueError(
            f"skd_loss: expected non-empty (N, C, H, W) feature maps with the same N, got student "
            f"{shape_of(student_feat)} and teacher {shape_of(teacher_feat)} (the channels and spatial sizes may "
            "differ)."
        )
    fs, ft = at_least_float32(student_feat), at_least_float32(teacher_feat)
    ft = match_spatial(ft, tuple(fs.shape[-2:]), mode="bilinear")
    if pooling == "original":
        h, w = ft.shape[-2:]
        kernel = (int(h * pool_scale), int(w * pool_scale))
        if min(kernel) < 1:
            raise ValueError(
                f"skd_loss: a {h}x{w} map with pool_scale={pool_scale} gives a pooling window of {kernel}; "
                "use a larger feature map or a larger pool_scale."
            )
    else:
        kernel = (2, 2)
    a_s = _node_similarity(F.max_pool2d(fs, kernel, kernel, padding=0, ceil_mode=True), pooling)
    a_t = _node_similarity(F.max_pool2d(ft, kernel, kernel, padding=0, ceil_mode=True), pooling)
    return (a_t - a_s).pow(2).mean()


def _node_similarity(feat: Tensor, pooling: SKDPooling) -> Tensor:
    """``(N, C, h, w)`` pooled map -> ``(N, h*w, h*w)`` cosine similarities between its nodes."""
    nodes = feat.flatten(2)  # (N, C, M)
    if pooling == "original":
        nodes = nodes / (nodes.pow(2).sum(dim=1, keepdim=True).sqrt() + _ORIGINAL_NORM_EPS).detach()
    else:
        nodes = F.normalize(nodes, p=2.0, dim=1, eps=1e-12)
    with autocast_off(nodes):  # the Gram matrix in float32 (autocast would run it in half precision)
        return nodes.transpose(1, 2) @ nodes
