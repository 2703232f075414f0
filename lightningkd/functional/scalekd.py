"""ScaleKD: dual-view feature mimicking, the DC-removing DCT and the term wiring, functional form."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import (
    at_least_float32,
    autocast_off,
    check_non_negative,
    check_positive,
    shape_of,
)

ScaleKDAlpha = tuple[float, float]
"""``(direct view, DC-removed view)`` coefficients of one stage's two DFM terms."""

SCALEKD_TERMS: tuple[str, ...] = ("s3", "s3_alt", "s4", "s4_alt", "kd")
"""The term names of :func:`scalekd_terms` (the official loss keys ``loss_s3`` ... ``loss_kd``)."""


def dct_matrix(
    n: int, *, inverse: bool = False, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> Tensor:
    """The ``n x n`` DCT-II matrix without normalisation (``norm=None``), or its inverse.

    ``D[k, i] = 2 cos(pi k (2i + 1) / (2n))``, so ``D @ x`` is the unnormalised DCT-II of ``x`` (the scale
    of ``scipy.fft.dct(x, norm=None)`` and of the official ``DCT`` class). The inverse is the scaled
    DCT-III ``x_i = X_0 / (2n) + (1/n) sum_{k>0} X_k cos(pi k (2i + 1) / (2n))``, written in closed form
    (no matrix inversion).

    Fan, Li, Liu & Yao, "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers", NeurIPS 2024,
    arXiv:2411.06786; deep-optimization/ScaleKD ``mmcls/models/dis_losses/fmdv2.py`` ``DCT`` (478a7db),
    which builds the same matrices with an FFT.

    Args:
        n: the signal length (a map's height or width), > 0.
        inverse: return ``D^{-1}`` instead of ``D``.
        dtype: dtype of the matrix (default: torch's default float dtype).
        device: device of the matrix.

    Shape:
        ``(n, n)``.

    Returns:
        ``D`` (rows are frequencies) or ``D^{-1}`` (rows are positions).

    Example:
        >>> d = dct_matrix(4, dtype=torch.float64)
        >>> d[0].tolist()  # the DC row: 2 cos(0) everywhere
        [2.0, 2.0, 2.0, 2.0]
        >>> torch.allclose(dct_matrix(4, inverse=True, dtype=torch.float64) @ d, torch.eye(4, dtype=torch.float64))
        True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"dct_matrix: n must be a positive integer, got {n!r}.")
    k = torch.arange(n, dtype=torch.float64)
    angles = math.pi * k[:, None] * (2 * k[None, :] + 1) / (2 * n)  # [frequency, position]
    cosines = torch.cos(angles)
    if inverse:
        weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
        weights[0] = 1.0 / (2 * n)
        matrix = (cosines * weights[:, None]).T  # [position, frequency]
    else:
        matrix = 2 * cosines
    return matrix.to(dtype=dtype or torch.get_default_dtype(), device=device)


def _axis_matrices(
    x: Tensor, dct_h: Tensor | None, dct_w: Tensor | None, inverse: bool, who: str
) -> tuple[Tensor, Tensor]:
    h, w = x.shape[-2:]
    dtype = at_least_float32(x).dtype
    mats = []
    for axis, size, given in (("dct_h", h, dct_h), ("dct_w", w, dct_w)):
        if given is None:
            given = dct_matrix(size, inverse=inverse, dtype=dtype, device=x.device)
        elif tuple(given.shape) != (size, size):
            raise ValueError(
                f"{who}: {axis} must be a ({size}, {size}) matrix for maps of spatial size {(h, w)}, got "
                f"{tuple(given.shape)}."
            )
        mats.append(given.to(dtype=dtype, device=x.device))
    return mats[0], mats[1]


def dct_2d(x: Tensor, dct_h: Tensor | None = None, dct_w: Tensor | None = None) -> Tensor:
    """The separable 2-D DCT-II (``norm=None``) over the last two axes: ``D_h @ x @ D_w^T``.

    One matrix per axis, so non-square maps work (the official code uses one ``H x H`` matrix for both
    axes, which needs ``H = W``; for a square map the two are the same).

    Args:
        x: ``(..., H, W)``.
        dct_h: ``dct_matrix(H)``, or ``None`` to build it here.
        dct_w: ``dct_matrix(W)``, or ``None`` to build it here.

    Shape:
        ``(..., H, W)`` in, the coefficients ``(..., H, W)`` out (half precision is promoted to float32).

    Returns:
        ``X[..., u, v] = sum_{i, j} D_h[u, i] x[..., i, j] D_w[v, j]``.

    Example:
        >>> dct_2d(torch.ones(1, 2, 3)).round(decimals=4).abs()  # a constant: DC only, (2 * 2) * (2 * 3)
        tensor([[[24.,  0.,  0.],
                 [ 0.,  0.,  0.]]])
    """
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError(f"dct_2d expects a tensor (..., H, W), got {shape_of(x)}.")
    dh, dw = _axis_matrices(x, dct_h, dct_w, False, "dct_2d")
    with autocast_off(x):  # the transform in float32 (autocast would run ``@`` in half precision)
        return dh @ at_least_float32(x) @ dw.T


def idct_2d(coefficients: Tensor, idct_h: Tensor | None = None, idct_w: Tensor | None = None) -> Tensor:
    """The inverse of :func:`dct_2d`: ``D_h^{-1} @ X @ D_w^{-T}``.

    Args:
        coefficients: ``(..., H, W)`` DCT-II coefficients.
        idct_h: ``dct_matrix(H, inverse=True)``, or ``None`` to build it here.
        idct_w: ``dct_matrix(W, inverse=True)``, or ``None`` to build it here.

    Shape:
        ``(..., H, W)``.

    Returns:
        the map whose :func:`dct_2d` is ``coefficients``.

    Example:
        >>> x = torch.arange(6.0).reshape(1, 2, 3)
        >>> torch.allclose(idct_2d(dct_2d(x)), x, atol=1e-5)
        True
    """
    if not torch.is_tensor(coefficients) or coefficients.ndim < 2:
        raise ValueError(f"idct_2d expects a tensor (..., H, W), got {shape_of(coefficients)}.")
    ih, iw = _axis_matrices(coefficients, idct_h, idct_w, True, "idct_2d")
    with autocast_off(coefficients):  # in float32, as dct_2d
        return ih @ at_least_float32(coefficients) @ iw.T


def remove_dc(
    x: Tensor,
    dct_h: Tensor | None = None,
    dct_w: Tensor | None = None,
    idct_h: Tensor | None = None,
    idct_w: Tensor | None = None,
) -> Tensor:
    """ScaleKD's alternative view: zero the direct (DC) coefficient of every channel's 2-D DCT and invert.

    Because the DC basis function is constant and the others sum to zero over the grid, this equals
    subtracting each channel's spatial mean (the paper's reading: the view without the dominant mean
    response); it is computed here through the DCT, as the official ``get_freq_loss``.

    Args:
        x: ``(N, C, H, W)`` (any ``(..., H, W)``).
        dct_h: ``dct_matrix(H)`` or ``None``.
        dct_w: ``dct_matrix(W)`` or ``None``.
        idct_h: ``dct_matrix(H, inverse=True)`` or ``None``.
        idct_w: ``dct_matrix(W, inverse=True)`` or ``None``.

    Shape:
        the shape of ``x``.

    Returns:
        ``iDCT(DCT(x) with [..., 0, 0] = 0)``, in at least float32.

    Example:
        >>> x = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])
        >>> remove_dc(x).round(decimals=4)  # the mean, 3, subtracted
        tensor([[[-2., -1.],
                 [ 0.,  3.]]])
    """
    coefficients = dct_2d(x, dct_h, dct_w)
    # zero the DC coefficient without an in-place write (the official code writes in place)
    keep = torch.ones(coefficients.shape[-2:], dtype=coefficients.dtype, device=coefficients.device)
    keep[0, 0] = 0
    return idct_2d(coefficients * keep, idct_h, idct_w)


def _check_maps(who: str, student: Tensor, teacher: Tensor) -> None:
    for side, x in (("student", student), ("teacher", teacher)):
        if not torch.is_tensor(x) or x.ndim != 4 or x.numel() == 0:
            raise ValueError(f"{who} expects non-empty (N, C, H, W) {side} maps, got {shape_of(x)}.")
    if student.shape != teacher.shape:
        raise ValueError(
            f"{who}: the projected student map {tuple(student.shape)} and the teacher map "
            f"{tuple(teacher.shape)} must have the same shape (the CAP gives the teacher's channels and grid)."
        )


def dfm_loss(student: Tensor, teacher: Tensor, *, alpha: float = 0.08) -> Tensor:
    """The direct view of dual-view feature mimicking: ``alpha * sum((n(S) - n(T))^2) / N``.

    ``n`` L2-normalises every position's channel vector (``F.normalize(x, dim=1)``); the squared error is
    summed over channels and positions and divided by the batch size only, as the official
    ``get_spat_loss`` (``MSELoss(reduction="sum") / N``).

    Fan, Li, Liu & Yao, "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers", NeurIPS 2024,
    arXiv:2411.06786; deep-optimization/ScaleKD ``mmcls/models/dis_losses/fmdv2.py`` (478a7db).

    Args:
        student: the projected student map (the CAP's output, or its image through the teacher's stages).
        teacher: the teacher's final map.
        alpha: the coefficient (0.08 in every released config).

    Shape:
        both ``(N, C, H, W)``, the same shape.

    Returns:
        0-dim loss (``alpha`` included), in at least float32.

    Example:
        >>> s = torch.tensor([[[[1.0]], [[0.0]]]])  # one position, channel vector (1, 0)
        >>> t = torch.tensor([[[[0.0]], [[2.0]]]])  # normalised: (0, 1)
        >>> dfm_loss(s, t, alpha=1.0).item()  # (1 - 0)^2 + (0 - 1)^2
        2.0
    """
    who = "dfm_loss"
    a = check_non_negative(who, "alpha", alpha)
    _check_maps(who, student, teacher)
    s = F.normalize(at_least_float32(student), dim=1)
    t = F.normalize(at_least_float32(teacher), dim=1)
    return a * (s - t).pow(2).sum() / student.shape[0]


def dfm_dc_removed_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    alpha: float = 0.06,
    dct_h: Tensor | None = None,
    dct_w: Tensor | None = None,
    idct_h: Tensor | None = None,
    idct_w: Tensor | None = None,
) -> Tensor:
    """The alternative view of dual-view feature mimicking: :func:`dfm_loss` after :func:`remove_dc`.

    ``alpha * sum((n(R(S)) - n(R(T)))^2) / N`` with ``R`` the DC removal of both maps (the official
    ``get_freq_loss``), ``n`` the channel-wise L2 normalisation.

    Args:
        student: the projected student map.
        teacher: the teacher's final map.
        alpha: the coefficient (0.06 in the released configs; 0 at stage 4 of Swin-S -> ResNet-50).
        dct_h: ``dct_matrix(H)`` or ``None`` (built here).
        dct_w: ``dct_matrix(W)`` or ``None``.
        idct_h: ``dct_matrix(H, inverse=True)`` or ``None``.
        idct_w: ``dct_matrix(W, inverse=True)`` or ``None``.

    Shape:
        both ``(N, C, H, W)``, the same shape (``H != W`` allowed).

    Returns:
        0-dim loss (``alpha`` included), in at least float32.

    Example:
        >>> s = torch.randn(2, 3, 4, 5)
        >>> dfm_dc_removed_loss(s, s + 7.0).item() < 1e-9  # a constant shift changes the DC only
        True
    """
    who = "dfm_dc_removed_loss"
    a = check_non_negative(who, "alpha", alpha)
    _check_maps(who, student, teacher)
    s = remove_dc(student, dct_h, dct_w, idct_h, idct_w)
    t = remove_dc(teacher, dct_h, dct_w, idct_h, idct_w)
    return dfm_loss(s, t, alpha=a)


def scalekd_logit_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """ScaleKD's logit term: ``-alpha * T^2 * mean_n sum_c p_t log p_s`` with ``p = softmax(z / T)``.

    The soft-target cross-entropy of the official ``kd.py`` ``KDLoss`` (T = 1, alpha = 0.5); it equals
    ``alpha * T^2 * KL(p_t || p_s)`` plus the teacher's entropy, which has no gradient. ``log p_s`` is
    computed with ``log_softmax`` (the official ``log(softmax)`` gives ``-inf`` for a far-off class).

    Args:
        student_logits: ``(N, K)``.
        teacher_logits: ``(N, K)``.
        alpha: the coefficient (0.5; the official code also scales the student's CE by ``1 - alpha``).
        temperature: T (1 in every released config).

    Shape:
        ``(N, K)`` both.

    Returns:
        0-dim loss.

    Example:
        >>> z = torch.zeros(1, 4)
        >>> round(scalekd_logit_loss(z, z, alpha=1.0).item(), 4)  # the entropy of a uniform 4-way, log 4
        1.3863
    """
    who = "scalekd_logit_loss"
    a = check_non_negative(who, "alpha", alpha)
    temp = check_positive(who, "temperature", temperature)
    if (
        not torch.is_tensor(student_logits)
        or not torch.is_tensor(teacher_logits)
        or student_logits.ndim != 2
        or student_logits.shape != teacher_logits.shape
    ):
        raise ValueError(
            f"{who} expects student and teacher logits of the same shape (N, K), got {shape_of(student_logits)} "
            f"and {shape_of(teacher_logits)}."
        )
    log_p_s = F.log_softmax(at_least_float32(student_logits) / temp, dim=1)
    p_t = F.softmax(at_least_float32(teacher_logits) / temp, dim=1)
    return -a * temp**2 * (p_t * log_p_s).sum(dim=1).mean()


def check_alpha_pair(who: str, key: str, alpha: Sequence[float]) -> ScaleKDAlpha:
    if isinstance(alpha, str) or not isinstance(alpha, Sequence) or len(alpha) != 2:
        raise ValueError(
            f"{who}: {key} must be two numbers (direct view, DC-removed view), e.g. (0.08, 0.06), got {alpha!r}."
        )
    return (check_non_negative(who, f"{key}[0]", alpha[0]), check_non_negative(who, f"{key}[1]", alpha[1]))


def scalekd_terms(
    student_s3: Tensor,
    student_s4: Tensor,
    teacher: Tensor,
    *,
    cap_s3: Callable[[Tensor], Tensor],
    cap_s3_alt: Callable[[Tensor], Tensor],
    cap_s4: Callable[[Tensor, Tensor], Tensor],
    cap_s4_alt: Callable[[Tensor, Tensor], Tensor],
    teacher_stage: Callable[[Tensor], Tensor],
    alpha_s3: Sequence[float] = (0.08, 0.06),
    alpha_s4: Sequence[float] = (0.08, 0.06),
    student_logits: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    kd_alpha: float = 0.5,
    temperature: float = 1.0,
    dct_h: Tensor | None = None,
    dct_w: Tensor | None = None,
    idct_h: Tensor | None = None,
    idct_w: Tensor | None = None,
) -> dict[str, Tensor]:
    """ScaleKD's terms: stage-3 features through the teacher's later stages, stage-4 features queried by them.

    Fan, Li, Liu & Yao, "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers", NeurIPS 2024,
    arXiv:2411.06786; deep-optimization/ScaleKD ``mmcls/models/classifiers/distiller.py``
    ``ClassificationDistiller.loss`` (478a7db). For each view ``v`` (direct, DC-removed), each with its own
    cross-attention projectors (CAPs):

    - teacher parameter perception: ``q_v = teacher_stage(cap_s3_v(S3))``, the student's stage-3 map
      projected to the teacher's stage-3 width and grid, then run through the frozen teacher's later
      stage(s) (with autograd on, so gradients reach the CAP and the student);
      ``s3_v = DFM_v(q_v, T)``;
    - ``s4_v = DFM_v(cap_s4_v(S4, q_v), T)``: the stage-4 CAP's queries are ``q_v``;
    - ``kd = scalekd_logit_loss(z_s, z_t)`` when both logits are given.

    ``DFM_direct`` is :func:`dfm_loss`, ``DFM_alt`` :func:`dfm_dc_removed_loss`, ``T`` the teacher's final
    map.

    Args:
        student_s3: the student's stage-3 map.
        student_s4: the student's stage-4 map.
        teacher: the teacher's final map.
        cap_s3: direct-view stage-3 CAP, ``map -> (N, C_t3, H_q, W_q)`` map (self-query).
        cap_s3_alt: DC-removed-view stage-3 CAP.
        cap_s4: direct-view stage-4 CAP, ``(map, query map) -> (N, C_t, H_t, W_t)`` map.
        cap_s4_alt: DC-removed-view stage-4 CAP.
        teacher_stage: the teacher's later stage(s) as a map-to-map function
            ``(N, C_t3, H_q, W_q) -> (N, C_t, H_t, W_t)``.
        alpha_s3: stage-3 ``(direct, DC-removed)`` coefficients (0.08, 0.06).
        alpha_s4: stage-4 coefficients (0.08, 0.06; (0.08, 0) for Swin-S -> ResNet-50).
        student_logits: ``(N, K)`` or ``None`` (no ``kd`` term).
        teacher_logits: ``(N, K)`` or ``None``.
        kd_alpha: the logit term's coefficient (0.5).
        temperature: the logit term's temperature (1).
        dct_h: see :func:`dfm_dc_removed_loss` (for the teacher's grid).
        dct_w: see :func:`dfm_dc_removed_loss`.
        idct_h: see :func:`dfm_dc_removed_loss`.
        idct_w: see :func:`dfm_dc_removed_loss`.

    Shape:
        ``student_s3 (N, C_s3, H_3, W_3)``, ``student_s4 (N, C_s4, H_4, W_4)``, ``teacher (N, C_t, H_t, W_t)``.

    Returns:
        ``{"s3", "s3_alt", "s4", "s4_alt"}`` and ``"kd"`` when logits are given: 0-dim losses, each with
        its coefficient.

    Example:
        >>> s3, s4, t = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2), torch.randn(2, 8, 2, 2)
        >>> up = lambda x: x.repeat(1, 2, 1, 1)[:, :, ::2, ::2]  # 4 -> 8 channels, 4x4 -> 2x2
        >>> terms = scalekd_terms(s3, s4, t, cap_s3=up, cap_s3_alt=up, cap_s4=lambda x, q: q,
        ...                       cap_s4_alt=lambda x, q: q, teacher_stage=lambda x: x)
        >>> list(terms), bool(torch.equal(terms["s3"], terms["s4"]))
        (['s3', 's3_alt', 's4', 's4_alt'], True)
    """
    who = "scalekd_terms"
    a3 = check_alpha_pair(who, "alpha_s3", alpha_s3)
    a4 = check_alpha_pair(who, "alpha_s4", alpha_s4)
    if (student_logits is None) != (teacher_logits is None):
        raise ValueError(f"{who}: give both student_logits and teacher_logits (the kd term) or neither.")
    for side, x in (("student_s3", student_s3), ("student_s4", student_s4), ("teacher", teacher)):
        if not torch.is_tensor(x) or x.ndim != 4:
            raise ValueError(f"{who} expects a (N, C, H, W) map for {side}, got {shape_of(x)}.")
    dct = {"dct_h": dct_h, "dct_w": dct_w, "idct_h": idct_h, "idct_w": idct_w}
    # teacher parameter perception: the CAP's output goes through the teacher's own later stage(s)
    query = teacher_stage(cap_s3(student_s3))
    query_alt = teacher_stage(cap_s3_alt(student_s3))
    terms = {
        "s3": dfm_loss(query, teacher, alpha=a3[0]),
        "s3_alt": dfm_dc_removed_loss(query_alt, teacher, alpha=a3[1], **dct),
        "s4": dfm_loss(cap_s4(student_s4, query), teacher, alpha=a4[0]),
        "s4_alt": dfm_dc_removed_loss(cap_s4_alt(student_s4, query_alt), teacher, alpha=a4[1], **dct),
    }
    if student_logits is not None:
        terms["kd"] = scalekd_logit_loss(
            student_logits, teacher_logits, alpha=kd_alpha, temperature=temperature
        )
    return terms
