"""Boundary-privileged KD (BPKD) for semantic segmentation, functional form. EXPERIMENTAL.

Liu, Wang, Phan, Zhang, Ge & Liu, "BPKD: Boundary Privileged Knowledge Distillation For Semantic
Segmentation", WACV 2024, arXiv:2306.08075. The authors' repository (AkideLiu/BPKD, 83014fa) holds only
evaluation configs and checkpoints ("Training Code Coming Soon"), and the paper's method section (Sec. 3)
could not be read: **the formulation here is unverified**. It is the best reading of the secondary sources
recorded in the project's method notes (a third-party re-implementation whose docstrings name the blocks
of the paper's Figure 2: pre-mask filtering, softmax, KL, post-mask filtering, alpha, sum / number of mask
pixels, plus a channel-wise body loss with a T^2/C factor). Every uncertain choice is a keyword argument.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import (
    at_least_float32,
    check_choice,
    check_label_map,
    check_non_negative,
    check_odd_kernel,
    check_positive,
    check_positive_int,
    check_segmentation_labels,
    match_spatial,
)

BPKDCountMode = Literal["soft_sum", "nonzero_count"]
"""How ``n_c``, the number of edge pixels of class c, is counted (see :func:`bpkd_terms`)."""

BPKDIgnoreMode = Literal["neutral", "background"]
"""How ignored label pixels enter the edge and body masks (see :func:`boundary_masks`)."""

BPKD_COUNT_MODES: tuple[str, ...] = get_args(BPKDCountMode)
BPKD_IGNORE_MODES: tuple[str, ...] = get_args(BPKDIgnoreMode)


def boundary_masks(
    target: Tensor,
    num_classes: int,
    size: tuple[int, int],
    edge_width: int = 7,
    ignore_index: int = 255,
    ignore_mode: BPKDIgnoreMode = "neutral",
) -> tuple[Tensor, Tensor]:
    """Per-class soft edge and body masks of a ground-truth label map, pooled to the logit size.

    1. One-hot ``G`` of the labels at label resolution (ignored pixels are zero in every channel).
    2. Per-class trimap edge ``E = dilate_k(G) - erode_k(G)`` with a square ``k x k`` structuring element,
       ``k = edge_width``: dilation is a stride-1 max-pool, erosion ``1 - maxpool(1 - G)``; the image
       border is not an edge (the pooling padding never counts).
    3. ``M_E = adaptive_avg_pool2d(E, size)``: the fraction of edge pixels of each logit cell. For an
       integer ratio this is plain ``r x r`` average pooling with stride r; non-integer ratios use
       PyTorch's adaptive bins (``floor(i*H/h)`` .. ``ceil((i+1)*H/h)``, which may overlap).
    4. Body ``M_B``: see ``ignore_mode``; without ignored pixels it is ``1 - M_E`` in both modes.

    ``ignore_mode`` (not specified by any source; the third-party re-implementation zeroes ignored pixels
    in ``G`` and, in its last revision only, removes them from the body):

    - ``"neutral"`` (default): ignored pixels neither create nor hide a boundary. The erosion treats
      them as belonging to the class, edges are zeroed on them, and the body is the valid non-edge
      fraction ``M_B = avgpool(valid) - M_E``. So a pixel is an edge of class c iff it is labelled, and
      its ``k x k`` window holds a pixel of class c and a labelled pixel of another class. A logit cell
      whose pixels are all ignored has ``M_E = M_B = 0`` in every channel.
    - ``"background"``: the literal reading ``E = dilate(G) - erode(G)`` of the zeroed one-hot, with
      ``M_B = 1 - M_E``. Ignored regions then act as a class of their own: their rim becomes an edge of
      the neighbouring classes (ignored pixels next to class c included), and they count as body.

    Args:
        target: integer labels; ``ignore_index`` marks unlabelled pixels.
        num_classes: number of classes C; other labels than ``[0, C)`` and ``ignore_index`` are errors.
        size: ``(h, w)``, the logit size the masks are pooled to.
        edge_width: odd kernel size k of the dilation/erosion, applied at label resolution. Default 7
            (r = 3): the third-party re-implementation's default and tuned value; the paper's value
            (it has an edge-width ablation) is unknown.
        ignore_index: label of unlabelled pixels.
        ignore_mode: ``"neutral"`` or ``"background"`` (above).

    Shape:
        target ``(N, H, W)``; returns two float32 tensors ``(N, C, h, w)`` with values in ``[0, 1]``.

    Returns:
        ``(edge, body)``: the soft masks ``M_E`` and ``M_B``.

    Example:
        >>> import torch
        >>> y = torch.zeros(1, 4, 4, dtype=torch.long)
        >>> y[0, :, 2:] = 1  # class 0 on the left half, class 1 on the right half
        >>> edge, body = boundary_masks(y, num_classes=2, size=(4, 4), edge_width=3)
        >>> edge[0, 1]
        tensor([[0., 1., 1., 0.],
                [0., 1., 1., 0.],
                [0., 1., 1., 0.],
                [0., 1., 1., 0.]])
        >>> body[0, 1, 0]
        tensor([1., 0., 0., 1.])
    """
    check_positive_int("boundary_masks", "num_classes", num_classes)
    check_odd_kernel("boundary_masks", "edge_width", edge_width)
    check_choice("boundary_masks", "ignore_mode", ignore_mode, BPKD_IGNORE_MODES)
    if len(tuple(size)) != 2 or any(isinstance(v, bool) or int(v) != v or v <= 0 for v in size):
        raise ValueError(f"boundary_masks: size must be two positive integers (h, w), got {size!r}.")
    check_segmentation_labels("boundary_masks", target, num_classes, ignore_index)

    valid = (target != ignore_index).unsqueeze(1).float()  # (N, 1, H, W)
    one_hot = F.one_hot(torch.where(target != ignore_index, target, 0).long(), num_classes)
    one_hot = one_hot.permute(0, 3, 1, 2).float() * valid  # (N, C, H, W), ignored pixels all zero
    pad = edge_width // 2
    dilated = F.max_pool2d(one_hot, edge_width, stride=1, padding=pad)
    if ignore_mode == "neutral":
        # erosion where only *labelled* pixels of another class erode class c
        eroded = 1.0 - F.max_pool2d(valid - one_hot, edge_width, stride=1, padding=pad)
        edge = (dilated - eroded) * valid
    else:
        eroded = 1.0 - F.max_pool2d(1.0 - one_hot, edge_width, stride=1, padding=pad)
        edge = dilated - eroded
    size = (int(size[0]), int(size[1]))
    edge_mask = F.adaptive_avg_pool2d(edge, size)
    if ignore_mode == "neutral":
        body_mask = (F.adaptive_avg_pool2d(valid, size) - edge_mask).clamp(min=0.0)
    else:
        body_mask = 1.0 - edge_mask
    return edge_mask, body_mask


def bpkd_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    edge_width: int = 7,
    temperature: float = 4.0,
    body_temperature: float | None = None,
    alpha_edge: float = 2.0,
    count_mode: BPKDCountMode = "soft_sum",
    mask_logits_before_softmax: bool = True,
    ignore_index: int = 255,
    ignore_mode: BPKDIgnoreMode = "neutral",
) -> tuple[Tensor, Tensor]:
    """The two unweighted BPKD terms ``(L_edge, L_body)`` on segmentation logits. Formulation unverified.

    Liu et al., "BPKD: Boundary Privileged Knowledge Distillation For Semantic Segmentation", WACV 2024,
    arXiv:2306.08075. No official training code exists (AkideLiu/BPKD @ 83014fa has evaluation code only)
    and the paper's equations could not be read; this follows the reconstruction in the project's method
    notes (methods-verified.md, section 1.2), itself from a third-party re-implementation. Treat it as
    experimental and record the keyword arguments with every result.

    With ``M_E``, ``M_B`` from :func:`boundary_masks` at the student's logit size ``(h, w)`` (the teacher
    logits are resized to it, bilinear, ``align_corners=False``, when the sizes differ) and ``T`` the
    temperature:

    - **Edge loss** (pixel-wise, over classes). ``mask_logits_before_softmax=True`` (the re-implementation's
      "pre-mask filtering"): ``p = softmax_c((z * M_E) / T)`` for both networks, ``z * M_E`` multiplying
      every class channel by its own edge mask. Per pixel ``phi_i = T^2 KL(p^T_i || p^S_i)``. Then
      ("post-mask filtering") ``L_edge = alpha_edge * mean_n sum_c (1 / n_c) sum_i M_E[n, c, i] phi_i``,
      where ``n_c`` counts the edge pixels of class c in image n (``count_mode``) clamped to ``>= 1``.
      With ``mask_logits_before_softmax=False`` the softmax takes the raw logits and the mask only weights
      the per-pixel loss (the post-mask sum above).
    - **Body loss** (channel-wise, CWD-style "shape constraint"). ``True``: ``z_B = z * M_B``; for every
      class channel a softmax over the ``h * w`` positions at temperature ``T_b``;
      ``L_body = T_b^2 / (N C) sum_{n, c} KL(q^T_{n,c} || q^S_{n,c})`` (CWD's normalisation). Positions
      with ``M_B = 0`` keep a zero logit and still take part in the spatial softmax (a floor, not an
      exclusion). ``False``: the spatial softmax takes the raw logits and the per-position KL terms are
      weighted by ``M_B`` before the sum (ignored positions then still enter the softmax denominators).

    Computed in the logits' dtype (the masks are built in float32 and cast).

    Args:
        student_logits: the student's segmentation logits (decode-head resolution, not upsampled).
        teacher_logits: the teacher's logits; resized to the student's size if needed.
        target: ground-truth labels at label resolution, ``ignore_index`` for unlabelled pixels.
        edge_width: odd kernel size of the edge (label resolution); see :func:`boundary_masks`.
        temperature: T of the edge loss (and of the body loss unless ``body_temperature`` is given).
            Default 4: the re-implementation's code default (its tuned config uses 2); unverified.
        body_temperature: T_b of the body loss; ``None`` uses ``temperature``.
        alpha_edge: the edge loss's alpha. Default 2 (the re-implementation's, unverified; one of its
            docstrings writes a per-class alpha_c, whose meaning is unknown).
        count_mode: ``"soft_sum"`` (``n_c = sum_i M_E[c, i]``) or ``"nonzero_count"``
            (``n_c = #{i : M_E[c, i] > 0}``); both clamped to ``>= 1``. As ``M_E <= 1``, the soft sum is
            never larger, so ``"soft_sum"`` gives an edge loss ``>=`` the ``"nonzero_count"`` one.
        mask_logits_before_softmax: multiply the logits by the masks before the softmaxes (default), or
            use the masks as weights of the per-pixel / per-position losses.
        ignore_index: label of unlabelled pixels (mmseg and this library: 255).
        ignore_mode: ``"neutral"`` or ``"background"``; see :func:`boundary_masks`.

    Shape:
        student_logits ``(N, C, h, w)``, teacher_logits ``(N, C, h', w')``, target ``(N, H, W)``.

    Returns:
        ``(edge_loss, body_loss)``: two 0-dim tensors, unweighted by lambda_edge / lambda_body.

    Example:
        >>> import torch
        >>> y = torch.zeros(1, 8, 8, dtype=torch.long)
        >>> y[0, 2:6, 2:6] = 1
        >>> z = torch.randn(1, 2, 4, 4)
        >>> [t.item() for t in bpkd_terms(z, z, y, edge_width=3)]
        [0.0, 0.0]
    """
    who = "bpkd_terms"
    if student_logits.ndim != 4 or teacher_logits.ndim != 4:
        raise ValueError(
            f"{who} expects (N, C, h, w) segmentation logits, got student {tuple(student_logits.shape)} and "
            f"teacher {tuple(teacher_logits.shape)}."
        )
    n, c, h, w = student_logits.shape
    if teacher_logits.shape[:2] != student_logits.shape[:2]:
        raise ValueError(
            f"{who}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same batch size and number of classes."
        )
    check_label_map(who, target, n)
    check_positive(who, "temperature", temperature)
    if body_temperature is not None:
        check_positive(who, "body_temperature", body_temperature)
    check_non_negative(who, "alpha_edge", alpha_edge)
    check_choice(who, "count_mode", count_mode, BPKD_COUNT_MODES)

    # float32 before the resize, the softmaxes and the KL sums
    student_logits, teacher_logits = at_least_float32(student_logits), at_least_float32(teacher_logits)
    teacher_logits = match_spatial(teacher_logits, (h, w), mode="bilinear")
    edge, body = boundary_masks(target, c, (h, w), edge_width, ignore_index, ignore_mode)
    edge = edge.to(student_logits.dtype)
    body = body.to(student_logits.dtype)

    # ---- edge loss: pixel-wise KL over classes, post-masked and class-balanced by n_c ----
    t = float(temperature)
    if mask_logits_before_softmax:
        zs, zt = student_logits * edge, teacher_logits * edge
    else:
        zs, zt = student_logits, teacher_logits
    log_ps = F.log_softmax(zs / t, dim=1)
    log_pt = F.log_softmax(zt / t, dim=1)
    phi = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1, keepdim=True) * t * t  # (N, 1, h, w)
    if count_mode == "soft_sum":
        n_c = edge.sum(dim=(2, 3))
    else:
        n_c = (edge > 0).sum(dim=(2, 3)).to(edge.dtype)
    per_class = (edge * phi).sum(dim=(2, 3)) / n_c.clamp(min=1.0)  # (N, C)
    edge_loss = float(alpha_edge) * per_class.sum(dim=1).mean()

    # ---- body loss: channel-wise spatial softmax (CWD), T_b^2 / (N C) ----
    tb = t if body_temperature is None else float(body_temperature)
    if mask_logits_before_softmax:
        zs, zt, weights = student_logits * body, teacher_logits * body, None
    else:
        zs, zt, weights = student_logits, teacher_logits, body.flatten(2)
    log_qs = F.log_softmax(zs.flatten(2) / tb, dim=2)
    log_qt = F.log_softmax(zt.flatten(2) / tb, dim=2)
    kl = log_qt.exp() * (log_qt - log_qs)  # (N, C, h*w)
    if weights is not None:
        kl = kl * weights
    body_loss = kl.sum() * (tb * tb / (n * c))
    return edge_loss, body_loss


def bpkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    edge_weight: float = 0.1,
    body_weight: float = 0.1,
    **kwargs: object,
) -> Tensor:
    """``body_weight * L_body + edge_weight * L_edge`` from :func:`bpkd_terms` (formulation unverified).

    Defaults lambda_edge = 50, lambda_body = 20 are the third-party re-implementation's code defaults
    (its tuned SegFormer config uses 4 and 2); no source ties them to the paper.

    Args:
        student_logits: see :func:`bpkd_terms`.
        teacher_logits: see :func:`bpkd_terms`.
        target: see :func:`bpkd_terms`.
        edge_weight: lambda_edge.
        body_weight: lambda_body.
        **kwargs: the keyword arguments of :func:`bpkd_terms`.

    Returns:
        0-dim loss.

    Example:
        >>> import torch
        >>> y = torch.zeros(1, 8, 8, dtype=torch.long)
        >>> z = torch.randn(1, 3, 4, 4)
        >>> bpkd_loss(z, z, y, edge_width=3).item()
        0.0
    """
    check_non_negative("bpkd_loss", "edge_weight", edge_weight)
    check_non_negative("bpkd_loss", "body_weight", body_weight)
    edge, body = bpkd_terms(student_logits, teacher_logits, target, **kwargs)  # type: ignore[arg-type]
    return body_weight * body + edge_weight * edge
