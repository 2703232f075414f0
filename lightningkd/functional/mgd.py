"""MGD: masked generative distillation, functional form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from lightningkd.functional._helpers import at_least_float32, check_choice, check_non_negative, shape_of

MGDMask = Literal["spatial", "channel"]
"""The masks of :func:`mgd_keep_mask`: per position (detection, segmentation) or per channel
(classification)."""

MGD_MASKS: tuple[str, ...] = get_args(MGDMask)


def check_mask_ratio(who: str, mask_ratio: float) -> float:
    """``mask_ratio`` as a float if it is a number in [0, 1] (the share of positions or channels masked)."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio <= 1:
        raise ValueError(f"{who}: mask_ratio must be a number in [0, 1], got {mask_ratio!r}.")
    return float(mask_ratio)


def mgd_mask_shape(feat: Tensor, mask: MGDMask = "spatial") -> tuple[int, int, int, int]:
    """The shape of MGD's random draw for a ``(N, C, H, W)`` map: ``(N, 1, H, W)`` or ``(N, C, 1, 1)``.

    Example:
        >>> import torch
        >>> mgd_mask_shape(torch.zeros(2, 8, 4, 5)), mgd_mask_shape(torch.zeros(2, 8, 4, 5), "channel")
        ((2, 1, 4, 5), (2, 8, 1, 1))
    """
    check_choice("mgd_mask_shape", "mask", mask, MGD_MASKS)
    n, c, h, w = feat.shape
    return (n, 1, h, w) if mask == "spatial" else (n, c, 1, 1)


def mgd_keep_mask(rand: Tensor, mask: MGDMask = "spatial", mask_ratio: float = 0.65) -> Tensor:
    """MGD's keep mask (1 kept, 0 zeroed) from a uniform draw ``rand`` in ``[0, 1)``.

    Yang, Li, Shao, Shi, Yuan & Yuan, "Masked Generative Distillation", ECCV 2022, arXiv:2205.01529;
    yzd-v/MGD (2c9da0b). As the official code of each task: ``"spatial"`` (``det/.../mgd.py``,
    ``seg/.../mgd.py``) zeroes where ``rand > 1 - mask_ratio``; ``"channel"`` (``cls/.../mgd.py``) zeroes
    where ``rand < mask_ratio``. Both mask a ``mask_ratio`` fraction on average (mmrazor's port uses
    ``rand > 1 - ratio`` for both, which masks other channels from the same draw at the same rate).

    Args:
        rand: the uniform draw (``(N, 1, H, W)`` spatial, ``(N, C, 1, 1)`` channel).
        mask: ``"spatial"`` or ``"channel"``.
        mask_ratio: the fraction masked, in ``[0, 1]``.

    Shape:
        the shape of ``rand``.

    Returns:
        the keep mask, in ``rand``'s dtype.

    Example:
        >>> import torch
        >>> mgd_keep_mask(torch.tensor([0.1, 0.5, 0.9]), "spatial", 0.65)
        tensor([1., 0., 0.])
        >>> mgd_keep_mask(torch.tensor([0.1, 0.5, 0.9]), "channel", 0.15)
        tensor([0., 1., 1.])
    """
    check_choice("mgd_keep_mask", "mask", mask, MGD_MASKS)
    ratio = check_mask_ratio("mgd_keep_mask", mask_ratio)
    dropped = rand > 1 - ratio if mask == "spatial" else rand < ratio
    return (~dropped).to(rand.dtype if rand.is_floating_point() else torch.float32)


def mgd_loss(
    student: Tensor,
    teacher: Tensor,
    generator: Callable[[Tensor], Tensor],
    *,
    alpha: float = 2e-5,
    mask: MGDMask = "spatial",
    mask_ratio: float = 0.65,
    rand: Tensor | None = None,
    keep_mask: Tensor | None = None,
) -> Tensor:
    """``alpha * sum((G(S * M) - T)^2) / N``: the teacher's map regenerated from the masked student's.

    Yang, Li, Shao, Shi, Yuan & Yuan, "Masked Generative Distillation", ECCV 2022, arXiv:2205.01529.
    Authors' code: yzd-v/MGD ``det/mmdet/distillation/losses/mgd.py`` ``FeatureLoss``,
    ``seg/mmseg/distillation/losses/mgd.py``, ``cls/mmcls/distillation/losses/mgd.py`` ``MGDLoss``
    (2c9da0b); matches the parity fixtures made from them (and mmrazor's ``MGDConnector`` +
    ``MGDLoss``). ``M`` is a random keep mask (:func:`mgd_keep_mask`), ``G`` the learnable generator
    (Conv3x3 -> ReLU -> Conv3x3), and the squared error is **summed** over ``C, H, W`` and divided by
    the batch size only, hence the tiny ``alpha``. The student map must already have the teacher's
    channels (apply the align convolution first).

    The mask is ``keep_mask`` if given, else computed from ``rand`` if given, else drawn here with
    :func:`torch.rand` on the student's device (so it follows the global seed), a fresh one per call.

    Args:
        student: the (aligned) student map, ``C_t`` channels.
        teacher: the teacher map.
        generator: the generator ``G`` (a module ``(N, C_t, H, W) -> (N, C_t, H, W)``).
        alpha: loss coefficient (det / seg 2e-5, cls 7e-5).
        mask: ``"spatial"`` (detection, segmentation) or ``"channel"`` (classification).
        mask_ratio: fraction masked (det 0.65, seg 0.75, cls 0.15).
        rand: an explicit uniform draw of shape ``(N, 1, H, W)`` / ``(N, C_t, 1, 1)``.
        keep_mask: an explicit keep mask (1 kept, 0 zeroed) of that shape; excludes ``rand``.

    Shape:
        student and teacher ``(N, C_t, H, W)``.

    Returns:
        0-dim loss (``alpha`` included).

    Example:
        >>> import torch
        >>> s, t = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
        >>> keep = torch.ones(2, 1, 4, 4)
        >>> mgd_loss(s, t, lambda x: x, alpha=1.0, keep_mask=keep).item()  # 48 squared ones per image
        48.0
    """
    who = "mgd_loss"
    check_choice(who, "mask", mask, MGD_MASKS)
    ratio = check_mask_ratio(who, mask_ratio)
    a = check_non_negative(who, "alpha", alpha)
    for side, x in (("student", student), ("teacher", teacher)):
        if not torch.is_tensor(x) or x.ndim != 4 or x.numel() == 0:
            raise ValueError(f"{who} expects non-empty (N, C, H, W) {side} feature maps, got {shape_of(x)}.")
    if student.shape != teacher.shape:
        raise ValueError(
            f"{who}: the student map {tuple(student.shape)} and the teacher map {tuple(teacher.shape)} must have "
            "the same shape (align the student's channels first; tap layers of the same stride)."
        )
    shape = mgd_mask_shape(teacher, mask)
    if rand is not None and keep_mask is not None:
        raise ValueError(f"{who}: give rand or keep_mask, not both.")
    if keep_mask is None:
        if rand is None:
            rand = torch.rand(shape, device=student.device)
        if tuple(rand.shape) != shape:
            raise ValueError(
                f"{who}: rand must have shape {shape} for a {mask} mask, got {tuple(rand.shape)}."
            )
        keep_mask = mgd_keep_mask(rand, mask, ratio)
    elif tuple(keep_mask.shape) != shape:
        raise ValueError(
            f"{who}: keep_mask must have shape {shape} for a {mask} mask, got {tuple(keep_mask.shape)}."
        )
    masked = student * keep_mask.to(device=student.device, dtype=student.dtype)
    generated = at_least_float32(generator(masked))
    return a * (generated - at_least_float32(teacher)).pow(2).sum() / teacher.shape[0]
