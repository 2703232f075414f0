"""Tiny models and data shared by the tests (fast on a CPU)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightningkd.models import load_weights


def toy_classifier(
    num_classes: int = 4, width: int = 8, seed: int = 0, checkpoint: str | None = None
) -> nn.Module:
    """conv-bn-relu ("stem") -> conv ("block") -> global pool ("pool") -> linear ("fc").

    ``checkpoint`` loads weights as the library's model builders do (``lightningkd.models.load_weights``).
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
            block=nn.Sequential(nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU()),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(width, num_classes),
        )
    )
    return model if checkpoint is None else load_weights(model, checkpoint)


def toy_loader(
    n: int = 16, num_classes: int = 4, size: int = 8, batch_size: int = 8, seed: int = 0
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)
