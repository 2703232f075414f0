"""OFA: one-for-all KD between heterogeneous architectures, with a classifier branch per student stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from lightningkd.adapters import TokensToMap
from lightningkd.adapters.layout import LAYOUTS, TokenLayout
from lightningkd.distillers.base import OUTPUT, Distiller, Features, require, require_labels, sum_terms
from lightningkd.functional._helpers import (
    check_choice,
    check_non_negative,
    check_positive,
    check_positive_int,
    shape_of,
)
from lightningkd.functional.ofa import ofa_class_indices, ofa_cross_entropy, ofa_target_weights

OFABranch = Literal["conv", "tokens"]
"""The branch kind of :class:`OFA`: ``"conv"`` for a CNN student's maps, ``"tokens"`` for a ViT/MLP/Swin's."""

BRANCHES: tuple[str, ...] = ("conv", "tokens")


def _check_count(who: str, key: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{who}: {key} must be an integer >= 0, got {value!r}.")
    return value


class SepConv(nn.Sequential):
    """A stride-2 separable convolution block: two depthwise 3x3 + pointwise 1x1 pairs, each with BN + ReLU.

    The down-sampling block of OFA's CNN branches (Hao840/OFAKD ``distillers/utils.py`` ``SepConv``, the
    DARTS-style separable conv): depthwise 3x3 stride 2 -> 1x1 (C_in) -> BN -> ReLU -> depthwise 3x3
    stride 1 -> 1x1 (C_out) -> BN -> ReLU, no biases. Halves the spatial size (``ceil(H / 2)``).

    Args:
        in_channels: C_in.
        out_channels: C_out.

    Example:
        >>> import torch
        >>> SepConv(8, 16)(torch.zeros(2, 8, 7, 7)).shape
        torch.Size([2, 16, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class PatchMerging(nn.Module):
    """Swin-style patch merging on a ``(N, H, W, C)`` grid: 2x2 neighbours concatenated, LayerNorm, Linear.

    As Hao840/OFAKD ``distillers/utils.py`` ``PatchMerging`` (which follows Swin): the four sub-grids
    ``(0::2, 0::2), (1::2, 0::2), (0::2, 1::2), (1::2, 1::2)`` are concatenated on the channels (in that
    order), normalised by ``LayerNorm(4 C_in)``, mapped by a bias-free ``Linear(4 C_in, C_out)`` and passed
    through GELU or nothing. An odd side is zero-padded at the bottom / right first (as timm's Swin); the
    official module asserts even sides instead.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        gelu: apply GELU after the linear map.

    Example:
        >>> import torch
        >>> PatchMerging(8, 16, gelu=True)(torch.zeros(2, 7, 6, 8)).shape
        torch.Size([2, 4, 3, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, gelu: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_channels)
        self.reduction = nn.Linear(4 * in_channels, out_channels, bias=False)
        self.act: nn.Module = nn.GELU() if gelu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x)))


class OFAConvBranch(nn.Module):
    """OFA's classifier branch for a CNN stage: ``downsamples`` stride-2 :class:`SepConv` blocks, GAP, Linear.

    Hao840/OFAKD ``distillers/ofa.py`` (f7bb896), the CNN projector: block ``i`` maps
    ``channels * 2^i -> channels * 2^(i+1)`` channels, the last one to ``embed_dim``; with
    ``downsamples=0`` (the last stage) a 1x1 convolution with bias maps ``channels -> embed_dim``. Then
    global average pooling and ``Linear(embed_dim, num_classes)``.

    Args:
        channels: the stage's channels.
        downsamples: the number of stride-2 blocks (the stage's stride relative to the last stage is
            ``2^downsamples``; ResNet stage ``s`` of 4: ``4 - s``).
        embed_dim: width before the classifier (official: ``max(C_student_last, D_teacher_last)``).
        num_classes: classes of the logits.

    Shape:
        ``(N, channels, H, W)`` -> ``(N, num_classes)``.

    Example:
        >>> import torch
        >>> OFAConvBranch(channels=8, downsamples=2, embed_dim=32, num_classes=10)(torch.zeros(2, 8, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, channels: int, downsamples: int, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.channels = channels
        if downsamples == 0:
            layers: list[nn.Module] = [nn.Conv2d(channels, embed_dim, 1)]
        else:
            widths = [channels * 2**i for i in range(downsamples)] + [embed_dim]
            layers = [SepConv(widths[i], widths[i + 1]) for i in range(downsamples)]
        self.project = nn.Sequential(*layers)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            hint = " (tokens: use branch='tokens')" if x.ndim == 3 else ""
            raise ValueError(
                f"OFAConvBranch expects a (N, {self.channels}, H, W) map, got {shape_of(x)}{hint}; "
                "set the stage's entry of stage_channels."
            )
        return self.head(self.project(x).mean(dim=(2, 3)))


class OFATokenBranch(nn.Module):
    """OFA's classifier branch for a transformer / MLP stage: patch merging, ViT blocks, pooling, Linear.

    Hao840/OFAKD ``distillers/ofa.py`` (f7bb896), the ViT/MLP projector. The patch tokens (after the
    ``prefix_tokens`` class/distillation tokens) are laid out on their grid with
    :class:`~lightningkd.adapters.TokensToMap` and merged ``downsamples`` times (:class:`PatchMerging`; the
    first ``channels -> embed_dim`` with GELU, the next ``embed_dim -> embed_dim``, the last of them
    without GELU, as the official code); the prefix tokens are put back in front unchanged, ``blocks``
    timm ViT blocks (``embed_dim``, ``num_heads``, MLP ratio 4, no qkv bias, ``nn.LayerNorm`` with eps
    1e-5 as in the timm 0.6.5 of the official code) follow, then the mean of the prefix tokens (or of all
    tokens when there are none) and ``Linear(embed_dim, num_classes)``.

    Args:
        channels: the stage's token width.
        downsamples: the number of patch mergings (official: ``log2(grid / 7)``, i.e. down to 7x7 at 224
            px: 1 for ViT/DeiT-16, ``4 - s`` for Swin stage ``s``).
        embed_dim: the blocks' width (official: the student's last-stage width).
        num_classes: classes of the logits.
        blocks: the number of ViT blocks (official: ``max(4 - s, 1)`` for stage ``s`` of 4).
        num_heads: attention heads of each block (official 4).
        prefix_tokens: class/distillation tokens before the patch grid (1 ViT/DeiT, 2 distilled DeiT, 0 Swin
            and MLPs); named, never guessed.
        grid: the patch grid ``(H, W)``; ``None``: square.
        layout: ``"tokens"`` for ``(N, L, C)``, ``"nhwc"`` for timm Swin stages ``(N, H, W, C)``.

    Shape:
        ``(N, prefix_tokens + H * W, channels)`` or ``(N, H, W, channels)`` -> ``(N, num_classes)``.

    Example:
        >>> import torch
        >>> branch = OFATokenBranch(channels=16, downsamples=1, embed_dim=16, num_classes=10, blocks=1,
        ...                         prefix_tokens=1)
        >>> branch(torch.zeros(2, 1 + 4 * 4, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        channels: int,
        downsamples: int,
        embed_dim: int,
        num_classes: int,
        blocks: int,
        num_heads: int = 4,
        prefix_tokens: int = 0,
        grid: tuple[int, int] | None = None,
        layout: TokenLayout = "tokens",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.prefix_tokens = prefix_tokens
        self.layout = layout
        self.to_map = TokensToMap(prefix_tokens=prefix_tokens, grid=grid, layout=layout)
        self.merges = nn.Sequential(
            *(
                PatchMerging(channels if i == 0 else embed_dim, embed_dim, gelu=i == 0 or i < downsamples - 1)
                for i in range(downsamples)
            )
        )
        self.blocks = nn.Sequential(
            *(Block(dim=embed_dim, num_heads=num_heads, norm_layer=nn.LayerNorm) for _ in range(blocks))
        )
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        expected = 3 if self.layout == "tokens" else 4
        if x.ndim != expected or x.shape[-1] != self.channels:
            form = "(N, L, C)" if self.layout == "tokens" else "(N, H, W, C)"
            hint = " (a CNN map: use branch='conv')" if x.ndim == 4 and self.layout == "tokens" else ""
            raise ValueError(
                f"OFATokenBranch expects {form} features with C = {self.channels} (layout={self.layout!r}), "
                f"got {shape_of(x)}{hint}; set the stage's entry of stage_channels (and token_layout)."
            )
        grid = self.to_map(x).permute(0, 2, 3, 1)  # (N, H, W, C); fails with the counts if they do not fit
        tokens = self.merges(grid).flatten(1, 2)
        k = self.prefix_tokens
        if k:
            tokens = torch.cat([x[:, :k], tokens], dim=1)
        tokens = self.blocks(tokens)
        return self.head(tokens[:, :k].mean(dim=1) if k else tokens.mean(dim=1))


def init_branch_weights(module: nn.Module) -> None:
    """The official init of OFA's branches (Hao840/OFAKD ``distillers/utils.py`` ``init_weights``).

    Convolutions: Kaiming normal (fan-out, ReLU), biases as PyTorch's default; BatchNorm: weight 1, bias
    0; every Linear (the blocks' too): truncated normal, std 0.02, bias 0. LayerNorms keep weight 1, bias 0.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class OFA(Distiller):
    """One-for-all KD: the OFA loss on the student's logits and on a classifier branch per student stage.

    Hao, Guo, Han, Tang, Hu, Wang & Xu, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
    Knowledge Distillation", NeurIPS 2023, arXiv:2310.19444. Authors' code: Hao840/OFAKD
    ``distillers/ofa.py`` ``OFA`` and ``ofa_loss``, ``distillers/utils.py`` (``SepConv``,
    ``PatchMerging``, ``init_weights``), ``train.py`` (f7bb896).

    Every listed student stage gets a small classifier branch that projects its features into the logit
    space, where the architecture-specific differences between teacher and student are gone: for a CNN
    (``branch="conv"``) :class:`OFAConvBranch` (stride-2 separable convs down to the last stage's
    resolution, global pooling, Linear); for a ViT, DeiT, Swin or MLP student (``branch="tokens"``)
    :class:`OFATokenBranch` (patch merging, ViT blocks, pooling, Linear). Each branch's logits and the
    student's own logits are trained against the teacher's final logits with
    :func:`~lightningkd.functional.ofa_loss`, a cross-entropy with the enhanced target
    ``(p_t + e_y)^eps - e_y`` (it needs the labels: :attr:`needs_labels`)::

        L = logits_weight * L_OFA(z_s) + branch_weight * sum_s L_OFA(branch_s(F_s))

    :meth:`terms` returns ``{"logits": ..., <stage layer>: ...}`` (weights included), so each is logged
    as ``train/kd/<name>/<term>``. The branches train with the student, are saved in its checkpoint and
    are unused at inference. The task loss of the official training is cross-entropy with label
    smoothing 0.1 at weight 1 (``label_smoothing: 0.1`` of the classification module).

    Departures from the official code:

    - ``log_softmax`` instead of ``log(softmax)`` (same value where the official is finite).
    - Token branches with prefix tokens pool the **mean** of the prefix tokens; the official flattens
      them, which only works with one (a class token: the same result). Prefix tokens pass through the
      patch merging unchanged, as in the official code, so they need ``stage_channels == embed_dim``.
    - Patch merging pads an odd grid side (the official asserts even sides).
    - Sizes are arguments (the official reads them from per-model ``stage_info`` tables; its token
      branches derive the merges from the grid at 224 px, ``log2(grid / 7)``).
    - Soft / mixup targets: the argmax gives the one-hot mask, as the official code does.

    Args:
        num_classes: classes of the logits (the branches' output size).
        stage_layers: the student's stage outputs to branch from (``named_modules`` paths, e.g.
            ``layer1``..``layer4`` of a ResNet, ``blocks.1``, ``blocks.3``, ``blocks.9``, ``blocks.11`` of a
            12-block ViT as the official split).
        stage_channels: the channels (token width) of each stage.
        stage_downsamples: per stage, the number of stride-2 blocks (``branch="conv"``: ``4 - s`` for
            ResNet stage ``s``) or of patch mergings (``branch="tokens"``: 1 for a ViT/DeiT-16 at 224 px,
            ``4 - s`` for Swin stage ``s``).
        embed_dim: the branches' width: ``max(C_student_last, D_teacher_last)`` for CNN students (ResNet-18
            with a DeiT-T teacher: 512), the student's last width for token students (DeiT-T: 192).
        branch: ``"conv"`` (CNN student) or ``"tokens"`` (transformer / MLP student).
        prefix_tokens: token branches: class/distillation tokens before the patch grid (1 ViT/DeiT,
            2 distilled DeiT, 0 Swin and MLPs); named, never guessed.
        stage_grids: token branches: the patch grid ``(H, W)`` of each stage; ``None``: square grids.
        token_layout: ``"tokens"`` for ``(N, L, C)`` or ``"nhwc"`` for timm Swin stages.
        stage_blocks: token branches: ViT blocks per stage; ``None``: ``max(n - i, 1)`` for the ``i``-th of
            ``n`` stages (official ``max(4 - s, 1)``: 3, 2, 1, 1).
        num_heads: attention heads of the token branches' blocks (official 4).
        eps: the target-enhancement exponent of the logits term (official 1; README: 1.5 on ImageNet with
            a CNN student, 1.0 on CIFAR-100).
        stage_eps: per-stage exponents; ``None``: ``eps`` for every stage (the official default).
        temperature: softmax temperature (official 1).
        logits_weight: weight of the logits term (official ``--kd-loss-weight``, 1).
        branch_weight: weight of the summed branch terms (official ``--ofa-loss-weight``, 1).
        student_layer: where the student's logits are read.
        teacher_layer: where the teacher's logits are read.
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        logits ``(N, num_classes)`` for both models; CNN stages ``(N, C_s, H_s, W_s)``, token stages
        ``(N, prefix_tokens + H_s W_s, C_s)`` (or ``(N, H_s, W_s, C_s)``); ``batch["target"]``: ``(N,)``
        class indices or ``(N, C)`` soft labels.

    Returns:
        the 0-dim loss from :meth:`forward`, ``logits_weight`` and ``branch_weight`` included (``weight``
        is applied by the module).

    Example:
        >>> import torch
        >>> ofa = OFA(num_classes=10, stage_layers=["layer1", "layer2"], stage_channels=[8, 16],
        ...           stage_downsamples=[1, 0], embed_dim=32)
        >>> student = {"output": torch.randn(2, 10), "layer1": torch.randn(2, 8, 8, 8),
        ...            "layer2": torch.randn(2, 16, 4, 4)}
        >>> terms = ofa.terms(student, {"output": torch.randn(2, 10)}, {"target": torch.tensor([1, 7])})
        >>> list(terms)
        ['logits', 'layer1', 'layer2']
    """

    needs_labels = True

    def __init__(
        self,
        *,
        num_classes: int,
        stage_layers: Sequence[str],
        stage_channels: Sequence[int],
        stage_downsamples: Sequence[int],
        embed_dim: int,
        branch: OFABranch = "conv",
        prefix_tokens: int = 0,
        stage_grids: Sequence[tuple[int, int]] | None = None,
        token_layout: TokenLayout = "tokens",
        stage_blocks: Sequence[int] | None = None,
        num_heads: int = 4,
        eps: float = 1.0,
        stage_eps: Sequence[float] | None = None,
        temperature: float = 1.0,
        logits_weight: float = 1.0,
        branch_weight: float = 1.0,
        student_layer: str = OUTPUT,
        teacher_layer: str = OUTPUT,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        who = "OFA"
        self.num_classes = check_positive_int(who, "num_classes", num_classes)
        self.embed_dim = check_positive_int(who, "embed_dim", embed_dim)
        self.branch = check_choice(who, "branch", branch, BRANCHES)
        self.token_layout = check_choice(who, "token_layout", token_layout, LAYOUTS)
        self.prefix_tokens = _check_count(who, "prefix_tokens", prefix_tokens)
        self.num_heads = check_positive_int(who, "num_heads", num_heads)
        self.eps = check_positive(who, "eps", eps)
        self.temperature = check_positive(who, "temperature", temperature)
        self.logits_weight = check_non_negative(who, "logits_weight", logits_weight)
        self.branch_weight = check_non_negative(who, "branch_weight", branch_weight)

        if isinstance(stage_layers, str) or not all(isinstance(s, str) and s for s in stage_layers):
            raise ValueError(f"{who}: stage_layers must be a list of layer names, got {stage_layers!r}.")
        self.stage_layers = tuple(stage_layers)
        n = len(self.stage_layers)
        if len(set(self.stage_layers)) != n or "logits" in self.stage_layers:
            raise ValueError(
                f"{who}: stage_layers must be distinct and not 'logits' (the logits term's name), got "
                f"{list(self.stage_layers)}."
            )

        def per_stage(key: str, values: Sequence[Any] | None) -> tuple[Any, ...] | None:
            if values is None:
                return None
            values = tuple(values)
            if len(values) != n:
                raise ValueError(
                    f"{who}: {key} has {len(values)} entries but stage_layers has {n} "
                    f"({list(self.stage_layers)}); give one per stage."
                )
            return values

        self.stage_channels = tuple(
            check_positive_int(who, "stage_channels", c) for c in per_stage("stage_channels", stage_channels)
        )
        self.stage_downsamples = tuple(
            _check_count(who, "stage_downsamples", d)
            for d in per_stage("stage_downsamples", stage_downsamples)
        )
        eps_values = per_stage("stage_eps", stage_eps)
        self.stage_eps = tuple(check_positive(who, "stage_eps", e) for e in (eps_values or (self.eps,) * n))
        grids = per_stage("stage_grids", stage_grids)
        blocks = per_stage("stage_blocks", stage_blocks)
        if self.branch == "conv":
            extra = {
                "stage_grids": stage_grids is not None,
                "stage_blocks": stage_blocks is not None,
                "prefix_tokens": prefix_tokens != 0,
                "token_layout": token_layout != "tokens",
            }
            if any(extra.values()):
                raise ValueError(
                    f"{who}: {[k for k, v in extra.items() if v]} apply to branch='tokens' only; a CNN "
                    "student's stages are maps (branch='conv')."
                )
            self.stage_blocks = None
            self.branches = nn.ModuleList(
                OFAConvBranch(c, d, self.embed_dim, self.num_classes)
                for c, d in zip(self.stage_channels, self.stage_downsamples)
            )
        else:
            if self.token_layout == "nhwc" and (prefix_tokens or stage_grids is not None):
                raise ValueError(
                    f"{who}: token_layout='nhwc' (Swin stages) has no prefix tokens and reads its grid from "
                    "the tensor; drop prefix_tokens and stage_grids."
                )
            if self.embed_dim % self.num_heads:
                raise ValueError(
                    f"{who}: embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}."
                )
            self.stage_blocks = tuple(
                _check_count(who, "stage_blocks", b)
                for b in (blocks or [max(n - i, 1) for i in range(1, n + 1)])
            )
            for layer, c, d in zip(self.stage_layers, self.stage_channels, self.stage_downsamples):
                if c != self.embed_dim and (d == 0 or self.prefix_tokens):
                    why = "its prefix tokens join the merged tokens unprojected" if d else "no patch merging"
                    raise ValueError(
                        f"{who}: stage {layer!r} has {c} channels but embed_dim={self.embed_dim} and {why}; "
                        "a token stage of another width needs stage_downsamples >= 1 and prefix_tokens=0."
                    )
            self.branches = nn.ModuleList(
                OFATokenBranch(
                    c,
                    d,
                    self.embed_dim,
                    self.num_classes,
                    b,
                    self.num_heads,
                    self.prefix_tokens,
                    None if grids is None else tuple(g),
                    self.token_layout,
                )  # fmt: skip
                for c, d, b, g in zip(
                    self.stage_channels, self.stage_downsamples, self.stage_blocks, grids or (None,) * n
                )
            )
        self.student_layers = (student_layer, *self.stage_layers)
        self.teacher_layers = (teacher_layer,)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the branches as the official code (:func:`init_branch_weights`)."""
        init_branch_weights(self.branches)

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """``{"logits": logits_weight * L_OFA(z_s), <stage layer>: branch_weight * L_OFA(branch(F_s)), ...}``."""
        who = "OFA"
        s_logits = require(student, self.student_layers[0], who, "student")
        t_logits = require(teacher, self.teacher_layers[0], who, "teacher")
        if t_logits.ndim != 2 or t_logits.shape[1] != self.num_classes:
            raise ValueError(
                f"OFA was built for num_classes={self.num_classes}, got teacher logits {shape_of(t_logits)}; "
                "set num_classes to the models' class count."
            )
        labels = ofa_class_indices(require_labels(batch, who), *t_logits.shape, who)
        weights: dict[float, Tensor] = {}  # the enhanced target, once per distinct eps

        def loss(logits: Tensor, eps: float) -> Tensor:
            if eps not in weights:
                weights[eps] = ofa_target_weights(t_logits, labels, eps, self.temperature)
            return ofa_cross_entropy(logits, weights[eps], self.temperature)

        out = {"logits": self.logits_weight * loss(s_logits, self.eps)}
        for layer, branch, eps in zip(self.stage_layers, self.branches, self.stage_eps):
            out[layer] = self.branch_weight * loss(branch(require(student, layer, who, "student")), eps)
        return out

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return sum_terms(self.terms(student, teacher, batch))

    def extra_repr(self) -> str:
        tokens = (
            f", prefix_tokens={self.prefix_tokens}, token_layout={self.token_layout!r}, "
            f"stage_blocks={list(self.stage_blocks)}, num_heads={self.num_heads}"
            if self.branch == "tokens"
            else ""
        )
        return (
            f"num_classes={self.num_classes}, stage_layers={list(self.stage_layers)}, "
            f"stage_channels={list(self.stage_channels)}, stage_downsamples={list(self.stage_downsamples)}, "
            f"embed_dim={self.embed_dim}, branch={self.branch!r}{tokens}, eps={self.eps}, "
            f"stage_eps={list(self.stage_eps)}, temperature={self.temperature}, "
            f"logits_weight={self.logits_weight}, branch_weight={self.branch_weight}, " + super().extra_repr()
        )
