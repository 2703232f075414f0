"""Learnable projections that map student features onto the teacher's shape.

They are created by distillers from explicit sizes (never lazily), so they are trained, checkpointed and
moved to the device with the distiller.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ConvAdapter(nn.Sequential):
    """``kernel_size`` convolution + BatchNorm (+ optional ReLU) from ``in_channels`` to ``out_channels``.

    This is the FitNets regressor in the form most CNN KD code uses (e.g. mdistiller's ``ConvReg``).

    Example:
        >>> import torch
        >>> ConvAdapter(8, 16)(torch.zeros(2, 8, 4, 4)).shape
        torch.Size([2, 16, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, relu: bool = False) -> None:
        _check_sizes(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ConvAdapter expects (N, {self.in_channels}, H, W) features, got {tuple(x.shape)}: "
                "check the channel sizes given to the distiller."
            )
        return super().forward(x)


class LinearAdapter(nn.Module):
    """Linear projection of ``(N, in_features)`` or token ``(N, L, in_features)`` features.

    Example:
        >>> import torch
        >>> LinearAdapter(8, 16)(torch.zeros(2, 8)).shape
        torch.Size([2, 16])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        _check_sizes(in_features=in_features, out_features=out_features)
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.proj.in_features:
            raise ValueError(
                f"LinearAdapter expects features whose last size is {self.proj.in_features}, got {tuple(x.shape)}."
            )
        return self.proj(x)


def match_spatial(x: Tensor, size: tuple[int, int], mode: str = "bilinear") -> Tensor:
    """Resize a ``(N, C, H, W)`` map to ``size``; a no-op when it already has that size.

    ``mode="pool"`` uses adaptive average pooling (for shrinking), any other value is passed to
    :func:`torch.nn.functional.interpolate`.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "pool":
        return F.adaptive_avg_pool2d(x, size)
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=size, mode=mode, align_corners=align)


def flatten_embedding(x: Tensor) -> Tensor:
    """Turn a pooled feature ``(N, D)``, ``(N, D, 1, 1)`` or un-pooled ``(N, D, H, W)`` map into ``(N, D)``.

    Un-pooled maps are global-average-pooled, the usual penultimate embedding of a CNN.
    """
    if x.ndim == 2:
        return x
    if x.ndim == 4:
        return x.mean(dim=(2, 3)) if x.shape[-2:] != (1, 1) else x.flatten(1)
    if x.ndim == 3:  # (N, L, D) tokens: average over tokens
        return x.mean(dim=1)
    raise ValueError(
        f"Expected an embedding of shape (N, D), (N, D, H, W) or (N, L, D), got {tuple(x.shape)}."
    )


def _check_sizes(**sizes: int) -> None:
    for key, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}.")
