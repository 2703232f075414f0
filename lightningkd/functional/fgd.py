"""FGD: focal and global knowledge distillation for detectors, functional form."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import (
    at_least_float32,
    check_non_negative,
    check_positive,
    shape_of,
)

FGD_TERMS: tuple[str, ...] = ("fg", "bg", "attention", "global")
"""The keys of :func:`fgd_terms`, in order."""


def _check_map(who: str, x: Tensor, side: str) -> Tensor:
    if not torch.is_tensor(x) or x.ndim != 4 or x.numel() == 0:
        raise ValueError(f"{who} expects a non-empty (N, C, H, W) {side} feature map, got {shape_of(x)}.")
    return at_least_float32(x)


def fgd_masks(
    boxes: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    feature_size: tuple[int, int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background masks of one feature level, from the ground-truth boxes.

    Yang, Li, Jiang, Gong, Yuan, Zhao & Yuan, "Focal and Global Knowledge Distillation for Detectors",
    CVPR 2022, arXiv:2111.11837. Authors' code: yzd-v/FGD ``mmdet/distillation/losses/fgd.py``
    ``FeatureLoss.forward`` (c03a6cf); this is an independent implementation of the behaviour described
    there.

    Each box ``(x1, y1, x2, y2)`` (pixels of image ``n``, whose size is ``image_sizes[n] = (h, w)``) is
    scaled to the ``(H, W)`` feature grid: ``x' = x / w * W``, ``y' = y / h * H`` (in the boxes' floating
    dtype, divide first, as the official code). It covers the rows ``floor(y1')..ceil(y2')`` and columns
    ``floor(x1')..ceil(x2')`` *inclusive* (one extra cell on the far side), clipped to the map, with the
    value ``1 / ((ceil(y2') - floor(y1') + 1) * (ceil(x2') - floor(x1') + 1))`` computed before
    clipping. Where boxes overlap the largest value wins. The background is ``1`` on the cells no box
    covers, divided by the number of such cells of that image (so it sums to 1); an image without boxes
    gets ``1 / (H * W)`` everywhere, and an image fully covered by boxes a zero background.

    The official code passes the un-padded resized image size (mmdet's ``img_shape``) although the
    feature map covers the padded batch: boxes are stretched by ``padded / un-padded``. Pass the padded
    size for every image to scale by what the map really covers. Quirk kept: the box value is computed
    from integer cell counts in **float32** (``1.0 / int_tensor / int_tensor``), whatever ``dtype`` is;
    the background is normalised in ``dtype``. A negative ``floor(x1')`` (a box outside the image) is
    clipped to 0 here (the official Python slicing would wrap around).

    Args:
        boxes: one ``(K_n, 4)`` tensor of ``x1, y1, x2, y2`` per image (``K_n`` may be 0).
        image_sizes: ``(h, w)`` per image: the size the box coordinates are relative to.
        feature_size: ``(H, W)`` of the feature map.
        dtype: floating dtype of the returned masks (the box values are float32 numbers in any case).
        device: device of the masks (default: the boxes' device).

    Shape:
        returns ``(foreground, background)``, each ``(N, H, W)``.

    Returns:
        the foreground and background masks.

    Example:
        >>> import torch
        >>> fg, bg = fgd_masks([torch.tensor([[0.0, 0.0, 4.0, 4.0]])], [(16, 16)], (4, 4))
        >>> fg[0]  # the 4x4-pixel box is one cell; floor..ceil inclusive covers 2x2 cells
        tensor([[0.2500, 0.2500, 0.0000, 0.0000],
                [0.2500, 0.2500, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.0000, 0.0000]])
        >>> round(bg[0, 3, 3].item() * 12, 6)  # 1 / (16 - 4) on each of the 12 background cells
        1.0
    """
    who = "fgd_masks"
    if len(boxes) != len(image_sizes):
        raise ValueError(
            f"{who}: got boxes for {len(boxes)} images but {len(image_sizes)} image sizes; give one (h, w) "
            "per image."
        )
    if len(feature_size) != 2 or any(isinstance(v, bool) or int(v) != v or v <= 0 for v in feature_size):
        raise ValueError(f"{who}: feature_size must be a positive (H, W), got {tuple(feature_size)!r}.")
    height, width = (int(v) for v in feature_size)
    if device is None:
        device = boxes[0].device if len(boxes) and torch.is_tensor(boxes[0]) else None
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    foreground = []
    for n, (image_boxes, size) in enumerate(zip(boxes, image_sizes)):
        if not torch.is_tensor(image_boxes) or image_boxes.ndim != 2 or image_boxes.shape[1] != 4:
            raise ValueError(
                f"{who}: the boxes of image {n} must be a (K, 4) tensor of x1, y1, x2, y2, got "
                f"{shape_of(image_boxes)}."
            )
        if len(size) != 2 or any(v <= 0 for v in size):
            raise ValueError(f"{who}: the size of image {n} must be a positive (h, w), got {tuple(size)!r}.")
        img_h, img_w = (int(v) for v in size)
        b = image_boxes.to(device)
        b = b if b.is_floating_point() else b.float()
        if b.shape[0] == 0:
            foreground.append(torch.zeros(height, width, dtype=torch.float32, device=device))
            continue
        x1 = torch.floor(b[:, 0] / img_w * width).long()
        x2 = torch.ceil(b[:, 2] / img_w * width).long()
        y1 = torch.floor(b[:, 1] / img_h * height).long()
        y2 = torch.ceil(b[:, 3] / img_h * height).long()
        # the official weight: 1.0 / int / int, a float32 number
        area = 1.0 / (y2 + 1 - y1).float() / (x2 + 1 - x1).float()
        x1, y1 = x1.clamp(min=0), y1.clamp(min=0)
        inside = (
            (rows >= y1.view(-1, 1, 1))
            & (rows <= y2.view(-1, 1, 1))
            & (cols >= x1.view(-1, 1, 1))
            & (cols <= x2.view(-1, 1, 1))
        )
        values = torch.where(inside, area.view(-1, 1, 1), torch.zeros((), device=device))
        foreground.append(values.amax(dim=0))
    fg = torch.stack(foreground).to(dtype) if foreground else torch.zeros(0, height, width, dtype=dtype)
    bg = (fg == 0).to(dtype)
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1)
    return fg, bg


def fgd_attention(feat: Tensor, temperature: float = 0.5) -> tuple[Tensor, Tensor]:
    """FGD's spatial and channel attention of a feature map.

    Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022, arXiv:2111.11837;
    yzd-v/FGD ``mmdet/distillation/losses/fgd.py`` ``FeatureLoss.get_attention`` (c03a6cf). With
    ``A = |F|``: ``spatial = H * W * softmax_{h,w}(mean_c A / t)`` and
    ``channel = C * softmax_c(mean_{h,w} A / t)`` (each averages to 1). Half precision is computed in
    float32.

    Args:
        feat: feature map.
        temperature: t > 0 (configs: 0.5; FCOS 0.8).

    Shape:
        feat ``(N, C, H, W)``; returns spatial ``(N, H, W)`` and channel ``(N, C)``.

    Returns:
        ``(spatial, channel)`` attention.

    Example:
        >>> import torch
        >>> spatial, channel = fgd_attention(torch.ones(1, 3, 2, 2))
        >>> spatial, channel
        (tensor([[[1., 1.],
                 [1., 1.]]]), tensor([[1., 1., 1.]]))
    """
    x = _check_map("fgd_attention", feat, "")
    t = check_positive("fgd_attention", "temperature", temperature)
    n, c, h, w = x.shape
    value = x.abs()
    spatial = (h * w) * F.softmax((value.mean(dim=1) / t).reshape(n, -1), dim=1)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / t, dim=1)
    return spatial.reshape(n, h, w), channel


def fgd_terms(
    student: Tensor,
    teacher: Tensor,
    foreground: Tensor,
    background: Tensor,
    *,
    temperature: float = 0.5,
    alpha: float = 1e-3,
    beta: float = 5e-4,
    gamma: float = 5e-4,
    lambda_global: float = 5e-6,
    student_global: Callable[[Tensor], Tensor] | None = None,
    teacher_global: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """FGD's four weighted terms ``fg``, ``bg``, ``attention`` and ``global`` on one feature level.

    Yang, Li, Jiang, Gong, Yuan, Zhao & Yuan, "Focal and Global Knowledge Distillation for Detectors",
    CVPR 2022, arXiv:2111.11837. Authors' code: yzd-v/FGD ``mmdet/distillation/losses/fgd.py``
    ``FeatureLoss`` (c03a6cf); matches the parity fixtures made from it. With the **teacher's** attention
    ``w[n,c,h,w] = spatial_T[n,h,w] * channel_T[n,c]`` (:func:`fgd_attention`) and ``D = (S - T)^2``:

    - ``fg = alpha * sum(M_fg * w * D) / N`` and ``bg = beta * sum(M_bg * w * D) / N`` (masks from
      :func:`fgd_masks`; divided by the batch size only),
    - ``attention = gamma * (sum|channel_S - channel_T| + sum|spatial_S - spatial_T|) / N``,
    - ``global = lambda_global * sum((G_S(S) - G_T(T))^2) / N`` with the two GcBlocks ``student_global``
      and ``teacher_global`` (separate learnable weights; each returns ``x + channel_add(context(x))``).
      Without GcBlocks (``None``) the identity is used: ``sum((S - T)^2) / N``, the value at the
      official initialisation, whose last GcBlock convolution is zero.

    Nothing is detached (the teacher's features come from a no_grad forward). The student map must
    already have the teacher's channels (apply the align convolution first). Half precision is computed
    in float32.

    Args:
        student: student feature map (after the align convolution).
        teacher: teacher feature map.
        foreground: foreground mask.
        background: background mask.
        temperature: attention temperature t > 0 (configs: 0.5; FCOS 0.8).
        alpha: weight of the foreground term (RetinaNet config 1e-3).
        beta: weight of the background term (RetinaNet config 5e-4).
        gamma: weight of the attention term (RetinaNet config 5e-4).
        lambda_global: weight of the global (relation) term (RetinaNet config 5e-6).
        student_global: the student's GcBlock (``None``: identity).
        teacher_global: the teacher's GcBlock (``None``: identity).

    Shape:
        student and teacher ``(N, C, H, W)``; masks ``(N, H, W)``.

    Returns:
        ``{"fg", "bg", "attention", "global"}``: 0-dim tensors, each multiplied by its coefficient.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 4, 3, 3)
        >>> fg, bg = fgd_masks([torch.zeros(0, 4), torch.zeros(0, 4)], [(12, 12), (12, 12)], (3, 3))
        >>> {k: v.item() for k, v in fgd_terms(x, x, fg, bg).items()}
        {'fg': 0.0, 'bg': 0.0, 'attention': 0.0, 'global': 0.0}
    """
    who = "fgd_terms"
    s = _check_map(who, student, "student")
    t = _check_map(who, teacher, "teacher")
    if s.shape != t.shape:
        raise ValueError(
            f"{who}: the student map {tuple(s.shape)} and the teacher map {tuple(t.shape)} must have the same "
            "shape (align the student's channels first; tap levels of the same stride)."
        )
    n, _, h, w = t.shape
    for key, mask in (("foreground", foreground), ("background", background)):
        if not torch.is_tensor(mask) or tuple(mask.shape) != (n, h, w):
            raise ValueError(
                f"{who}: the {key} mask must have shape (N, H, W) = {(n, h, w)}, got {shape_of(mask)}."
            )
    coefficients = {}
    for key, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("lambda_global", lambda_global)):
        coefficients[key] = check_non_negative(who, key, value)
    spatial_t, channel_t = fgd_attention(t, temperature)
    spatial_s, channel_s = fgd_attention(s, temperature)
    dtype = torch.promote_types(s.dtype, t.dtype)
    weighted = (spatial_t.unsqueeze(1) * channel_t[:, :, None, None]) * (s - t).pow(2)
    fg = (foreground.to(dtype).unsqueeze(1) * weighted).sum() / n
    bg = (background.to(dtype).unsqueeze(1) * weighted).sum() / n
    attention = (channel_s - channel_t).abs().sum() / n + (spatial_s - spatial_t).abs().sum() / n
    out_s = s if student_global is None else student_global(s)
    out_t = t if teacher_global is None else teacher_global(t)
    relation = (at_least_float32(out_s) - at_least_float32(out_t)).pow(2).sum() / n
    return {
        "fg": coefficients["alpha"] * fg,
        "bg": coefficients["beta"] * bg,
        "attention": coefficients["gamma"] * attention,
        "global": coefficients["lambda_global"] * relation,
    }


def fgd_loss(
    student: Tensor,
    teacher: Tensor,
    foreground: Tensor,
    background: Tensor,
    *,
    temperature: float = 0.5,
    alpha: float = 1e-3,
    beta: float = 5e-4,
    gamma: float = 5e-4,
    lambda_global: float = 5e-6,
    student_global: Callable[[Tensor], Tensor] | None = None,
    teacher_global: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The sum of :func:`fgd_terms`: FGD's loss on one feature level (same arguments).

    Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022, arXiv:2111.11837;
    yzd-v/FGD ``mmdet/distillation/losses/fgd.py`` ``FeatureLoss`` (c03a6cf). The official detectors add
    this over the FPN levels (:class:`~lightningkd.distillers.PerLevel`).

    Args:
        student: student feature map (after the align convolution).
        teacher: teacher feature map.
        foreground: foreground mask (:func:`fgd_masks`).
        background: background mask (:func:`fgd_masks`).
        temperature: attention temperature t > 0.
        alpha: weight of the foreground term.
        beta: weight of the background term.
        gamma: weight of the attention term.
        lambda_global: weight of the global term.
        student_global: the student's GcBlock (``None``: identity).
        teacher_global: the teacher's GcBlock (``None``: identity).

    Shape:
        student and teacher ``(N, C, H, W)``; masks ``(N, H, W)``.

    Returns:
        0-dim loss ``fg + bg + attention + global``.

    Example:
        >>> import torch
        >>> s, t = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
        >>> fg, bg = fgd_masks([torch.zeros(0, 4)], [(8, 8)], (2, 2))
        >>> fgd_loss(s, t, fg, bg, alpha=0, beta=1, gamma=0, lambda_global=0).item()  # sum(bg * 1 * 1)
        2.0
    """
    terms = fgd_terms(
        student,
        teacher,
        foreground,
        background,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        lambda_global=lambda_global,
        student_global=student_global,
        teacher_global=teacher_global,
    )
    return terms["fg"] + terms["bg"] + terms["attention"] + terms["global"]
