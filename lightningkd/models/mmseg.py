"""Build mmsegmentation models from an mmseg config, on mmcv-lite, without downloading anything.

:class:`MMSegSegmenter` takes a config shipped with the mmsegmentation wheel (or any config file), strips
every pretrained-weight download from it, builds the segmentor with mmseg's registry, and keeps only its
``backbone``, ``neck``, ``decode_head`` and ``auxiliary_head``, under those names, so layer names match
mmseg and mmrazor configs (``backbone.layer4``, ``decode_head.conv_seg`` ...). Calling it returns the
decode head's logits at the head's own resolution; inputs arrive already normalised (mmseg's
``data_preprocessor`` is dropped).

mmcv-lite ships no compiled ops, and a few mmseg files import ``mmcv.ops`` at module level; before
importing mmseg, this module registers a stand-in ``mmcv._ext`` (see
:func:`lightningkd.models.mmcv_ops.install_mmcv_ops_stand_in`) whose functions raise
:class:`~lightningkd.models.mmcv_ops.MMCVOpsMissingError` when called: models without compiled ops then
build and train, and models that need them fail with a message naming the fix.

Configs measured to build and run forward + backward on mmcv-lite (mmseg 1.2.2, CPU, train mode on a
2x3x64x64 input, without any download). "stride" is the input size over the logits' size; "V1c" is
mmseg's ResNetV1c, whose deep stem (three 3x3 convolutions, layers ``backbone.stem.*``) replaces the 7x7
``conv1`` of a plain ResNet, so torchvision ResNet weights do not fit it. Names are relative to
``<site-packages>/mmseg/.mim/configs/``:

=======================================================================  ======  ========================
config                                                                   stride  backbone
=======================================================================  ======  ========================
pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024                        8       ResNetV1c-18
pspnet/pspnet_r101-d8_4xb2-80k_cityscapes-512x1024                       8       ResNetV1c-101
deeplabv3/deeplabv3_r18-d8_4xb2-80k_cityscapes-512x1024                  8       ResNetV1c-18
deeplabv3/deeplabv3_r101-d8_4xb2-80k_cityscapes-512x1024                 8       ResNetV1c-101
deeplabv3plus/deeplabv3plus_r18-d8_4xb2-80k_cityscapes-512x1024          4       ResNetV1c-18
deeplabv3plus/deeplabv3plus_r101-d8_4xb2-80k_cityscapes-512x1024         4       ResNetV1c-101
mobilenet_v2/mobilenet-v2-d8_deeplabv3plus_4xb2-80k_cityscapes-512x1024  4       MobileNetV2
mobilenet_v2/mobilenet-v2-d8_deeplabv3_4xb2-80k_cityscapes-512x1024      8       MobileNetV2
fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024                              8       ResNetV1c-18
fcn/fcn_r50-d8_4xb2-80k_cityscapes-512x1024                              8       ResNetV1c-50
segformer/segformer_mit-b0_8xb1-160k_cityscapes-1024x1024                4       MixVisionTransformer-B0
segformer/segformer_mit-b1_8xb1-160k_cityscapes-1024x1024                4       MixVisionTransformer-B1
segformer/segformer_mit-b2_8xb1-160k_cityscapes-1024x1024                4       MixVisionTransformer-B2
bisenetv1/bisenetv1_r18-d32_4xb4-160k_cityscapes-1024x1024               8       ResNet-18, plain stem
bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024                   8       BiSeNetV2, 4 aux heads
stdc/stdc1_4xb12-80k_cityscapes-512x1024                                 8       STDC1, 3 aux heads (*)
stdc/stdc2_4xb12-80k_cityscapes-512x1024                                 8       STDC2, 3 aux heads (*)
mobilenet_v3/mobilenet-v3-d8_lraspp_4xb4-320k_cityscapes-512x1024        2       MobileNetV3, input>=392
ocrnet/ocrnet_hr18s_4xb2-80k_cityscapes-512x1024                         4       HRNet-W18-small, cascade
upernet/upernet_r18_4xb2-80k_cityscapes-512x1024                         4       ResNetV1c-18
ccnet/ccnet_r50-d8_4xb2-40k_cityscapes-512x1024                          8       ResNetV1c-50
=======================================================================  ======  ========================

SegFormer (MiT-B0/B1/B2; also measured at a non-square 64x80 input) has no auxiliary head. Its backbone
returns the four stage maps as a list, tapped as ``backbone:0`` ... ``backbone:3`` (stride 4 ... 32, sides
rounded up); ``backbone.layers.<i>.0:0`` taps stage ``i``'s patch-embedding tokens ``(N, H_i * W_i, C_i)``
(mmseg's ``PatchEmbed`` returns ``(tokens, hw_shape)``), ``backbone.layers.<i>.2`` the stage's normalised
tokens, ``decode_head.convs.<i>`` the per-stage projections and ``decode_head.fusion_conv`` the fused
feature. The tokens carry no class token.

(*) STDC's third auxiliary head (``auxiliary_head.2``, ``STDCHead``) predicts 2-class boundaries (a
binary detail loss in mmseg), not the classes: ``num_classes`` leaves it at 2.

Also measured working: ANN, APCNet, DANet, DMNet, DNLNet, EMANet, EncNet, FastFCN, GCNet, ISANet,
NonLocal, ResNeSt (stride 8); Semantic FPN, HRNet-FCN, SETR-MLA, Swin, Twins (4); Fast-SCNN, CGNet,
ICNet, SegNeXt (8); ERFNet, DPT (2); UNet (1); ViT-UperNet and Segmenter (16); BEiT and MAE (4, at their
configured 640/512 input size only: their position tables do not resize). CCNet works because mmcv 2.x
computes criss-cross attention in PyTorch.

Fail on mmcv-lite: PSANet (``psanet/psanet_r50-d8_4xb2-80k_cityscapes-512x1024``) builds, then its first
forward raises :class:`MMCVOpsMissingError` (``PSAMask`` needs compiled ops); ConvNeXt and PoolFormer
configs need ``mmpretrain`` (ImportError naming it). Refused at construction with a clear error, because
their heads do not map features to one logits tensor: MaskFormer and Mask2Former (mask classification,
need mmdet), K-Net, PIDNet and DDRNet (several logits in training), PointRend (point head), SAN and VPD
(other segmentor types).

Example:
    >>> import torch
    >>> net = MMSegSegmenter("fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024", num_classes=5, aux_head=False)
    >>> net.eval()(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 5, 8, 8])
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib
import importlib.util
import inspect
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lightningkd.checkpoint_io import load_checkpoint_file
from lightningkd.models.mmcv_ops import install_mmcv_ops_stand_in
from lightningkd.models.segmentation import load_backbone_weights
from lightningkd.models.weights import extract_state_dict, load_state_dict_checked

# Segmentor types whose data flow MMSegSegmenter reproduces: backbone -> (neck) -> head(s).
_SEGMENTORS = ("EncoderDecoder", "CascadeEncoderDecoder")
# Heads returning several logits in training mode (deep supervision) and one in eval mode.
_MULTI_OUTPUT_HEADS = ("PIDHead", "DDRHead", "IterativeDecodeHead")


def _import_mmseg() -> None:
    """Import mmseg's models (registering them) with the ops stand-in in place."""
    install_mmcv_ops_stand_in()
    try:
        importlib.import_module("mmseg.models")
    except ImportError as err:
        raise ImportError(
            f"Cannot import mmsegmentation ({err}). Install the segmentation extra: "
            "`pip install 'lightningkd[seg]'` (mmengine, mmcv-lite<2.2, mmsegmentation, ftfy, regex)."
        ) from err


def mmseg_config_dir() -> Path:
    """The folder of the configs shipped in the mmseg wheel: ``<site-packages>/mmseg/.mim/configs``."""
    spec = importlib.util.find_spec("mmseg")
    if spec is None or spec.origin is None:
        raise ImportError("mmsegmentation is not installed: `pip install 'lightningkd[seg]'`.")
    return Path(spec.origin).parent / ".mim" / "configs"


def list_mmseg_configs() -> list[str]:
    """Names of the configs shipped with mmseg, relative to :func:`mmseg_config_dir`, without ``.py``.

    Example:
        >>> "pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024" in list_mmseg_configs()
        True
    """
    root = mmseg_config_dir()
    names = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] == "_base_" or "__pycache__" in rel.parts:
            continue
        names.append(rel.with_suffix("").as_posix())
    return sorted(names)


def resolve_mmseg_config(config: str | os.PathLike) -> Path:
    """Find a config file: an existing path, or a name relative to the configs shipped with mmseg.

    Names may omit ``.py``, and the folder too when the file name is unique
    (``pspnet_r18-d8_4xb2-80k_cityscapes-512x1024``).

    Raises:
        FileNotFoundError: neither a file nor a shipped config; the message lists close matches.
    """
    path = Path(config).expanduser()
    if path.is_file():
        return path
    root = mmseg_config_dir()
    name = Path(config).as_posix().removesuffix(".py")
    candidate = root / f"{name}.py"
    if candidate.is_file():
        return candidate
    names = list_mmseg_configs() if root.is_dir() else []
    same_stem = [n for n in names if n.rsplit("/", 1)[-1] == name]
    if len(same_stem) == 1:
        return root / f"{same_stem[0]}.py"
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.6)
    stems = {n.rsplit("/", 1)[-1]: n for n in names}
    close += [stems[s] for s in difflib.get_close_matches(name.rsplit("/", 1)[-1], stems, n=8, cutoff=0.6)]
    close = list(dict.fromkeys(close))[:8]
    raise FileNotFoundError(
        f"Unknown mmseg config {os.fspath(config)!r}: it is not a file, nor one of the {len(names)} configs "
        f"shipped with mmsegmentation in {root} (names relative to that folder, '.py' optional). "
        f"Close matches: {close if close else 'none'}. `lightningkd.models.mmseg.list_mmseg_configs()` lists "
        "them all."
    )


def _walk_dicts(obj: Any) -> Iterator[dict]:
    """Every dict nested in ``obj`` (through dicts, lists and tuples), outermost first."""
    if isinstance(obj, dict):
        yield obj
        for value in obj.values():
            yield from _walk_dicts(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _walk_dicts(value)


def _is_pretrained_init(init: Any) -> bool:
    return isinstance(init, dict) and init.get("type") == "Pretrained"


def _without_pretrained_init(init: Any) -> Any:
    """``init_cfg`` with its ``Pretrained`` entries removed (``None`` when nothing is left)."""
    if _is_pretrained_init(init):
        return None
    if isinstance(init, (list, tuple)):
        kept = [i for i in init if not _is_pretrained_init(i)]
        return kept or None
    return init


def _strip_downloads(model_cfg: dict) -> None:
    """Remove every pretrained-weight download from a model config, in place."""
    for d in _walk_dicts(model_cfg):
        if "init_cfg" in d:
            init = _without_pretrained_init(d["init_cfg"])
            if init is None:
                del d["init_cfg"]  # the module's default (random) init applies
            else:
                d["init_cfg"] = init
        if "pretrained" in d:
            value = d["pretrained"]
            if isinstance(value, str):
                d["pretrained"] = None  # 'open-mmlab://resnet50_v1c', 'mmcls://mobilenet_v2', URLs
            elif value is True:
                d["pretrained"] = False  # e.g. TIMMBackbone(pretrained=True)


def _replace_sync_bn(model_cfg: dict) -> None:
    """Turn SyncBN norm configs into plain BN, in place."""
    for d in _walk_dicts(model_cfg):
        if d.get("type") in ("SyncBN", "MMSyncBN"):
            d["type"] = "BN"


def _heads(cfg: Any) -> list[dict]:
    if isinstance(cfg, dict):
        return [cfg]
    if isinstance(cfg, (list, tuple)):
        return [c for c in cfg if isinstance(c, dict)]
    return []


def _set_num_classes(model_cfg: dict, num_classes: int) -> None:
    """Set the class count of the decode heads, and of the auxiliary heads predicting the same classes.

    Auxiliary heads with another class count keep it (STDC's ``STDCHead`` predicts 2-class boundaries).
    """
    decode = _heads(model_cfg.get("decode_head"))
    original = {head.get("num_classes") for head in decode}
    aux = [head for head in _heads(model_cfg.get("auxiliary_head")) if head.get("num_classes") in original]
    for head in decode + aux:
        head["num_classes"] = num_classes
        if head.get("out_channels") is not None:
            head["out_channels"] = num_classes


def _sync_bn_to_bn(module: nn.Module) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` in ``module`` by an ``nn.BatchNorm2d`` with the same state.

    Catches the SyncBN that classes use by default (e.g. the ``Feature2Pyramid`` neck of BEiT and MAE
    configs), which no config entry names.
    """
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        bn.load_state_dict(module.state_dict())
        if module.affine:
            bn.weight.requires_grad_(module.weight.requires_grad)
            bn.bias.requires_grad_(module.bias.requires_grad)
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        new = _sync_bn_to_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


@contextlib.contextmanager
def _quiet_mmengine_logger() -> Iterator[None]:
    """Silence mmengine's INFO log of every parameter's init during ``init_weights``."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_head_configs(model_cfg: dict, registry: Any, config_path: str) -> None:
    """Refuse, before building, heads whose outputs are not one logits tensor computed from the features."""
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead

    supported = (
        "MMSegSegmenter supports heads deriving from mmseg's BaseDecodeHead that map backbone features to "
        "one logits tensor (PSPNet, DeepLabV3/V3+, FCN, SegFormer, UPerNet, OCRNet, BiSeNet, STDC ...)."
    )
    roles = (("decode_head", _heads(model_cfg.get("decode_head"))),)
    roles += (("auxiliary_head", _heads(model_cfg.get("auxiliary_head"))),)
    for role, heads in roles:
        for index, head in enumerate(heads):
            kind = head.get("type")
            cls = kind if isinstance(kind, type) else registry.get(kind)
            if cls is None:
                continue  # the registry's own error (unknown type) is raised at build
            name = cls.__name__
            if not issubclass(cls, BaseDecodeHead):
                raise ValueError(
                    f"The {role} {name} of {config_path} is not a per-pixel logits head (mask-classification "
                    f"heads such as MaskFormer and Mask2Former need mmdet and data samples). {supported}"
                )
            if name in _MULTI_OUTPUT_HEADS:
                raise ValueError(
                    f"The {role} {name} of {config_path} returns a list or tuple of logits in training mode "
                    f"(deep supervision) and one tensor in eval mode. {supported}"
                )
            if (
                role == "decode_head"
                and index > 0
                and "prev_output" not in inspect.signature(cls.forward).parameters
            ):
                raise ValueError(
                    f"The cascade head {name} of {config_path} does not refine the previous head's logits "
                    f"from the features (forward(inputs, prev_output)), as OCRNet's OCRHead does. {supported}"
                )


class MMSegSegmenter(nn.Module):
    """An mmsegmentation segmentor built from an mmseg config, returning decode-head logits.

    Everything that would download is stripped from the config (``model.pretrained``, every ``init_cfg``
    of type ``Pretrained``, ``pretrained=True`` flags), the segmentor is built with mmseg's registry and
    its configured random initialisation applied (``init_weights()``); local weights come through
    ``checkpoint``. The segmentor's parts become this module's own attributes, named as in mmseg:
    ``backbone``, ``neck`` (``None`` when the config has none), ``decode_head`` and ``auxiliary_head``
    (``None`` when absent or dropped). mmseg's ``data_preprocessor`` is not kept: feed normalised images.

    ``forward`` runs backbone -> neck -> decode head (the head chain of a ``CascadeEncoderDecoder``, e.g.
    OCRNet) and returns the logits at the head's resolution, not upsampled (1/8 of the input for ``-d8``
    models, 1/4 for SegFormer and DeepLabV3+). In training mode the auxiliary head(s) run on the same
    features; their output is not returned but can be read with a forward hook (``aux_layer=
    "auxiliary_head"`` in :class:`~lightningkd.modules.SegmentationDistillationModule`; with several
    auxiliary heads, a ``ModuleList``, tap ``auxiliary_head.0``, ``auxiliary_head.1`` ...). In eval mode
    the auxiliary heads are skipped.

    Args:
        config: path to an mmseg config file, or a config name relative to the configs shipped in the
            mmseg wheel, ``.py`` optional (``pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024``; see
            :func:`list_mmseg_configs`).
        num_classes: overrides ``num_classes`` of the decode head(s) and auxiliary head(s).
        checkpoint: local weights: an mmseg model-zoo checkpoint (``{"state_dict": {"backbone.…",
            "decode_head.…", "auxiliary_head.…"}}``, mmengine's training metadata is skipped over), a
            plain state_dict of this module, or a lightningkd Lightning checkpoint (its ``student.``
            weights are taken); see :meth:`load_checkpoint`.
        aux_head: keep the auxiliary head(s). With ``False`` they are not built, and ``auxiliary_head.*``
            weights in ``checkpoint`` are ignored.
        sync_bn: keep the config's ``SyncBN``. By default (``False``) SyncBN becomes plain ``BN`` so the
            model trains on CPU or one GPU; under DDP, get synchronised BatchNorm from Lightning with
            ``Trainer(sync_batchnorm=True)``, which converts every BatchNorm of the model.
        config_options: dotted overrides merged into the config before building (mmengine's
            ``Config.merge_from_dict``), e.g. ``{"model.backbone.depth": 18}`` or
            ``{"model.decode_head.dropout_ratio": 0.0}``.
        strict: with ``checkpoint``, fail on missing or unexpected keys (after dropping auxiliary-head
            keys when ``aux_head=False``). ``False`` loads the matching keys only; a file matching no
            key is refused either way.
        backbone_checkpoint: local ImageNet weights of the backbone alone (e.g. mmseg's ``resnet18_v1c``
            file, keys with or without a ``backbone.`` prefix), what the configs' ``pretrained`` entry
            would have downloaded. Every backbone key must be found.

    Attributes:
        num_classes: number of output channels of the logits.
        align_corners: the decode head's ``align_corners`` (mmseg resizes its logits with it).
        config_path: the resolved config file.

    Raises:
        FileNotFoundError: unknown config or checkpoint file.
        lightningkd.checkpoint_io.CheckpointError: an unreadable checkpoint, or one asking to run code.
        ValueError: a segmentor type or decode head whose outputs are not per-pixel logits.
        RuntimeError: checkpoint keys or shapes that do not fit the model.
    """

    def __init__(
        self,
        config: str,
        num_classes: int | None = None,
        checkpoint: str | None = None,
        aux_head: bool = True,
        sync_bn: bool = False,
        config_options: dict[str, Any] | None = None,
        strict: bool = True,
        backbone_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        _import_mmseg()
        from mmengine.config import Config
        from mmengine.registry import DefaultScope
        from mmseg.registry import MODELS

        self.config_path = str(resolve_mmseg_config(config))
        try:
            cfg = Config.fromfile(self.config_path)
        except ImportError as err:  # custom_imports of another OpenMMLab package (mmpretrain, mmdet)
            raise ImportError(
                f"The config {self.config_path} imports modules that are not installed "
                f"({err.__cause__ or err}). "
                "Install the package it names (e.g. `pip install mmpretrain` for the ConvNeXt and PoolFormer "
                "backbones) or pick another config."
            ) from err
        if config_options:
            cfg.merge_from_dict(dict(config_options))
        if "model" not in cfg:
            raise ValueError(f"The config {self.config_path} has no `model` entry: not a model config.")
        model_cfg = copy.deepcopy(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model))
        kind = model_cfg.get("type")
        if kind not in _SEGMENTORS:
            raise ValueError(
                f"The config {self.config_path} builds a {kind!r}; MMSegSegmenter supports the segmentors "
                f"{list(_SEGMENTORS)} (backbone, optional neck, decode head returning per-pixel logits)."
            )
        model_cfg.pop("data_preprocessor", None)  # inputs arrive normalised by the datamodules
        model_cfg.pop("pretrained", None)
        _strip_downloads(model_cfg)
        if not sync_bn:
            _replace_sync_bn(model_cfg)
        if num_classes is not None:
            if num_classes < 1:
                raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
            _set_num_classes(model_cfg, int(num_classes))
        if not aux_head:
            model_cfg["auxiliary_head"] = None
        _check_head_configs(model_cfg, MODELS, self.config_path)

        with DefaultScope.overwrite_default_scope("mmseg"), warnings.catch_warnings():
            # the heads build their (unused here) mmseg losses, which warn about mmseg's own defaults
            warnings.filterwarnings(
                "ignore", message=".*build_loss.. would be deprecated", category=UserWarning
            )
            warnings.filterwarnings(
                "ignore", message="Default ..avg_non_ignore.. is False", category=UserWarning
            )
            warnings.filterwarnings(
                "ignore", message=".*build_pixel_sampler.. would be deprecated", category=UserWarning
            )
            warnings.filterwarnings(
                "ignore", message="In MMCV v1.4.4, we modified the default", category=UserWarning
            )
            warnings.filterwarnings(
                "ignore", message="For binary segmentation, we suggest", category=UserWarning
            )
            segmentor = MODELS.build(model_cfg)
        for module in segmentor.modules():  # belt and braces: nothing may load weights in init_weights
            if getattr(module, "init_cfg", None) is not None:
                module.init_cfg = _without_pretrained_init(module.init_cfg)
        with _quiet_mmengine_logger():
            segmentor.init_weights()
        if not sync_bn:
            _sync_bn_to_bn(segmentor)

        self.backbone: nn.Module = segmentor.backbone
        self.neck: nn.Module | None = segmentor.neck if getattr(segmentor, "with_neck", False) else None
        self.decode_head: nn.Module = segmentor.decode_head
        self.auxiliary_head: nn.Module | None = (
            segmentor.auxiliary_head
            if aux_head and getattr(segmentor, "with_auxiliary_head", False)
            else None
        )
        last_head = self.decode_head[-1] if isinstance(self.decode_head, nn.ModuleList) else self.decode_head
        self.num_classes: int = int(last_head.out_channels)
        self.align_corners: bool = bool(getattr(last_head, "align_corners", False))
        if backbone_checkpoint is not None:
            load_backbone_weights(self.backbone, backbone_checkpoint)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint, strict=strict)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(N, num_classes, h, w)`` at the decode head's resolution for normalised ``images``."""
        features = self.backbone(images)
        if self.neck is not None:
            features = self.neck(features)
        if isinstance(self.decode_head, nn.ModuleList):  # CascadeEncoderDecoder: each head refines the last
            logits = self.decode_head[0](features)
            for head in self.decode_head[1:]:
                logits = head(features, logits)
        else:
            logits = self.decode_head(features)
        if isinstance(logits, (tuple, list)):  # DANet's DAHead, EncNet's EncHead: (logits, side outputs ...)
            logits = logits[0]  # as their own predict() reads it
        if self.training and self.auxiliary_head is not None:
            aux_heads = (
                self.auxiliary_head
                if isinstance(self.auxiliary_head, nn.ModuleList)
                else [self.auxiliary_head]
            )
            for head in aux_heads:
                head(features)  # read through a forward hook on the head
        return logits

    def load_checkpoint(
        self, path: str | os.PathLike, strict: bool = True, prefix: str | None = None
    ) -> MMSegSegmenter:
        """Load mmseg model-zoo weights, a plain state_dict or a lightningkd checkpoint (``student.``).

        The file is read without running code (mmengine's training metadata is skipped over); a key
        prefix (``student.``, ``architecture.`` of mmrazor, ``module.`` of DDP ...) is found and stripped
        (see :func:`lightningkd.models.weights.extract_state_dict`). ``auxiliary_head.*`` keys are dropped
        when this model has no auxiliary head.

        Args:
            path: the weight file.
            strict: fail on missing or unexpected keys; ``False`` loads the matching keys only. A file
                matching no key fails in both cases.
            prefix: the key prefix to strip; ``None`` picks the known prefix matching most keys.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            lightningkd.checkpoint_io.CheckpointError: the file is unreadable, or asks to run code.
            RuntimeError: no key matches, shapes differ, or (``strict``) keys are missing or unexpected.
        """
        path = os.fspath(path)
        state = extract_state_dict(load_checkpoint_file(path), prefix, model_state=self.state_dict())
        if self.auxiliary_head is None:
            for key in [k for k in state if k.startswith("auxiliary_head.")]:
                del state[key]  # in place: the state_dict's module versions stay attached
        hint = (
            f"Check the config ({self.config_path}), num_classes and aux_head against the model that wrote "
            "the file."
        )
        load_state_dict_checked(self, state, repr(path), strict=strict, hint=hint)
        return self
