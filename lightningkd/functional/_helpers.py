"""Shape, label and argument checks and the resizing shared by the losses, the adapters and the distillers.

Private to lightningkd: every check names the caller (``who``) and the offending value, so the messages
read the same whichever method raises them. Imports only torch and the standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ResizeMode = Literal["bilinear", "bicubic", "nearest", "area", "pool"]
"""Modes of :func:`match_spatial`: an :func:`~torch.nn.functional.interpolate` mode, or ``"pool"``."""


# ---- arguments ------------------------------------------------------------------------------------------
def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_positive(who: str, key: str, value: float) -> float:
    """``value`` as a float if it is a number > 0 (temperatures, exponents), else a ValueError.

    Example:
        >>> check_positive("KD", "temperature", 4)
        4.0
    """
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{who}: {key} must be a number > 0, got {value!r}.")
    return float(value)


def check_non_negative(who: str, key: str, value: float) -> float:
    """``value`` as a float if it is a number >= 0 (loss weights), else a ValueError.

    Example:
        >>> check_non_negative("DKD", "beta", 0)
        0.0
    """
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"{who}: {key} must be a number >= 0, got {value!r}.")
    return float(value)


def check_fraction(who: str, key: str, value: float) -> float:
    """``value`` as a float if it is a number in (0, 1] (e.g. a window as a fraction of the map).

    Example:
        >>> check_fraction("SKD", "pool_scale", 0.5)
        0.5
    """
    if not _is_number(value) or not 0 < value <= 1:
        raise ValueError(f"{who}: {key} must be a number in (0, 1], got {value!r}.")
    return float(value)


def check_positive_int(who: str, key: str, value: int) -> int:
    """``value`` if it is an integer > 0 (sizes, channels, class counts), else a ValueError.

    Example:
        >>> check_positive_int("ND", "num_classes", 100)
        100
    """
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{who}: {key} must be a positive integer, got {value!r}.")
    return value


def check_int_at_most(who: str, key: str, value: int, limit: int, what: str) -> int:
    """``value`` if it is an integer in ``[1, limit]``, else a ValueError that says what ``limit`` is.

    Example:
        >>> check_int_at_most("CIRKDMemory", "pixel_contrast_size", 8, 20, "the pixel memory size")
        8
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
        raise ValueError(f"{who}: {key} must be an integer in [1, {limit}] ({what}), got {value!r}.")
    return value


def check_odd_kernel(who: str, key: str, value: int) -> int:
    """``value`` if it is an odd positive integer: a ``k x k`` kernel centred on each pixel.

    Example:
        >>> check_odd_kernel("BPKD", "edge_width", 7)
        7
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(
            f"{who}: {key} must be an odd positive integer (a k x k kernel centred on each pixel keeps the "
            f"size), got {value!r}; e.g. 3 or 7."
        )
    return value


def check_choice(who: str, key: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices`` (the arguments typed as ``Literal``), else a ValueError.

    Example:
        >>> check_choice("AT", "resize", "pool_larger", ("pool_larger", "interpolate_student"))
        'pool_larger'
    """
    if value not in choices:
        raise ValueError(f"{who}: {key} must be one of {tuple(choices)}, got {value!r}.")
    return value


# ---- tensors --------------------------------------------------------------------------------------------
def shape_of(x: object) -> object:
    """The shape of a tensor as a tuple, or the type name of anything else (for error messages).

    Example:
        >>> shape_of(torch.zeros(2, 3)), shape_of([1])
        ((2, 3), 'list')
    """
    return tuple(x.shape) if torch.is_tensor(x) else type(x).__name__


def at_least_float32(x: Tensor) -> Tensor:
    """Half-precision tensors promoted to float32 (softmaxes and squares of fp16/bf16 lose digits or
    overflow); float32 and float64 unchanged.

    Example:
        >>> at_least_float32(torch.zeros(1, dtype=torch.bfloat16)).dtype
        torch.float32
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def autocast_off(x: Tensor) -> torch.autocast:
    """A context that switches autocast off on ``x``'s device, for Gram matrices and other products of
    float32 tensors: autocast would run ``@``, ``bmm``, ``einsum`` and convolutions in the half dtype even
    on float32 inputs (use with :func:`at_least_float32` on the inputs).

    Example:
        >>> x = torch.ones(2, 3)
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), autocast_off(x):
        ...     (x @ x.T).dtype
        torch.float32
    """
    return torch.autocast(x.device.type, enabled=False)


def common_float_dtype(*tensors: Tensor) -> torch.dtype:
    """The common floating dtype of ``tensors``, at least float32.

    Example:
        >>> common_float_dtype(torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.float64))
        torch.float64
    """
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def check_dense_pair(
    who: str, student: Tensor, teacher: Tensor, what: str = "logits"
) -> tuple[Tensor, Tensor]:
    """Check two non-empty ``(N, C, H, W)`` maps with the same N and C (the spatial sizes may differ);
    half precision is promoted to float32.

    Example:
        >>> s, t = check_dense_pair("cwd_loss", torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 8))
        >>> s.shape, t.shape
        (torch.Size([2, 3, 4, 4]), torch.Size([2, 3, 8, 8]))
    """
    if (
        not torch.is_tensor(student)
        or not torch.is_tensor(teacher)
        or student.ndim != 4
        or teacher.ndim != 4
        or student.shape[:2] != teacher.shape[:2]
        or student.numel() == 0
        or teacher.numel() == 0
    ):
        raise ValueError(
            f"{who}: student {what} {shape_of(student)} and teacher {what} {shape_of(teacher)} must be "
            "non-empty (N, C, H, W) maps with the same N and C (the spatial sizes may differ: the teacher is "
            "resized to the student's)."
        )
    return at_least_float32(student), at_least_float32(teacher)


def token_map_mismatch(who: str, student: object, teacher: object) -> str | None:
    """A message naming both shapes and the adapter to use when one side is tokens and the other a map.

    Returns ``None`` when both have the same number of dimensions (or either is not a tensor).

    Example:
        >>> print(token_map_mismatch("FitNet", torch.zeros(2, 8, 4, 4), torch.zeros(2, 17, 8)))  # doctest: +ELLIPSIS
        FitNet: the student gives a (N, C, H, W) map (2, 8, 4, 4) and the teacher (N, L, C) tokens ...
    """
    dims = (getattr(student, "ndim", None), getattr(teacher, "ndim", None))
    if None in dims or dims[0] == dims[1] or set(dims) != {3, 4}:
        return None
    side = "teacher" if dims[1] == 3 else "student"
    other = "student" if side == "teacher" else "teacher"
    tokens, grid = (teacher, student) if side == "teacher" else (student, teacher)
    h, w = grid.shape[-2:]
    prefix = tokens.shape[1] - h * w
    guess = f"prefix_tokens={prefix}" if prefix >= 0 else "prefix_tokens=<the model's count>"
    return (
        f"{who}: the {other} gives a (N, C, H, W) map {tuple(grid.shape)} and the {side} (N, L, C) tokens "
        f"{tuple(tokens.shape)}. Convert the tokens to a map first: lightningkd.adapters.TokensToMap("
        f"{guess}, grid=({h}, {w})) (or a distiller made for mixed pairs: OFA, ScaleKD, TransKD); a Swin "
        "stage's (N, H, W, C) output needs TokensToMap(layout='nhwc')."
    )


def check_feature_pair(who: str, student: Tensor, teacher: Tensor) -> None:
    """Check two ``(B, C, H, W)`` feature maps with the same batch and spatial size (channels may differ).

    Example:
        >>> check_feature_pair("cirkd", torch.zeros(2, 4, 3, 3), torch.zeros(2, 8, 3, 3))
    """
    mixed = token_map_mismatch(who, student, teacher)
    if mixed:
        raise ValueError(mixed)
    if student.ndim != 4 or teacher.ndim != 4:
        raise ValueError(
            f"{who} expects (B, C, H, W) feature maps, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}."
        )
    if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(
            f"{who}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features must have "
            "the same batch size and spatial size (only the channels may differ); tap layers at the same "
            "stride."
        )


def check_built_channels(
    who: str, student: Tensor, teacher: Tensor, student_channels: int, teacher_channels: int
) -> None:
    """Check that two ``(N, C, H, W)`` maps have the channel counts a distiller's adapters were built for.

    Example:
        >>> check_built_channels("FGD", torch.zeros(1, 8, 2, 2), torch.zeros(1, 16, 2, 2), 8, 16)
    """
    if student.shape[1] != student_channels or teacher.shape[1] != teacher_channels:
        raise ValueError(
            f"{who} was built for {student_channels} student and {teacher_channels} teacher channels, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}; set channels (teacher) and "
            "student_channels."
        )


# ---- labels ---------------------------------------------------------------------------------------------
def _check_integer(who: str, labels: object, key: str = "labels") -> None:
    if (
        not torch.is_tensor(labels)
        or labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
    ):
        described = labels.dtype if torch.is_tensor(labels) else type(labels).__name__
        raise TypeError(
            f"{who}: {key} must be integer class labels (int64 class indices), got {described}; soft or "
            "one-hot labels are not supported."
        )


def check_class_indices(
    who: str, labels: Tensor, num_samples: int, num_classes: int, key: str = "labels"
) -> None:
    """Fail unless ``labels`` are ``(N,)`` integer class indices in ``[0, num_classes)``.

    Reads the values once (one host-device sync on GPU, where an out-of-range index would otherwise surface
    as an opaque device-side assert inside an indexing kernel).

    Example:
        >>> check_class_indices("DKD", torch.tensor([0, 2]), num_samples=2, num_classes=3)
    """
    _check_integer(who, labels, key)
    if tuple(labels.shape) != (num_samples,):
        raise ValueError(
            f"{who}: {key} {tuple(labels.shape)} must have shape (N,) = ({num_samples},), one class index "
            "per sample."
        )
    if labels.numel() and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(
            f"{who}: {key} values must lie in [0, {num_classes}) for {num_classes} classes, got min "
            f"{int(labels.min())} and max {int(labels.max())}."
        )


def check_segmentation_labels(who: str, labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """Fail unless ``labels`` is an integer ``(N, H, W)`` map with values in ``[0, C)`` or ``ignore_index``.

    Reads the values once (a host-device sync on GPU).

    Example:
        >>> check_segmentation_labels("BPKD", torch.tensor([[[0, 255], [1, 1]]]), 2, 255)
    """
    _check_integer(who, labels)
    if labels.ndim != 3:
        raise ValueError(f"{who} expects labels of shape (N, H, W), got {tuple(labels.shape)}.")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        values = torch.unique(labels[bad])[:10].tolist()
        raise ValueError(
            f"{who}: labels must be class indices in [0, {num_classes}) or ignore_index={ignore_index}, "
            f"found {values}. Check num_classes and the dataset's ignore label."
        )


def check_label_map(who: str, labels: Tensor, num_images: int) -> None:
    """Fail unless ``labels`` is an integer ``(N, H_label, W_label)`` map of ``num_images`` images.

    Example:
        >>> check_label_map("pixel_kd_loss", torch.zeros(2, 8, 8, dtype=torch.long), 2)
    """
    _check_integer(who, labels)
    if labels.ndim != 3 or labels.shape[0] != num_images:
        raise ValueError(
            f"{who}: expected a label map (N, H_label, W_label) with N={num_images} for {num_images} images, "
            f"got {tuple(labels.shape)}: pass the ground-truth label map, not one-hot labels or logits."
        )


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of ``(N, H, W)`` labels to ``size``; a no-op at that size.

    As the authors of CIRKD: ``F.interpolate`` of the float labels, ``mode="nearest"``, i.e. source index
    ``floor(i * H / h)``.

    Example:
        >>> resize_labels(torch.arange(16).reshape(1, 4, 4), (2, 2))
        tensor([[[ 0,  2],
                 [ 8, 10]]])
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    small = F.interpolate(labels.unsqueeze(1).float(), size=tuple(size), mode="nearest")
    return small.squeeze(1).to(labels.dtype)


# ---- resizing -------------------------------------------------------------------------------------------
def match_spatial(x: Tensor, size: tuple[int, int], mode: ResizeMode = "bilinear") -> Tensor:
    """Resize a ``(N, C, H, W)`` map to ``size``; a no-op when it already has that size.

    ``mode="pool"`` uses adaptive average pooling (for shrinking), any other value is passed to
    :func:`torch.nn.functional.interpolate` (``align_corners=False`` for the bilinear and bicubic modes).

    Example:
        >>> match_spatial(torch.ones(1, 2, 4, 4), (2, 2), mode="pool").shape
        torch.Size([1, 2, 2, 2])
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "pool":
        return F.adaptive_avg_pool2d(x, size)
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=size, mode=mode, align_corners=align)


def flatten_embedding(x: Tensor) -> Tensor:
    """Turn a pooled feature ``(N, D)``, ``(N, D, 1, 1)`` or un-pooled ``(N, D, H, W)`` map into ``(N, D)``.

    Un-pooled maps are global-average-pooled (the usual penultimate embedding of a CNN) and ``(N, L, D)``
    tokens are averaged over the tokens.

    Example:
        >>> flatten_embedding(torch.ones(2, 5, 3, 3)).shape
        torch.Size([2, 5])
    """
    if x.ndim == 2:
        return x
    if x.ndim == 4:
        return x.mean(dim=(2, 3)) if x.shape[-2:] != (1, 1) else x.flatten(1)
    if x.ndim == 3:
        return x.mean(dim=1)
    raise ValueError(
        f"Expected an embedding of shape (N, D), (N, D, H, W) or (N, L, D), got {tuple(x.shape)}."
    )
