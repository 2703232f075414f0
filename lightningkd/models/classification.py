"""Build torchvision and timm classifiers by name (no model zoo of our own)."""

from __future__ import annotations

import difflib

import timm
import torchvision
from torch import nn

from lightningkd.models.weights import load_weights


def classifier(
    name: str,
    num_classes: int = 1000,
    checkpoint: str | None = None,
    small_input: bool = False,
    library: str = "auto",
) -> nn.Module:
    """Build a classifier from torchvision or timm, without downloading anything.

    Args:
        name: a torchvision model name (``resnet18``, ``mobilenet_v3_small``, ...) or a timm one
            (``resnet18d``, ``vit_tiny_patch16_224``, ...). With ``library="auto"`` torchvision is tried
            first.
        num_classes: size of the classification head.
        checkpoint: optional local file with weights (plain state_dict or a lightningkd checkpoint).
        small_input: replace the stem for 32x32 images (CIFAR): the first convolution becomes 3x3 with
            stride 1 and the first max-pool is removed, as in the CIFAR ResNets of He et al. 2016.
        library: ``"auto"``, ``"torchvision"`` or ``"timm"``.

    Returns:
        The model, in train mode.

    Example:
        >>> import torch
        >>> net = classifier("resnet18", num_classes=10, small_input=True)
        >>> net(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    if library not in ("auto", "torchvision", "timm"):
        raise ValueError(f"library must be 'auto', 'torchvision' or 'timm', got {library!r}.")
    tv_names = set(torchvision.models.list_models(module=torchvision.models))
    if library in ("auto", "torchvision") and name in tv_names:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    elif library in ("auto", "timm") and timm.is_model(name):
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    else:
        close = difflib.get_close_matches(name, sorted(tv_names | set(timm.list_models())), n=10, cutoff=0.6)
        raise ValueError(
            f"Unknown classifier {name!r} for library={library!r}. Names are torchvision's "
            f"(torchvision.models.list_models()) or timm's (timm.list_models()). Similar names: {close}"
        )
    if small_input:
        _small_input_stem(model)
    if checkpoint is not None:
        load_weights(
            model,
            checkpoint,
            hint="Check the name, num_classes and small_input against the run that wrote it.",
        )
    return model


def _small_input_stem(model: nn.Module) -> None:
    """Make the stem keep the resolution of 32x32 images: first conv 3x3/1, first max-pool removed."""
    conv_name, conv = next(
        ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None)
    )
    if conv is None:
        raise ValueError(
            f"small_input=True needs a convolutional stem; {type(model).__name__} has no Conv2d."
        )
    stem = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
    _set_module(model, conv_name, stem)
    pool_name = next((n for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)), None)
    if pool_name is not None:
        _set_module(model, pool_name, nn.Identity())


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)
