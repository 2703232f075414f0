"""Spatial resampling between feature maps of different strides."""

from __future__ import annotations

import math
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lightningkd.functional._helpers import check_choice, check_positive_int, shape_of

ResampleMode = Literal["bilinear", "nearest", "bicubic", "area"]
MODES = ("bilinear", "nearest", "bicubic", "area")


def resample_to(x: Tensor, size: tuple[int, int], mode: ResampleMode = "bilinear") -> Tensor:
    """Resize a ``(N, C, H, W)`` map to ``size`` (a no-op at that size).

    ``"area"`` averages over the covered input cells (adaptive average pooling when shrinking), the other
    modes are :func:`torch.nn.functional.interpolate`'s with ``align_corners=False``.

    Example:
        >>> import torch
        >>> resample_to(torch.ones(1, 2, 7, 7), (4, 4), mode="area").shape
        torch.Size([1, 2, 4, 4])
    """
    check_choice("resample_to", "mode", mode, MODES)
    if x.ndim != 4:
        raise ValueError(
            f"resample_to expects a (N, C, H, W) map, got {shape_of(x)}; convert tokens with "
            "lightningkd.adapters.TokensToMap first."
        )
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        return F.adaptive_avg_pool2d(x, size)
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=size, mode=mode, align_corners=align)


class Resample(nn.Module):
    """Resize a map taken at stride ``in_stride`` to the grid of a stage at stride ``out_stride``.

    The output side is ``ceil(side * in_stride / out_stride)``, the size a stride-2 stage with padding
    (ResNet, ConvNeXt downsampling, Swin's patch merging on a padded grid) gives at each halving: e.g. a
    CNN's stride-8 map of a 224 input (28x28) resampled to a transformer's stride-16 grid gives 14x14, and
    a 7x7 map to stride x2 gives 4x4.

    Args:
        in_stride: stride of the input map with respect to the image.
        out_stride: stride of the stage to match.
        mode: ``"bilinear"`` (default), ``"nearest"``, ``"bicubic"`` or ``"area"`` (average pooling;
            the usual choice when shrinking).

    Example:
        >>> import torch
        >>> Resample(in_stride=8, out_stride=16)(torch.zeros(2, 4, 28, 28)).shape
        torch.Size([2, 4, 14, 14])
        >>> Resample(in_stride=32, out_stride=16)(torch.zeros(2, 4, 7, 7)).shape
        torch.Size([2, 4, 14, 14])
    """

    def __init__(self, in_stride: int, out_stride: int, mode: ResampleMode = "bilinear") -> None:
        super().__init__()
        self.in_stride = check_positive_int("Resample", "in_stride", in_stride)
        self.out_stride = check_positive_int("Resample", "out_stride", out_stride)
        self.mode = check_choice("Resample", "mode", mode, MODES)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The resampled ``(H, W)`` for an input of ``size``."""
        return tuple(math.ceil(s * self.in_stride / self.out_stride) for s in size)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(
                f"Resample expects a (N, C, H, W) map, got {shape_of(x)}; convert tokens with "
                "lightningkd.adapters.TokensToMap first."
            )
        return resample_to(x, self.output_size(tuple(x.shape[-2:])), self.mode)

    def extra_repr(self) -> str:
        return f"in_stride={self.in_stride}, out_stride={self.out_stride}, mode={self.mode!r}"
