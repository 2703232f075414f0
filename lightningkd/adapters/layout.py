"""Token <-> map conversions between transformer and CNN features (no learnable parameters).

A vision transformer's blocks return tokens ``(N, L, C)``: ``prefix_tokens`` class/distillation tokens
followed by the ``H x W`` patch grid in row-major order (timm's ViT and DeiT, mmseg's MiT). timm's Swin
stages return ``(N, H, W, C)``. CNN stages return maps ``(N, C, H, W)``. Feature distillers compare maps,
so a transformer's features go through :class:`TokensToMap` first; a CNN's map goes the other way with
:class:`MapToTokens`.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

from lightningkd.functional._helpers import check_choice, shape_of

TokenLayout = Literal["tokens", "nhwc"]
LAYOUTS = ("tokens", "nhwc")


def _check_grid(who: str, grid: tuple[int, int] | None) -> tuple[int, int] | None:
    if grid is None:
        return None
    grid = tuple(grid)
    if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g <= 0 for g in grid):
        raise ValueError(f"{who}: grid must be two positive integers (H, W), got {grid!r}.")
    return grid


def _check_prefix(who: str, prefix_tokens: int) -> int:
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise ValueError(
            f"{who}: prefix_tokens must be an integer >= 0 (1 for a ViT's class token, 2 for a distilled "
            f"DeiT, 0 for Swin/MiT), got {prefix_tokens!r}."
        )
    return prefix_tokens


def tokens_to_map(
    x: Tensor,
    *,
    prefix_tokens: int = 0,
    grid: tuple[int, int] | None = None,
    layout: TokenLayout = "tokens",
) -> Tensor:
    """Turn transformer tokens into a ``(N, C, H, W)`` map.

    Args:
        x: ``(N, L, C)`` tokens (``layout="tokens"``) or an ``(N, H, W, C)`` map (``layout="nhwc"``,
            timm's Swin stages).
        prefix_tokens: tokens before the patch grid, dropped (a ViT's class token: 1; a distilled DeiT's
            class and distillation tokens: 2; Swin and SegFormer: 0). ``lightningkd layers`` prints the
            count of timm models. Only for ``layout="tokens"``.
        grid: the patch grid ``(H, W)``; ``None`` for a square grid. Non-square inputs (e.g. 128x160
            crops) need it. Only for ``layout="tokens"``.
        layout: ``"tokens"`` or ``"nhwc"``.

    Returns:
        ``(N, C, H, W)``, contiguous.

    Raises:
        ValueError: the token count does not fit ``prefix_tokens`` and ``grid`` (the counts are named),
            or the tensor has the wrong number of dimensions for ``layout``.

    Example:
        >>> import torch
        >>> tokens = torch.arange(2 * 5 * 3.0).reshape(2, 5, 3)  # 1 class token + 2x2 grid, 3 channels
        >>> m = tokens_to_map(tokens, prefix_tokens=1)
        >>> m.shape, m[0, :, 0, 0].tolist() == tokens[0, 1].tolist()
        (torch.Size([2, 3, 2, 2]), True)
    """
    who = "tokens_to_map"
    check_choice(who, "layout", layout, LAYOUTS)
    if layout == "nhwc":
        if x.ndim != 4:
            raise ValueError(f"{who}: layout='nhwc' expects (N, H, W, C), got {shape_of(x)}.")
        if prefix_tokens or grid is not None:
            raise ValueError(f"{who}: prefix_tokens and grid apply to layout='tokens' only.")
        return x.permute(0, 3, 1, 2).contiguous()
    prefix_tokens = _check_prefix(who, prefix_tokens)
    grid = _check_grid(who, grid)
    if x.ndim != 3:
        hint = " (a CNN map needs no conversion)" if x.ndim == 4 else ""
        raise ValueError(f"{who}: expects (N, L, C) tokens, got {shape_of(x)}{hint}.")
    n, length, channels = x.shape
    patches = length - prefix_tokens
    if grid is None:
        side = math.isqrt(max(patches, 0))
        if patches <= 0 or side * side != patches:
            raise ValueError(
                f"{who}: {length} tokens minus prefix_tokens={prefix_tokens} leaves {patches}, not a square "
                "grid. Set prefix_tokens to the model's class/distillation token count, or grid=(H, W) for "
                "a non-square input."
            )
        grid = (side, side)
    elif patches != grid[0] * grid[1]:
        extra = length - grid[0] * grid[1]
        guess = f" The model seems to have {extra} prefix token(s)." if extra >= 0 else ""
        raise ValueError(
            f"{who}: {length} tokens do not fit prefix_tokens={prefix_tokens} + a {grid[0]}x{grid[1]} grid "
            f"({prefix_tokens + grid[0] * grid[1]} tokens).{guess} Set prefix_tokens (and grid) to the "
            "model's."
        )
    return x[:, prefix_tokens:].transpose(1, 2).reshape(n, channels, *grid).contiguous()


def map_to_tokens(x: Tensor) -> Tensor:
    """Turn a ``(N, C, H, W)`` map into ``(N, H*W, C)`` tokens in row-major grid order.

    Example:
        >>> import torch
        >>> map_to_tokens(torch.zeros(2, 8, 3, 4)).shape
        torch.Size([2, 12, 8])
    """
    if x.ndim != 4:
        hint = " (already tokens?)" if x.ndim == 3 else ""
        raise ValueError(f"map_to_tokens: expects a (N, C, H, W) map, got {shape_of(x)}{hint}.")
    return x.flatten(2).transpose(1, 2)


class TokensToMap(nn.Module):
    """Module form of :func:`tokens_to_map` (no parameters), for distillers and recipes.

    Args:
        prefix_tokens: class/distillation tokens before the patch grid (named, never guessed).
        grid: the patch grid ``(H, W)``; ``None`` for square.
        layout: ``"tokens"`` for ``(N, L, C)``, ``"nhwc"`` for timm Swin's ``(N, H, W, C)``.

    Example:
        >>> import torch
        >>> TokensToMap(prefix_tokens=2, grid=(2, 3))(torch.zeros(4, 8, 16)).shape
        torch.Size([4, 16, 2, 3])
    """

    def __init__(
        self, prefix_tokens: int = 0, grid: tuple[int, int] | None = None, layout: TokenLayout = "tokens"
    ) -> None:
        super().__init__()
        check_choice("TokensToMap", "layout", layout, LAYOUTS)
        self.prefix_tokens = _check_prefix("TokensToMap", prefix_tokens)
        self.grid = _check_grid("TokensToMap", grid)
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return tokens_to_map(x, prefix_tokens=self.prefix_tokens, grid=self.grid, layout=self.layout)

    def extra_repr(self) -> str:
        return f"prefix_tokens={self.prefix_tokens}, grid={self.grid}, layout={self.layout!r}"


class MapToTokens(nn.Module):
    """Module form of :func:`map_to_tokens`: ``(N, C, H, W)`` -> ``(N, H*W, C)``.

    Example:
        >>> import torch
        >>> MapToTokens()(torch.zeros(1, 4, 2, 2)).shape
        torch.Size([1, 4, 4])
    """

    def forward(self, x: Tensor) -> Tensor:
        return map_to_tokens(x)
