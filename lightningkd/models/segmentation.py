"""Build torchvision segmentation models that return their logits at the head's own resolution."""

from __future__ import annotations

import difflib
import os

import torchvision
from torch import Tensor, nn

from lightningkd.checkpoint_io import (
    KNOWN_PREFIXES,
    best_key_prefix,
    describe_key_mismatch,
    load_checkpoint_file,
)
from lightningkd.models.weights import extract_state_dict, load_weights

_LRASPP = "lraspp_mobilenet_v3_large"


class TorchvisionSegmenter(nn.Module):
    """A torchvision segmentation model (FCN, DeepLabV3, LRASPP) built offline, returning raw logits.

    torchvision's models upsample their logits to the input size inside ``forward``; this wrapper keeps
    the same sub-modules (``backbone``, ``classifier``, ``aux_classifier``, so layer names match
    torchvision's) but returns the logits at the head's resolution (1/8 of the input for these
    models). The LightningModule resizes them to the label size, and the distillers work on the raw
    maps, as the dense-prediction KD papers do.

    The auxiliary head (FCN, DeepLabV3) runs only in training mode; its output is not returned but can
    be tapped by name (``aux_classifier``), which is how
    :class:`~lightningkd.modules.SegmentationDistillationModule` adds the auxiliary loss.

    Args:
        name: ``fcn_resnet50``, ``fcn_resnet101``, ``deeplabv3_resnet50``, ``deeplabv3_resnet101``,
            ``deeplabv3_mobilenet_v3_large`` or ``lraspp_mobilenet_v3_large``.
        num_classes: number of classes of the heads.
        aux_head: build the auxiliary FCN head (not available for LRASPP).
        checkpoint: optional local file with the whole model's weights (a lightningkd checkpoint, or a
            torchvision state_dict; keys of torchvision's own models fit since the names are the same).
        backbone_checkpoint: optional local file with ImageNet weights of the backbone's classifier
            (e.g. torchvision's ``resnet50`` or ``mobilenet_v3_large`` state_dict); the classifier's
            ``fc`` / ``classifier`` weights are ignored.

    Shape:
        input ``(N, 3, H, W)``; output ``(N, num_classes, ceil(H/8), ceil(W/8))``.

    Example:
        >>> import torch
        >>> net = TorchvisionSegmenter("lraspp_mobilenet_v3_large", num_classes=5).eval()
        >>> net(torch.zeros(1, 3, 64, 96)).shape
        torch.Size([1, 5, 8, 12])
    """

    def __init__(
        self,
        name: str,
        num_classes: int = 21,
        aux_head: bool = False,
        checkpoint: str | None = None,
        backbone_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        names = torchvision.models.list_models(module=torchvision.models.segmentation)
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
            raise ValueError(
                f"Unknown torchvision segmentation model {name!r}. Valid names: {names}; close: {close}."
            )
        if aux_head and name == _LRASPP:
            raise ValueError("LRASPP has no auxiliary head: set aux_head=False.")
        kwargs = {"aux_loss": aux_head} if name != _LRASPP else {}
        model = torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
        )
        self.name = name
        self.num_classes = num_classes
        self.backbone = model.backbone
        self.classifier = model.classifier
        self.aux_classifier = getattr(model, "aux_classifier", None)
        if backbone_checkpoint is not None:
            load_backbone_weights(self.backbone, backbone_checkpoint)
        if checkpoint is not None:
            load_weights(
                self,
                checkpoint,
                hint="Check the model name, num_classes and aux_head against the file's model.",
            )

    def forward(self, images: Tensor) -> Tensor:
        features = self.backbone(images)
        if self.name == _LRASPP:
            return self.classifier(features)
        if self.training and self.aux_classifier is not None:
            self.aux_classifier(features["aux"])  # read through a forward hook by the LightningModule
        return self.classifier(features["out"])


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a classifier's (or a segmentor's) weights into a segmentation backbone built from it.

    torchvision's segmentation backbones keep the classifier's module names, without its head; MobileNet
    backbones are built from its ``features`` and so drop that prefix; mmseg backbone files may keep a
    ``backbone.`` prefix. The prefix (a run of ``features.``, ``backbone.`` and the wrappers' prefixes
    ``student.``, ``module.`` ... of :data:`lightningkd.checkpoint_io.KNOWN_PREFIXES`) under which most
    keys are backbone keys is stripped. Keys of the head are ignored; every backbone key must be found.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        lightningkd.checkpoint_io.CheckpointError: the file is unreadable, or asks to run code.
        RuntimeError: backbone keys missing from the file, or shapes that differ.

    Example:
        >>> import tempfile, torch, torchvision
        >>> net = TorchvisionSegmenter("lraspp_mobilenet_v3_large", num_classes=2)
        >>> imagenet = torchvision.models.mobilenet_v3_large(num_classes=3)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save(imagenet.state_dict(), d + "/mnv3.pth")
        ...     load_backbone_weights(net.backbone, d + "/mnv3.pth")
        >>> torch.equal(net.backbone["0"][0].weight, imagenet.features[0][0].weight)
        True
    """
    path = os.fspath(path)
    state = extract_state_dict(load_checkpoint_file(path), prefix="")
    wanted = backbone.state_dict()
    prefix, _ = best_key_prefix(state, wanted, parts=(*KNOWN_PREFIXES, "features.", "backbone."))
    picked = {
        k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in wanted
    }
    missing = [k for k in wanted if k not in picked]
    if missing:
        raise RuntimeError(
            f"The backbone weights in {path!r} lack {len(missing)} of the backbone's {len(wanted)} keys "
            f"(file keys read under the prefix {prefix!r}):\n{describe_key_mismatch(missing, [])}\n"
            f"The file's keys look like {sorted(state)[:5]}. Point backbone_checkpoint at the weights of the "
            "classifier (or segmentor) the backbone is built from."
        )
    try:
        backbone.load_state_dict(picked)
    except RuntimeError as err:  # shapes differ
        raise RuntimeError(
            f"The backbone weights in {path!r} do not fit the backbone: {err}\nPoint backbone_checkpoint at "
            "the weights of the classifier the backbone is built from (same depth and width)."
        ) from None
