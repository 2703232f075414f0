"""Input conversion for a teacher trained with other normalisation statistics or another resolution."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Renormalize(nn.Module):
    """Undo the student's input normalisation, apply the teacher's, and optionally resize.

    ``x_teacher = ((x * source_std + source_mean) - target_mean) / target_std``

    Args:
        source_mean, source_std: per-channel statistics the data pipeline normalised with.
        target_mean, target_std: per-channel statistics the teacher expects.
        size: optional ``(H, W)`` (or one int) the teacher expects; bilinear resize.
        scale: optional factor applied to the input's height and width instead (e.g. 2.0 for a dense
            teacher trained at twice the student's resolution); bilinear resize.

    Example:
        >>> import torch
        >>> r = Renormalize([0.5], [0.5], [0.0], [1.0])
        >>> r(torch.tensor([[[[1.0]]]])).item()
        1.0
    """

    def __init__(
        self,
        source_mean: Sequence[float],
        source_std: Sequence[float],
        target_mean: Sequence[float],
        target_std: Sequence[float],
        size: int | Sequence[int] | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        lengths = {len(source_mean), len(source_std), len(target_mean), len(target_std)}
        if len(lengths) != 1:
            raise ValueError("source_mean, source_std, target_mean and target_std must have the same length.")
        if any(s <= 0 for s in list(source_std) + list(target_std)):
            raise ValueError("Standard deviations must be positive.")
        if size is not None and scale is not None:
            raise ValueError("Give size or scale, not both.")
        if scale is not None and scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        src_mean, src_std = _stat(source_mean), _stat(source_std)
        tgt_mean, tgt_std = _stat(target_mean), _stat(target_std)
        # one affine map: x * scale + shift (buffers are not persistent: they come from the recipe)
        self.register_buffer("scale", src_std / tgt_std, persistent=False)
        self.register_buffer("shift", (src_mean - tgt_mean) / tgt_std, persistent=False)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        self.scale_factor = scale

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        elif self.scale_factor is not None and self.scale_factor != 1.0:
            size = [max(1, round(s * self.scale_factor)) for s in x.shape[-2:]]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


def _stat(values: Sequence[float]) -> Tensor:
    return torch.tensor(list(values), dtype=torch.float32).view(1, -1, 1, 1)
