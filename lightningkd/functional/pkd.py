"""PKD: Pearson-correlation distillation of detector features, functional form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import at_least_float32, shape_of

PKD_EPS = 1e-6
"""Added to the standard deviation in :func:`pkd_standardize` (mmrazor's ``PKDLoss.norm``)."""


def pkd_standardize(feat: Tensor) -> Tensor:
    """Standardise every channel of a feature map with statistics pooled over the batch and positions.

    Cao, Zhang, Gao, Cheng, Cheng & Cheng, "PKD: General Distillation Framework for Object Detectors via Pearson
    Correlation Coefficient", NeurIPS 2022, arXiv:2207.02039; official implementation open-mmlab/mmrazor
    ``mmrazor/models/losses/pkd_loss.py`` ``PKDLoss.norm`` (90c7af1). For channel ``c``, over its ``N*H*W``
    values: ``(x - mean_c) / (std_c + 1e-6)`` with the **unbiased** standard deviation (``n - 1``) and
    the eps **added to the std**. Half precision is computed in float32.

    Args:
        feat: feature map.

    Shape:
        ``(N, C, H, W)`` -> ``(N, C, H, W)``.

    Returns:
        the standardised map.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])  # one channel: mean 4, std sqrt(20/3)
        >>> pkd_standardize(x).flatten()
        tensor([-1.1619, -0.3873,  0.3873,  1.1619])
    """
    if not torch.is_tensor(feat) or feat.ndim != 4 or feat.numel() == 0:
        raise ValueError(
            f"pkd_standardize expects a non-empty (N, C, H, W) feature map, got {shape_of(feat)}."
        )
    if feat.numel() // feat.shape[1] < 2:
        raise ValueError(
            f"pkd_standardize: the map {tuple(feat.shape)} has one value per channel; the unbiased standard "
            "deviation needs at least 2 (use a larger batch or map)."
        )
    x = at_least_float32(feat)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=True)
    return (x - mean) / (std + PKD_EPS)


def pkd_loss(student: Tensor, teacher: Tensor, resize_student: bool = True) -> Tensor:
    """``MSE_mean(standardise(S), standardise(T)) / 2`` on one feature level (about ``1 - Pearson r``).

    Cao, Zhang, Gao, Cheng, Cheng & Cheng, "PKD: General Distillation Framework for Object Detectors via Pearson
    Correlation Coefficient", NeurIPS 2022, arXiv:2207.02039; official implementation open-mmlab/mmrazor
    ``mmrazor/models/losses/pkd_loss.py`` ``PKDLoss`` (90c7af1). Both maps are standardised per channel
    over ``(N, H, W)`` (:func:`pkd_standardize`); the loss is the mean squared difference over all
    elements, halved. For standardised vectors of length ``n`` with zero eps this is
    ``(n - 1) / n * (1 - r)`` averaged over channels, ``r`` the Pearson correlation.

    As the official code, the maps are resized only when their **heights** differ (bilinear,
    ``align_corners=False``): the student to the teacher's size (``resize_student=True``, default) or the
    teacher to the student's. Maps of equal height but different width are an error (the official code
    asserts). The channel counts must be equal (PKD has no adapter). mmrazor multiplies by ``loss_weight``
    and sums over the FPN levels; here the loss weight is the distiller's ``weight`` and the sum over
    levels is :class:`~lightningkd.distillers.PerLevel`'s. Half precision is computed in float32.

    Args:
        student: student feature map.
        teacher: teacher feature map.
        resize_student: resize the student to the teacher's size (``False``: the teacher to the student's).

    Shape:
        student ``(N, C, H_s, W_s)``, teacher ``(N, C, H_t, W_t)``.

    Returns:
        0-dim loss (multiply by the loss weight: 6 for Faster R-CNN, 10 for RetinaNet / FCOS).

    Example:
        >>> import torch
        >>> x = torch.randn(2, 4, 5, 5)
        >>> pkd_loss(x, 3 * x + 1).item() < 1e-6  # invariant to a per-channel affine map
        True
    """
    who = "pkd_loss"
    for side, x in (("student", student), ("teacher", teacher)):
        if not torch.is_tensor(x) or x.ndim != 4 or x.numel() == 0:
            raise ValueError(f"{who} expects non-empty (N, C, H, W) {side} feature maps, got {shape_of(x)}.")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"{who}: the student map {tuple(student.shape)} and the teacher map {tuple(teacher.shape)} must have "
            "the same batch size and channel count (PKD has no channel adapter): tap levels with equal "
            "channels, e.g. FPN outputs."
        )
    s, t = at_least_float32(student), at_least_float32(teacher)
    if s.shape[2] != t.shape[2]:
        if resize_student:
            s = F.interpolate(s, size=tuple(t.shape[2:]), mode="bilinear", align_corners=False)
        else:
            t = F.interpolate(t, size=tuple(s.shape[2:]), mode="bilinear", align_corners=False)
    if s.shape != t.shape:
        raise ValueError(
            f"{who}: the student map {tuple(student.shape)} and the teacher map {tuple(teacher.shape)} have the "
            "same height but different widths; as the official code, only maps of different heights are "
            "resized. Tap levels of the same stride."
        )
    return F.mse_loss(pkd_standardize(s), pkd_standardize(t)) / 2
