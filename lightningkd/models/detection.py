"""Build torchvision object detectors (RetinaNet, FCOS, Faster R-CNN with an FPN) by name, offline.

The models are torchvision's own classes, assembled here from a torchvision backbone, torchvision's
``BackboneWithFPN`` and its anchor generators, so torchvision tooling (and ONNX export) works on them and
state_dicts of torchvision's detectors of the same structure load into them.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torchvision
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from lightningkd.models.segmentation import load_backbone_weights
from lightningkd.models.weights import load_weights

ARCHITECTURES = ("retinanet", "fcos", "fasterrcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# trainable_backbone_layers: how many stages (from the last one) train; torchvision's ranges and default
_MAX_TRAINABLE = {"resnet": 5, "mobilenet_v3_large": 6}
_DEFAULT_TRAINABLE = 3
# names the FPN's extra blocks add to the backbone's output
_EXTRA_LEVELS: dict[type, list[str]] = {LastLevelMaxPool: ["pool"], LastLevelP6P7: ["p6", "p7"]}


def detector_names() -> list[str]:
    """The names :func:`detector` builds: ``"{arch}_{backbone}_fpn"``.

    Example:
        >>> detector_names()[:3]
        ['retinanet_resnet18_fpn', 'retinanet_resnet34_fpn', 'retinanet_resnet50_fpn']
    """
    return [f"{arch}_{backbone}_fpn" for arch in ARCHITECTURES for backbone in BACKBONES]


def detector(
    name: str,
    num_classes: int,
    checkpoint: str | None = None,
    backbone_checkpoint: str | None = None,
    trainable_backbone_layers: int | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    image_mean: tuple[float, float, float] | None = None,
    image_std: tuple[float, float, float] | None = None,
    fpn_channels: int = 256,
) -> nn.Module:
    """Build a torchvision RetinaNet, FCOS or Faster R-CNN with an FPN, without downloading anything.

    **num_classes counts the FOREGROUND classes only** (the datamodules' ``num_classes``: labels
    ``1..num_classes``, 0 is the background). torchvision's detectors count the background too, so the
    model is built with ``num_classes + 1`` classes: its classification head has ``num_classes + 1``
    outputs (per anchor), and a torchvision checkpoint trained on COCO's 91 indices needs
    ``num_classes=90``.

    Structure (torchvision's own detectors of these names, with the backbone chosen):

    * ResNet, RetinaNet and FCOS: ``layer2``-``layer4`` feed the FPN, whose extra block ``LastLevelP6P7``
      (from P5) adds two levels: FPN levels ``"0"``, ``"1"``, ``"2"``, ``"p6"``, ``"p7"`` at strides
      8-128. RetinaNet anchors: base size ``32 * 2**i`` at level ``i``, scales ``2**0, 2**(1/3),
      2**(2/3)``, aspect ratios 0.5, 1, 2; FCOS: one anchor per position, of size ``8 * 2**i``.
    * ResNet, Faster R-CNN: ``layer1``-``layer4`` and a max-pool level: ``"0"``-``"3"``, ``"pool"`` at
      strides 4-64; RPN anchors of size ``32 * 2**i`` at level ``i``, aspect ratios 0.5, 1, 2.
    * MobileNetV3-Large, Faster R-CNN: as torchvision's ``fasterrcnn_mobilenet_v3_large_fpn``: the first
      and the last block at stride 32 feed the FPN, plus a max-pool level (``"0"``, ``"1"``, ``"pool"``);
      anchor sizes 32-512 at every level; ``rpn_score_thresh=0.05``.
    * MobileNetV3-Large, RetinaNet and FCOS (no torchvision model of that name): the last block at stride
      8, 16 and 32 (``features.6``, ``features.12``, ``features.16``) feed the FPN, with ``LastLevelP6P7``:
      the same five levels at the same strides as the ResNet models (so a MobileNet student's levels
      pair one to one with a ResNet teacher's), with the same anchors.

    Backbone and normalisation follow torchvision's rule. From scratch (no ``backbone_checkpoint``), the
    backbone has trainable ``BatchNorm2d`` and every layer trains. With ``backbone_checkpoint`` (ImageNet
    weights of the classifier), the backbone has ``FrozenBatchNorm2d`` and only the last
    ``trainable_backbone_layers`` stages train (default 3; ResNet 0-5, MobileNetV3 0-6).

    The model keeps torchvision's ``GeneralizedRCNNTransform`` (resize to ``min_size``/``max_size``,
    normalise with ``image_mean``/``image_std``, pad): it applies when the model is used on its own.
    :class:`~lightningkd.modules.DetectionDistillationModule` bypasses it and feeds both models the
    datamodule's already resized and normalised images (ImageNet statistics, the defaults here), so these
    four settings do not matter there.

    Args:
        name: ``"{arch}_{backbone}_fpn"``, arch ``retinanet``, ``fcos`` or ``fasterrcnn``, backbone
            ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` or ``mobilenet_v3_large``
            (:func:`detector_names`).
        num_classes: number of foreground classes (see above: the head gets ``num_classes + 1``).
        checkpoint: optional local file with the whole detector's weights: a plain state_dict (also a
            torchvision detector's of the same structure) or a lightningkd checkpoint (its ``student.``
            weights). Loaded last, over ``backbone_checkpoint``.
        backbone_checkpoint: optional local file with the weights of the backbone's torchvision classifier
            (e.g. ``resnet50``'s state_dict, or a lightningkd checkpoint of one); its head is ignored,
            every backbone tensor must be found.
        trainable_backbone_layers: with ``backbone_checkpoint``, how many backbone stages (counted from the
            last) train. Without it every layer trains, and only ``None`` or the maximum are accepted.
        min_size: the model's own transform resizes the shorter image side to this.
        max_size: ... and the longer side to at most this.
        image_mean: the model's own transform's normalisation mean (default ImageNet's).
        image_std: the model's own transform's normalisation std (default ImageNet's).
        fpn_channels: channels of every FPN level (and of the heads); a multiple of 32 for FCOS (its head
            has GroupNorm with 32 groups).

    Returns:
        The torchvision ``RetinaNet``, ``FCOS`` or ``FasterRCNN``, in train mode.

    Raises:
        ValueError: an unknown name (the message lists the names and close matches) or an invalid
            argument.
        RuntimeError: ``backbone_checkpoint`` lacks backbone tensors (they are named), or either file
            does not fit the model.

    Example:
        >>> import torch
        >>> net = detector("retinanet_resnet18_fpn", num_classes=3, min_size=64, max_size=64, fpn_channels=64)
        >>> net.head.classification_head.num_classes  # background included
        4
        >>> fpn_levels(net)
        ['0', '1', '2', 'p6', 'p7']
        >>> out = net.eval()([torch.zeros(3, 64, 64)])
        >>> sorted(out[0])
        ['boxes', 'labels', 'scores']
    """
    arch, backbone_name = _parse_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"num_classes must be the number of foreground classes (an int >= 1), got {num_classes!r}."
        )
    if fpn_channels < 1 or (arch == "fcos" and fpn_channels % 32):
        raise ValueError(
            f"fpn_channels must be a positive multiple of 32 for FCOS (its head has GroupNorm(32, "
            f"fpn_channels)) and positive otherwise; got {fpn_channels} for {name!r}."
        )
    mean = _three_floats(IMAGENET_MEAN if image_mean is None else image_mean, "image_mean")
    std = _three_floats(IMAGENET_STD if image_std is None else image_std, "image_std")
    pretrained = backbone_checkpoint is not None
    trainable = _trainable_layers(backbone_name, trainable_backbone_layers, pretrained)
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d

    if backbone_name.startswith("resnet"):
        body, return_layers = _resnet_body(backbone_name, arch, norm_layer, trainable)
    else:
        body, return_layers = _mobilenet_body(arch, norm_layer, trainable)
    in_channels = [_out_channels(body.get_submodule(layer)) for layer in return_layers]
    extra: ExtraFPNBlock = (
        LastLevelMaxPool() if arch == "fasterrcnn" else LastLevelP6P7(fpn_channels, fpn_channels)
    )
    num_levels = len(return_layers) + len(_EXTRA_LEVELS[type(extra)])
    backbone = BackboneWithFPN(body, return_layers, in_channels, fpn_channels, extra_blocks=extra)

    transform = {"min_size": min_size, "max_size": max_size, "image_mean": mean, "image_std": std}
    model: nn.Module
    if arch == "retinanet":
        model = RetinaNet(
            backbone, num_classes + 1, anchor_generator=_retinanet_anchors(num_levels), **transform
        )
    elif arch == "fcos":
        model = FCOS(backbone, num_classes + 1, anchor_generator=_fcos_anchors(num_levels), **transform)
    else:
        extra_kwargs = {"rpn_score_thresh": 0.05} if backbone_name == "mobilenet_v3_large" else {}
        model = FasterRCNN(
            backbone,
            num_classes + 1,
            rpn_anchor_generator=_rpn_anchors(num_levels, every_size=backbone_name == "mobilenet_v3_large"),
            **transform,
            **extra_kwargs,
        )

    if backbone_checkpoint is not None:
        load_backbone_weights(model.backbone.body, backbone_checkpoint)
    if checkpoint is not None:
        load_weights(
            model,
            checkpoint,
            hint=f"Check that the file holds a {name} with num_classes={num_classes} foreground classes "
            f"(a head of {num_classes + 1} classes) and fpn_channels={fpn_channels}.",
        )
    return model


def fpn_levels(model: nn.Module) -> list[str]:
    """The keys of the dict a torchvision detector's ``backbone`` returns, in order, without running it.

    They are the body's returned layers (``return_layers`` values) followed by the names the FPN's extra
    block adds (``LastLevelMaxPool``: ``"pool"``; ``LastLevelP6P7``: ``"p6"``, ``"p7"``). Tap a level as
    ``"backbone:<level>"``.

    Raises:
        TypeError: ``model`` has no torchvision ``BackboneWithFPN``-like ``backbone`` (a ``body`` with
            ``return_layers`` and an ``fpn``), or its FPN has an extra block of another kind.

    Example:
        >>> fpn_levels(detector("fasterrcnn_resnet18_fpn", num_classes=2, fpn_channels=32))
        ['0', '1', '2', '3', 'pool']
    """
    backbone = getattr(model, "backbone", None)
    body = getattr(backbone, "body", None)
    fpn = getattr(backbone, "fpn", None)
    return_layers = getattr(body, "return_layers", None)
    if (
        not isinstance(body, nn.Module)
        or not isinstance(return_layers, dict)
        or not isinstance(fpn, nn.Module)
    ):
        found = (
            f"its backbone is a {type(backbone).__name__} with children "
            f"{[n for n, _ in backbone.named_children()]}"
            if isinstance(backbone, nn.Module)
            else "it has no backbone module"
        )
        raise TypeError(
            f"{type(model).__name__} is not a torchvision detector with an FPN backbone (a BackboneWithFPN: "
            f"`backbone.body` with `return_layers`, and `backbone.fpn`); {found}."
        )
    levels = [str(return_layers[n]) for n, _ in body.named_children() if n in return_layers]
    extra = getattr(fpn, "extra_blocks", None)
    if extra is None:
        return levels
    for kind, names in _EXTRA_LEVELS.items():
        if type(extra) is kind:
            return levels + names
    raise TypeError(
        f"The FPN of {type(model).__name__} has an extra block {type(extra).__name__} whose level names are "
        f"unknown; known: {[k.__name__ for k in _EXTRA_LEVELS]}."
    )


def _parse_name(name: str) -> tuple[str, str]:
    names = detector_names()
    if name not in names:
        close = difflib.get_close_matches(str(name), names, n=5, cutoff=0.5)
        raise ValueError(
            f"Unknown detector {name!r}. Valid names: {names}. Close matches: {close}. A name is "
            f"'{{arch}}_{{backbone}}_fpn' with arch in {list(ARCHITECTURES)} and backbone in {list(BACKBONES)}."
        )
    arch, _, rest = name.partition("_")
    return arch, rest[: -len("_fpn")]


def _three_floats(values: Sequence[float], what: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{what} needs one value per RGB channel (3), got {values}.")
    return values


def _trainable_layers(backbone_name: str, value: int | None, pretrained: bool) -> int:
    most = _MAX_TRAINABLE["resnet" if backbone_name.startswith("resnet") else backbone_name]
    if not pretrained:
        if value not in (None, most):
            raise ValueError(
                f"trainable_backbone_layers={value} needs backbone_checkpoint: a backbone trained from scratch "
                f"trains every layer ({most} for {backbone_name}). Give backbone_checkpoint (ImageNet weights "
                "of the classifier) or drop trainable_backbone_layers."
            )
        return most
    if value is None:
        return _DEFAULT_TRAINABLE
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise ValueError(
            f"trainable_backbone_layers must be an int in [0, {most}] for {backbone_name}, got {value!r}."
        )
    return value


def _resnet_body(
    backbone_name: str, arch: str, norm_layer: type[nn.Module], trainable: int
) -> tuple[nn.Module, dict[str, str]]:
    """A torchvision ResNet with its first ``5 - trainable`` stages frozen, and the layers the FPN reads."""
    resnet = torchvision.models.get_model(backbone_name, weights=None, norm_layer=norm_layer)
    stages = [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    for stage in stages[: len(stages) - trainable]:
        for module_name in stage:
            resnet.get_submodule(module_name).requires_grad_(False)
    used = [1, 2, 3, 4] if arch == "fasterrcnn" else [2, 3, 4]
    return resnet, {f"layer{k}": str(i) for i, k in enumerate(used)}


def _mobilenet_body(
    arch: str, norm_layer: type[nn.Module], trainable: int
) -> tuple[nn.Module, dict[str, str]]:
    """MobileNetV3-Large's ``features`` with its first stages frozen, and the blocks the FPN reads.

    Stages start at block 0, at each block that reduces the resolution (torchvision marks them ``_is_cn``)
    and at the last block: six stages, the last ``trainable`` of which train.
    """
    features = torchvision.models.mobilenet_v3_large(weights=None, norm_layer=norm_layer).features
    last = len(features) - 1
    strided = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
    stage_starts = [0, *strided, last]
    first_trainable = stage_starts[len(stage_starts) - trainable] if trainable else len(features)
    for block in features[:first_trainable]:
        block.requires_grad_(False)
    if arch == "fasterrcnn":  # torchvision's fasterrcnn_mobilenet_v3_large_fpn: two stride-32 blocks
        used = [strided[-1], last]
    else:  # the last block at strides 8, 16, 32
        used = [strided[-2] - 1, strided[-1] - 1, last]
    return features, {str(k): str(i) for i, k in enumerate(used)}


def _out_channels(module: nn.Module) -> int:
    """Channels a ResNet stage or MobileNet block returns: those of its last convolution."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def _retinanet_anchors(num_levels: int) -> AnchorGenerator:
    sizes = tuple(
        tuple(int(32 * 2**level * 2 ** (octave / 3)) for octave in range(3)) for level in range(num_levels)
    )
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * num_levels)


def _fcos_anchors(num_levels: int) -> AnchorGenerator:
    return AnchorGenerator(tuple((8 * 2**level,) for level in range(num_levels)), ((1.0,),) * num_levels)


def _rpn_anchors(num_levels: int, every_size: bool) -> AnchorGenerator:
    """Faster R-CNN's RPN anchors: one size per level (``32 * 2**i``), or all five sizes on every level."""
    if every_size:
        sizes = ((32, 64, 128, 256, 512),) * num_levels
    else:
        sizes = tuple((32 * 2**level,) for level in range(num_levels))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * num_levels)
