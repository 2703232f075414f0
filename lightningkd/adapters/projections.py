"""Learnable channel projections that map student features onto the teacher's channels.

They are created by distillers from explicit sizes (never lazily), so they are trained, checkpointed and
moved to the device with the distiller.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightningkd.functional._helpers import check_positive_int, shape_of


class ConvAdapter(nn.Sequential):
    """``kernel_size`` convolution + BatchNorm (+ optional ReLU) from ``in_channels`` to ``out_channels``.

    This is the FitNets regressor in the form most CNN KD code uses (e.g. mdistiller's ``ConvReg``).

    Example:
        >>> import torch
        >>> ConvAdapter(8, 16)(torch.zeros(2, 8, 4, 4)).shape
        torch.Size([2, 16, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, relu: bool = False) -> None:
        for key, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("kernel_size", kernel_size),
        ):
            check_positive_int("ConvAdapter", key, value)
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
        check_positive_int("LinearAdapter", "in_features", in_features)
        check_positive_int("LinearAdapter", "out_features", out_features)
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.proj.in_features:
            raise ValueError(
                f"LinearAdapter expects features whose last size is {self.proj.in_features}, got {tuple(x.shape)}."
            )
        return self.proj(x)


class ChannelProjection(nn.Module):
    """A linear map on the channel axis of a ``(N, C, H, W)`` map or of ``(N, L, C)`` tokens.

    The same weights serve both layouts (on a map it is a 1x1 convolution), so one projection fits a
    teacher read as a map or as tokens, e.g. the per-stage embedding projection of TransKD.

    Args:
        in_channels: channels of the input (``C``).
        out_channels: channels of the output.
        bias: learn an additive bias.

    Shape:
        ``(N, in_channels, H, W)`` -> ``(N, out_channels, H, W)``; ``(N, L, in_channels)`` ->
        ``(N, L, out_channels)``.

    Example:
        >>> import torch
        >>> proj = ChannelProjection(8, 16)
        >>> proj(torch.zeros(2, 8, 3, 3)).shape, proj(torch.zeros(2, 9, 8)).shape
        (torch.Size([2, 16, 3, 3]), torch.Size([2, 9, 16]))
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        check_positive_int("ChannelProjection", "in_channels", in_channels)
        check_positive_int("ChannelProjection", "out_channels", out_channels)
        self.proj = nn.Linear(in_channels, out_channels, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        c = self.proj.in_features
        if x.ndim == 3 and x.shape[-1] == c:
            return self.proj(x)
        if x.ndim == 4 and x.shape[1] == c:
            return self.proj(x.movedim(1, -1)).movedim(-1, 1)
        raise ValueError(
            f"ChannelProjection expects (N, {c}, H, W) maps or (N, L, {c}) tokens, got {shape_of(x)}; "
            "a Swin stage's (N, H, W, C) output goes through lightningkd.adapters.TokensToMap(layout='nhwc') "
            "first."
        )
