"""Label maps of dense-prediction distillers, brought to the resolution of the logits or features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of ``(N, H, W)`` labels to ``size`` (as the authors: ``F.interpolate``
    of the float labels, ``mode="nearest"``, i.e. source index ``floor(i * H / h)``); a no-op at that size.

    Example:
        >>> import torch
        >>> resize_labels(torch.arange(16).reshape(1, 4, 4), (2, 2))
        tensor([[[ 0,  2],
                 [ 8, 10]]])
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    small = F.interpolate(labels.unsqueeze(1).float(), size=tuple(size), mode="nearest")
    return small.squeeze(1).to(labels.dtype)
