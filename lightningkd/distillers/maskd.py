"""MasKD: masked distillation with receptive tokens learned on the teacher (two stages)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightningkd.distillers.base import Distiller, Features, read_aligned_pair
from lightningkd.functional._helpers import (
    at_least_float32,
    check_non_negative,
    check_positive_int,
)
from lightningkd.functional.maskd import maskd_loss, token_masks

TOKEN_FILE_FORMAT = "lightningkd.maskd_tokens"
TOKEN_FILE_VERSION = 1
TOKEN_COMMAND = (
    "learn them on the frozen teacher first: lightningkd fit --config <a mask-token recipe> (e.g. "
    "recipes/segmentation/maskd/deeplabv3_r101_tokens_camvid.yaml or "
    "recipes/detection/maskd/retinanet_resnet50_fpn_tokens_bccd.yaml), which writes the file named by its "
    "tokens_file"
)


class ReceptiveTokens(nn.Module):
    """MasKD's receptive tokens of one layer: ``T`` learnable vectors, each giving a spatial mask.

    ``masks(F) = sigmoid(K . F)`` per position (:func:`~lightningkd.functional.maskd.token_masks`). With
    ``weighted=True`` a head ``Conv3x3(C, C) -> global average pool -> Conv1x1(C, T) -> softmax over
    tokens`` weighs the tokens per image (the detection configs' ``weight_mask=True``). Tokens start
    from N(0, 0.01^2) and the head's convs from N(0, 2 / (k^2 C_out)) with zero biases, as
    hunto/MasKD's ``MaskModule``. Calling the module returns the mask-learning stage's masked map
    ``sum_t F * m_t (* w_t)`` and the masks.

    Args:
        channels: C, the channels of the map the tokens read.
        num_tokens: T (detection 6, segmentation 8).
        weighted: add the token-weight head.
    """

    def __init__(self, channels: int, num_tokens: int, weighted: bool = False) -> None:
        super().__init__()
        who = "ReceptiveTokens"
        self.channels = check_positive_int(who, "channels", channels)
        self.num_tokens = check_positive_int(who, "num_tokens", num_tokens)
        if num_tokens < 2:
            raise ValueError(f"{who}: num_tokens must be at least 2 (the Dice diversity compares masks).")
        self.tokens = nn.Parameter(torch.empty(num_tokens, channels).normal_(0, 0.01))
        self.weight_head: nn.Sequential | None = None
        if weighted:
            self.weight_head = nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(channels, num_tokens, kernel_size=1),
            )
            for conv in (self.weight_head[0], self.weight_head[2]):
                fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
                nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(conv.bias)

    @property
    def weighted(self) -> bool:
        return self.weight_head is not None

    def masks(self, feat: Tensor) -> Tensor:
        """``(N, T, H, W)`` masks of ``feat`` ``(N, C, H, W)``."""
        return token_masks(feat, self.tokens)

    def token_weights(self, feat: Tensor) -> Tensor | None:
        """``(N, T)`` softmax weights of the tokens for each image, or ``None`` without the head."""
        if self.weight_head is None:
            return None
        return at_least_float32(self.weight_head(feat).flatten(1)).softmax(1)

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        masks = self.masks(feat)
        weights = self.token_weights(feat)
        combined = masks if weights is None else masks * weights[:, :, None, None]
        return feat * combined.sum(1, keepdim=True).to(feat.dtype), masks

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_tokens={self.num_tokens}, weighted={self.weighted}"


def save_mask_tokens(
    path: str | Path, tokens: Mapping[str, ReceptiveTokens], overwrite: bool = False
) -> Path:
    """Write learned tokens (one :class:`ReceptiveTokens` per teacher layer name) to ``path``.

    The file is a plain ``torch.save`` dict of tensors, read back with ``weights_only=True``. An existing
    file is kept unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"The token file {path} exists; it is kept. Name another tokens_file, or set overwrite: true to "
            "replace it."
        )
    layers = {
        layer: {
            "num_tokens": module.num_tokens,
            "channels": module.channels,
            "weighted": module.weighted,
            "state": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        }
        for layer, module in tokens.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": TOKEN_FILE_FORMAT, "version": TOKEN_FILE_VERSION, "layers": layers}, path)
    return path


def load_mask_tokens(path: str | Path, layer: str, who: str = "MasKD") -> ReceptiveTokens:
    """The :class:`ReceptiveTokens` of teacher layer ``layer`` from a token file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{who}: no token file at {path}; {TOKEN_COMMAND}.")
    content = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or content.get("format") != TOKEN_FILE_FORMAT:
        raise ValueError(
            f"{who}: {path} is not a MasKD token file (written by save_mask_tokens); {TOKEN_COMMAND}."
        )
    layers = content["layers"]
    if layer not in layers:
        raise KeyError(
            f"{who}: the token file {path} has tokens for the teacher layers {sorted(layers)}, not {layer!r}; "
            "learn tokens on that layer or set token_layer."
        )
    entry = layers[layer]
    module = ReceptiveTokens(entry["channels"], entry["num_tokens"], entry["weighted"])
    module.load_state_dict(entry["state"])
    return module


class MasKD(Distiller):
    """MasKD: the feature loss under spatial masks from receptive tokens learned on the teacher.

    Huang, Zhang, You, Wang, Qian, Cao & Xu, "Masked Distillation with Receptive Tokens", ICLR 2023,
    arXiv:2205.14589; authors' code hunto/MasKD (``mmrazor/mmrazor/models/losses/maskd.py`` ``MasKDLoss``
    at a419ccf, ``segmentation/losses/maskd.py``, ``mmdetection/maskd.py``). Two stages:

    1. **Mask learning** (once per teacher): T tokens per layer are trained on the frozen teacher, whose
       layer output is replaced by ``sum_t F * sigmoid(K_t . F) (* w_t)``, with the teacher's own task loss
       plus the Dice diversity of the masks. :class:`~lightningkd.modules.SegmentationMaskTokens` and
       :class:`~lightningkd.modules.DetectionMaskTokens` do it and write the token file.
    2. **Distillation** (this class): the tokens are read from the file and frozen. Per token, the mask
       ``m = sigmoid(K . F_T)`` of the teacher's map weighs the squared error between the (aligned)
       student map and the teacher's: ``sum_hw (m S - m T)^2 / (sum_hw m + eps)``, averaged over channels,
       then token-weighted (the head's softmax on the teacher map) or averaged over tokens, then averaged
       over images (:func:`~lightningkd.functional.maskd.maskd_loss`). With ``custom_mask`` the mask
       becomes ``m_T * m_S`` after ``custom_mask_warmup`` training calls, ``m_S`` being the tokens' mask of
       the aligned student map, without gradient. The Dice term is not part of this loss, as in the
       official code.

    The official settings:

    - detection (mmrazor): every FPN level (one MasKD per level, summed:
      :class:`~lightningkd.distillers.PerLevel`, the template's ``weight`` being the config's
      ``loss_weight``: RetinaNet 7, FCOS and RepPoints 10, Faster R-CNN 1), 6 weighted tokens per level,
      ``align=True`` (a 1x1 conv with bias per level, trained even at equal channels), ``custom_mask=True``
      with a warm-up of 5000-8500 iterations, ``eps=0``; tokens learned for 2000 iterations with Adam
      lr 0.01 (Faster R-CNN: SGD lr 0.1), cosine schedule, on the student's 2x schedule data;
    - semantic segmentation: the 19-class **logits** (main, plus 0.4 x the auxiliary head's), 8
      unweighted tokens, no align conv, no custom mask, ``eps=1e-5`` and a factor 0.5 (``weight=0.5``).

    Departures from the official code: the step counter of the custom mask counts training calls only
    (the official one counts every call of the loss, which mmrazor makes only in training) and is saved
    in checkpoints, so a resumed run keeps its warm-up; the loss is computed without the ``(N, T, C, H, W)``
    intermediate (same value); the tokens are frozen with ``requires_grad=False`` instead of mmcv's
    ``lr_mult 0``.

    Args:
        tokens: the token file written by the mask-learning stage.
        student_layer: the student's map (``"output"`` for logits, ``"<layer>:<key>"`` for an FPN level).
        teacher_layer: the teacher's map.
        token_layer: the entry of the token file to read; default: ``teacher_layer`` (so that
            :class:`~lightningkd.distillers.PerLevel` reads each level's own tokens).
        channels: C_t, the teacher map's channels (checked against the token file).
        student_channels: C_s when it differs from ``channels`` (adds the align conv); ``None``: equal.
        align: add the 1x1 align conv even at equal channels (detection configs).
        custom_mask: multiply by the student's mask after the warm-up (detection configs).
        custom_mask_warmup: training calls before the custom mask starts.
        eps: added to each mask's sum (detection 0, segmentation 1e-5).
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(N, C_s, H, W)``, teacher ``(N, C_t, H, W)`` (same spatial size).

    Returns:
        the unweighted 0-dim loss from :meth:`forward`.

    Example:
        >>> import torch, tempfile, os
        >>> from lightningkd.distillers.maskd import ReceptiveTokens, save_mask_tokens
        >>> path = os.path.join(tempfile.mkdtemp(), "tokens.pt")
        >>> _ = save_mask_tokens(path, {"output": ReceptiveTokens(channels=5, num_tokens=4)})
        >>> maskd = MasKD(tokens=path, student_layer="output", teacher_layer="output", channels=5, eps=1e-5)
        >>> maskd({"output": torch.randn(2, 5, 8, 8)}, {"output": torch.randn(2, 5, 8, 8)}).ndim
        0
    """

    def __init__(
        self,
        *,
        tokens: str,
        student_layer: str = "backbone:0",
        teacher_layer: str = "backbone:0",
        token_layer: str | None = None,
        channels: int = 256,
        student_channels: int | None = None,
        align: bool = False,
        custom_mask: bool = False,
        custom_mask_warmup: int = 5000,
        eps: float = 0.0,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        who = "MasKD"
        self.tokens_file = str(tokens)
        self.token_layer = token_layer
        self.channels = check_positive_int(who, "channels", channels)
        if student_channels is not None:
            check_positive_int(who, "student_channels", student_channels)
        self.student_channels = student_channels
        self.custom_mask = bool(custom_mask)
        if (
            isinstance(custom_mask_warmup, bool)
            or not isinstance(custom_mask_warmup, int)
            or custom_mask_warmup < 0
        ):
            raise ValueError(
                f"{who}: custom_mask_warmup must be an integer >= 0, got {custom_mask_warmup!r}."
            )
        self.custom_mask_warmup = custom_mask_warmup
        self.eps = check_non_negative(who, "eps", eps)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)
        self.align: nn.Conv2d | None = None
        if align or (student_channels is not None and student_channels != channels):
            self.align = nn.Conv2d(student_channels or channels, channels, kernel_size=1)
        self.masker = self._load_tokens()
        # training calls so far (the custom mask's warm-up); a buffer, so checkpoints keep it
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def _load_tokens(self) -> ReceptiveTokens:
        layer = self.token_layer or self.teacher_layers[0]
        masker = load_mask_tokens(self.tokens_file, layer)
        if masker.channels != self.channels:
            raise ValueError(
                f"MasKD: the tokens of {layer!r} in {self.tokens_file} read {masker.channels} channels (tokens "
                f"{tuple(masker.tokens.shape)}), but channels is {self.channels}; set channels to the teacher "
                "map's channels or learn the tokens on this layer."
            )
        return masker.requires_grad_(False)

    def reset_parameters(self) -> None:
        """Reload the tokens of the current teacher layer and re-initialise the align conv
        (:class:`~lightningkd.distillers.PerLevel` calls this on every level's copy)."""
        self.masker = self._load_tokens()
        if self.align is not None:
            self.align.reset_parameters()

    def _masks(self, s: Tensor, t: Tensor) -> Tensor:
        masks = self.masker.masks(t)
        if self.custom_mask:
            with torch.no_grad():
                custom = masks * self.masker.masks(s.detach())
            # without a host sync: the custom mask replaces the teacher's once the warm-up has passed
            masks = torch.where(self.calls >= self.custom_mask_warmup, custom, masks)
        return masks

    @torch.no_grad()
    def spatial_masks(self, student: Features, teacher: Features) -> Tensor:
        """The ``(N, T, H, W)`` masks the loss would use now (for previews)."""
        s, t = read_aligned_pair(self, student, teacher)
        return self._masks(s, t)

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        s, t = read_aligned_pair(self, student, teacher)
        masks = self._masks(s, t)
        if self.training:
            self.calls += 1
        return maskd_loss(s, t, masks, token_weights=self.masker.token_weights(t), eps=self.eps)

    def extra_repr(self) -> str:
        return (
            f"tokens={self.tokens_file!r}, channels={self.channels}, student_channels={self.student_channels}, "
            f"custom_mask={self.custom_mask}, custom_mask_warmup={self.custom_mask_warmup}, eps={self.eps}, "
            + super().extra_repr()
        )
