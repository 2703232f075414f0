"""Build torchvision and timm classifiers by name (no model zoo of our own).

``small_input=True`` adapts a model to 32x32 images (CIFAR). CNNs get the CIFAR stem of He et al. 2016
(first convolution 3x3 stride 1, first max-pool removed). timm's transformers are built for a 32x32 image
with a patch (or stem) size that keeps a useful token grid, following Lee, Lee and Song, "Vision
Transformer for Small-Size Datasets" (arXiv 2112.13492; repository aanna0701/SPT_LSA_ViT,
``models/create_model.py``: ViT patch 4, Swin patch 2 and window 4 on 32x32 images):

=============================  ==============================================  ===============================
timm family                    what ``small_input`` builds                     grid at 32x32
=============================  ==============================================  ===============================
ViT, DeiT (incl. distilled)    ``img_size=32, patch_size=4``                   8x8 = 64 tokens + prefix tokens
Swin (v1)                      ``img_size=32, patch_size=2, window_size=4``    stages 16x16, 8x8, 4x4, 2x2
ConvNeXt                       ``patch_size=1`` (``"overlap"`` stems: both     stages 32x32, 16x16, 8x8, 4x4
                               stem convolutions get stride 1)
=============================  ==============================================  ===============================

Why: a ViT patch of 4 gives 64 tokens, as its 16-pixel patch gives 196 on 224x224 images (a patch of 2
would quadruple the attention cost, a patch of 8 leaves a 4x4 grid). Swin's patch of 2 and window of 4
give windows that tile the first three stage grids; timm shrinks the window of a stage whose grid is
smaller (the 2x2 last stage is one window, without shift). Only the patch and window sizes come from Lee
et al.: the named timm model keeps its stages, depth, widths and MLP ratio (they train smaller models, a
9-block ViT and a 3-stage Swin with MLP ratio 2, with their SPT/LSA modules, which are not used). ConvNeXt: timm makes its first stage downsample when the stem stride is 2, so
the only stem that keeps a last stage larger than 1x1 (stem 4: 8, 4, 2, 1; stem 2: the same) is a
stride-1 stem; its stages then match a CIFAR ResNet's ``layer1``...``layer4`` (32, 16, 8, 4), which lets
feature distillers pair them without resampling.

``model_kwargs`` (given to ``timm.create_model``) override these choices key by key.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torchvision
from torch import nn

from lightningkd.models.weights import load_weights

# timm modules whose models small_input builds for 32x32 images (key: the entrypoint's module name)
_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")
_SWIN_MODULE = "timm.models.swin_transformer"
_CONVNEXT_MODULE = "timm.models.convnext"
SMALL_INPUT_SIZE = 32
# Lee et al. 2021 (arXiv 2112.13492), aanna0701/SPT_LSA_ViT models/create_model.py, 32x32 images
VIT_SMALL_PATCH = 4
SWIN_SMALL_PATCH = 2
SWIN_SMALL_WINDOW = 4
# torchvision transformers whose image size is fixed by their builder (no small-input variant)
_TORCHVISION_TRANSFORMERS = (
    torchvision.models.VisionTransformer,
    torchvision.models.SwinTransformer,
    torchvision.models.MaxVit,
)
# arguments classifier() sets itself: a model_kwargs entry for them would be ambiguous
_RESERVED_KWARGS = (
    "pretrained",
    "num_classes",
    "checkpoint_path",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
)


def classifier(
    name: str,
    num_classes: int = 1000,
    checkpoint: str | None = None,
    small_input: bool = False,
    library: str = "auto",
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a classifier from torchvision or timm, without downloading anything.

    Args:
        name: a torchvision model name (``resnet18``, ``mobilenet_v3_small``, ...) or a timm one
            (``resnet18d``, ``vit_tiny_patch16_224``, ``deit_tiny_distilled_patch16_224``,
            ``swin_tiny_patch4_window7_224``, ...). With ``library="auto"`` torchvision is tried first
            (``convnext_tiny`` is then torchvision's; ``library="timm"`` picks timm's).
        num_classes: size of the classification head.
        checkpoint: optional local file with weights (plain state_dict or a lightningkd checkpoint).
        small_input: adapt the model to 32x32 images (CIFAR). CNNs: the first convolution becomes 3x3
            with stride 1 and the first max-pool is removed, as in the CIFAR ResNets of He et al. 2016.
            timm transformers are built for 32x32 images: ViT/DeiT with 4-pixel patches (8x8 tokens),
            Swin with 2-pixel patches and 4x4 windows (stages 16, 8, 4, 2), ConvNeXt with a stride-1 stem
            (stages 32, 16, 8, 4); the module docstring says why. Other timm transformers (anything
            with a ``patch_embed``) and torchvision's ViT, Swin and MaxViT are refused: give timm's
            ``img_size``/``patch_size`` through ``model_kwargs`` instead.
        library: ``"auto"``, ``"torchvision"`` or ``"timm"``.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (``img_size``, ``patch_size``,
            ``window_size``, ``depth``, ``embed_dim``, ``drop_path_rate`` ...). With ``small_input``
            they override its settings key by key. timm models only.

    Returns:
        The model, in train mode.

    Raises:
        ValueError: unknown name or library, ``model_kwargs`` for a torchvision model or naming an
            argument of this function, or ``small_input`` for a transformer it cannot adapt.
        TypeError: ``model_kwargs`` the timm model does not take.

    Example:
        >>> import torch
        >>> net = classifier("resnet18", num_classes=10, small_input=True)
        >>> net(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
        >>> vit = classifier("vit_tiny_patch16_224", num_classes=10, small_input=True)
        >>> vit.patch_embed.grid_size, vit.num_prefix_tokens
        ((8, 8), 1)
        >>> vit(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    if library not in ("auto", "torchvision", "timm"):
        raise ValueError(f"library must be 'auto', 'torchvision' or 'timm', got {library!r}.")
    tv_names = set(torchvision.models.list_models(module=torchvision.models))
    if library in ("auto", "torchvision") and name in tv_names:
        if model_kwargs:
            timm_hint = (
                " timm has a model of that name too: add library='timm'." if timm.is_model(name) else ""
            )
            raise ValueError(
                f"model_kwargs {sorted(model_kwargs)} go to timm.create_model, but {name!r} is built by "
                f"torchvision (library={library!r}).{timm_hint} Drop model_kwargs for torchvision models."
            )
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if small_input:
            if isinstance(model, _TORCHVISION_TRANSFORMERS):
                raise ValueError(
                    f"small_input=True cannot adapt torchvision's {type(model).__name__} ({name!r}): its "
                    "builder fixes the image and patch size. Use a timm transformer with library='timm' "
                    "(vit_tiny_patch16_224, deit_tiny_patch16_224, swin_tiny_patch4_window7_224 ...)."
                )
            _small_input_stem(model)
    elif library in ("auto", "timm") and timm.is_model(name):
        model = _timm_classifier(name, num_classes, small_input, dict(model_kwargs or {}))
    else:
        close = difflib.get_close_matches(name, sorted(tv_names | set(timm.list_models())), n=10, cutoff=0.6)
        raise ValueError(
            f"Unknown classifier {name!r} for library={library!r}. Names are torchvision's "
            f"(torchvision.models.list_models()) or timm's (timm.list_models()). Similar names: {close}"
        )
    if checkpoint is not None:
        load_weights(
            model,
            checkpoint,
            hint="Check the name, num_classes, small_input and model_kwargs against the run that wrote it.",
        )
    return model


def _timm_classifier(
    name: str, num_classes: int, small_input: bool, model_kwargs: dict[str, Any]
) -> nn.Module:
    """``timm.create_model`` (no weights) with the small-input settings of its family, then ``model_kwargs``."""
    reserved = sorted(set(model_kwargs) & set(_RESERVED_KWARGS))
    if reserved:
        raise ValueError(
            f"model_kwargs may not set {reserved}: classifier() builds without pretrained weights and takes "
            "num_classes and checkpoint as its own arguments."
        )
    family = timm.models.model_entrypoint(name).__module__
    kwargs: dict[str, Any] = {}
    if small_input:
        if family in _VIT_MODULES:
            kwargs = {"img_size": SMALL_INPUT_SIZE, "patch_size": VIT_SMALL_PATCH}
        elif family == _SWIN_MODULE:
            kwargs = {
                "img_size": SMALL_INPUT_SIZE,
                "patch_size": SWIN_SMALL_PATCH,
                "window_size": SWIN_SMALL_WINDOW,
            }
        elif family == _CONVNEXT_MODULE:
            kwargs = {"patch_size": 1}  # used by the "patch" stem; "overlap" stems are changed below
    kwargs.update(model_kwargs)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise TypeError(
            f"timm's {name!r} does not take the keyword arguments {sorted(kwargs)} ({err}). model_kwargs go "
            "to timm.create_model and on to the model class's constructor: check its signature."
        ) from None
    if small_input:
        if family == _CONVNEXT_MODULE:
            if not {"patch_size", "stem_type"} & set(model_kwargs):  # else the stem is the user's choice
                _stride_one_stem(model)
        elif family not in _VIT_MODULES and family != _SWIN_MODULE:
            if hasattr(model, "patch_embed"):
                raise ValueError(
                    f"small_input=True adapts timm's ViT, DeiT, Swin and ConvNeXt models; {name!r} "
                    f"({type(model).__name__}, from {family}) is another transformer. Build it for 32x32 "
                    "images with model_kwargs instead, e.g. {'img_size': 32, 'patch_size': 4}, and "
                    "small_input=False."
                )
            _small_input_stem(model)
    return model


def _stride_one_stem(model: nn.Module) -> None:
    """Give every strided convolution of a ConvNeXt stem stride 1 (timm's "overlap" stems: two 3x3/2)."""
    for conv in model.stem.modules():
        if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1):
            if conv.kernel_size != (3, 3) or conv.padding != (
                1,
                1,
            ):  # a 3x3/1 conv with padding 1 keeps the size
                raise ValueError(
                    f"small_input=True expects ConvNeXt's stem convolutions to be 3x3 with padding 1 or a "
                    f"patch stem; found {conv}. Give the stem settings through model_kwargs instead."
                )
            conv.stride = (1, 1)


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
