"""ScaleKD: cross-attention projectors, dual-view feature mimicking and teacher parameter perception."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningkd.adapters import TokensToMap, map_to_tokens
from lightningkd.distillers.base import OUTPUT, Distiller, Features, require, sum_terms
from lightningkd.functional._helpers import (
    check_choice,
    check_non_negative,
    check_positive,
    check_positive_int,
    shape_of,
)
from lightningkd.functional.scalekd import check_alpha_pair, dct_matrix, scalekd_terms

FeatureLayout = Literal["nchw", "tokens", "nhwc"]
"""How a tapped feature is laid out: a CNN map ``(N, C, H, W)``, ViT tokens ``(N, L, C)`` (prefix tokens
first, then the grid in row-major order) or timm Swin's ``(N, H, W, C)``."""

FEATURE_LAYOUTS: tuple[str, ...] = get_args(FeatureLayout)


def _check_hw(who: str, key: str, value: Sequence[int]) -> tuple[int, int]:
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{who}: {key} must be two positive integers (H, W), e.g. (14, 14), got {value!r}.")
    return (check_positive_int(who, f"{key}[0]", value[0]), check_positive_int(who, f"{key}[1]", value[1]))


class CrossAttentionProjector(nn.Module):
    """ScaleKD's cross-attention projector (CAP): a student map to teacher-like features on a query grid.

    Fan, Li, Liu & Yao, "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers", NeurIPS 2024,
    arXiv:2411.06786; deep-optimization/ScaleKD ``mmcls/models/dis_losses/fmdv2.py`` and ``fmd.py``
    ``AttentionProjector``, ``attention.py`` ``WindowMultiheadPosAttention`` (478a7db). In order:

    1. keys and values: ``x' = ReLU(BN(Conv3x3(x))) + P`` with a learnable positional embedding ``P``
       ``(1, C_s, H, W)`` (zeros, then truncated normal, std 0.02), flattened to ``H*W`` tokens;
    2. queries: a learnable ``nn.Embedding(H_q*W_q, C_t)`` (``self_query=True``; N(0, 1) init), or the
       ``query`` map given to :meth:`forward` (the teacher-parameter-perception output); either goes
       through ``ReLU(Conv1x1(.))``;
    3. multi-head cross-attention without residual: ``q = Linear(query)``, ``k, v = Linear(x')`` (all
       ``-> C_t``, with bias), ``softmax(q k^T * d_head^-0.5 * softmax_scale) v``, then ``Linear(C_t, C_t)``;
    4. ``y = LN(out) + FFN(LN(out))`` with ``FFN = Linear(C_t, 4 C_t) -> ReLU -> Linear(4 C_t, C_t)`` (mmcv's
       ``FFN`` with its identity shortcut).

    Every other weight has PyTorch's default init, as in the official code. Only global attention is
    implemented (``window_shapes=(1, 1)``, the setting of every released config).

    Args:
        in_channels: C_s, the student map's channels.
        out_channels: C_t, the width of the output (and of the query).
        in_hw: ``(H, W)`` of the student map (the positional embedding's fixed size).
        query_hw: ``(H_q, W_q)``, the output grid.
        num_heads: attention heads; must divide ``out_channels``.
        softmax_scale: the extra factor on the attention logits (5 in every released config).
        self_query: learn the queries (stage 3); ``False``: :meth:`forward` needs ``query`` (stage 4).

    Shape:
        ``x (N, C_s, H, W)``, ``query (N, C_t, H_q, W_q)`` -> ``(N, C_t, H_q, W_q)``.

    Example:
        >>> cap = CrossAttentionProjector(in_channels=8, out_channels=12, in_hw=(4, 4), query_hw=(2, 3),
        ...                               num_heads=3)
        >>> cap(torch.randn(2, 8, 4, 4)).shape
        torch.Size([2, 12, 2, 3])
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        in_hw: tuple[int, int],
        query_hw: tuple[int, int],
        num_heads: int,
        softmax_scale: float = 5.0,
        self_query: bool = True,
    ) -> None:
        super().__init__()
        who = "CrossAttentionProjector"
        self.in_channels = check_positive_int(who, "in_channels", in_channels)
        self.out_channels = check_positive_int(who, "out_channels", out_channels)
        self.in_hw = _check_hw(who, "in_hw", in_hw)
        self.query_hw = _check_hw(who, "query_hw", query_hw)
        self.num_heads = check_positive_int(who, "num_heads", num_heads)
        if out_channels % num_heads:
            raise ValueError(
                f"{who}: num_heads={num_heads} must divide out_channels={out_channels} (each head gets "
                "out_channels / num_heads channels)."
            )
        self.softmax_scale = check_positive(who, "softmax_scale", softmax_scale)
        self.self_query = bool(self_query)
        c_s, c_t = in_channels, out_channels
        self.proj_student = nn.Sequential(
            nn.Conv2d(c_s, c_s, kernel_size=3, padding=1), nn.BatchNorm2d(c_s), nn.ReLU()
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, c_s, *self.in_hw))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.query = nn.Embedding(self.query_hw[0] * self.query_hw[1], c_t) if self.self_query else None
        self.proj_query = nn.Sequential(nn.Conv2d(c_t, c_t, kernel_size=1), nn.ReLU())
        self.q = nn.Linear(c_t, c_t)
        self.k = nn.Linear(c_s, c_t)
        self.v = nn.Linear(c_s, c_t)
        self.proj = nn.Linear(c_t, c_t)
        self.norm = nn.LayerNorm(c_t)
        self.ffn = nn.Sequential(nn.Linear(c_t, 4 * c_t), nn.ReLU(), nn.Linear(4 * c_t, c_t))

    def forward(self, x: Tensor, query: Tensor | None = None) -> Tensor:
        who = "CrossAttentionProjector"
        expected = (self.in_channels, *self.in_hw)
        if not torch.is_tensor(x) or x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{who}: expects a student map (N, {expected[0]}, {expected[1]}, {expected[2]}) (its positional "
                f"embedding has that fixed size), got {shape_of(x)}."
            )
        n = x.shape[0]
        if query is None:
            if self.query is None:
                raise ValueError(
                    f"{who}: built with self_query=False, so forward needs the query map "
                    f"(N, {self.out_channels}, {self.query_hw[0]}, {self.query_hw[1]})."
                )
            # (H_q*W_q, C_t) embedding rows in row-major grid order -> (N, C_t, H_q, W_q)
            query = self.query.weight.T.reshape(1, self.out_channels, *self.query_hw).expand(n, -1, -1, -1)
        elif not torch.is_tensor(query) or tuple(query.shape) != (n, self.out_channels, *self.query_hw):
            raise ValueError(
                f"{who}: the query must be (N, C_t, H_q, W_q) = ({n}, {self.out_channels}, {self.query_hw[0]}, "
                f"{self.query_hw[1]}), got {shape_of(query)}."
            )
        keys = map_to_tokens(self.proj_student(x) + self.pos_embed)  # (N, H*W, C_s)
        queries = map_to_tokens(self.proj_query(query))  # (N, H_q*W_q, C_t)
        heads, c_t = self.num_heads, self.out_channels
        q = self.q(queries).unflatten(-1, (heads, c_t // heads)).transpose(1, 2)  # (N, heads, L_q, d)
        k = self.k(keys).unflatten(-1, (heads, c_t // heads)).transpose(1, 2)  # (N, heads, L, d)
        v = self.v(keys).unflatten(-1, (heads, c_t // heads)).transpose(1, 2)
        scale = (c_t // heads) ** -0.5 * self.softmax_scale
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # softmax over the keys, no mask
        out = self.proj(out.transpose(1, 2).flatten(2))  # (N, L_q, C_t); no residual (official)
        out = self.norm(out)
        out = out + self.ffn(out)
        return out.transpose(1, 2).reshape(n, c_t, *self.query_hw)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, in_hw={self.in_hw}, "
            f"query_hw={self.query_hw}, num_heads={self.num_heads}, softmax_scale={self.softmax_scale}, "
            f"self_query={self.self_query}"
        )


def _to_layout(x: Tensor, layout: str) -> Tensor:
    """A ``(N, C, H, W)`` map in ``layout`` (the input layout of the teacher's stages)."""
    if layout == "nchw":
        return x
    if layout == "nhwc":
        return x.permute(0, 2, 3, 1)
    return map_to_tokens(x)


class ScaleKD(Distiller):
    """ScaleKD: a vision transformer teacher's knowledge through projectors, two views and its own stages.

    Fan, Li, Liu & Yao, "ScaleKD: Strong Vision Transformers Could Be Excellent Teachers", NeurIPS 2024,
    arXiv:2411.06786. Authors' code: deep-optimization/ScaleKD (478a7db)
    ``mmcls/models/classifiers/distiller.py`` ``ClassificationDistiller`` (the wiring),
    ``mmcls/models/dis_losses/fmdv2.py`` ``FreqMaskingDistillLossv2`` (CNN/MLP students), ``fmd.py``
    ``FreqMaskingDistillLoss`` (ViT students), ``attention.py``, ``kd.py``, configs
    ``configs/distillers/**``. Three parts:

    - cross-attention projectors (:class:`CrossAttentionProjector`, CAP): the student's map becomes
      keys/values of an attention whose queries live on the teacher's grid with the teacher's width;
    - dual-view feature mimicking (DFM): each projected map is compared with the teacher's final features
      directly (:func:`~lightningkd.functional.scalekd.dfm_loss`) and with each channel's DC (spatial
      mean) removed (:func:`~lightningkd.functional.scalekd.dfm_dc_removed_loss`), each view through its
      own CAP;
    - teacher parameter perception (TPP): the stage-3 CAP's output (the teacher's stage-3 width and grid,
      learned queries) is run through the frozen teacher's own later stage(s) (``teacher_stages``) and
      compared with the teacher's final features (terms ``s3``, ``s3_alt``); those outputs are the
      queries of the stage-4 CAPs, whose outputs are compared with the same features (``s4``,
      ``s4_alt``). ``kd`` (optional) is the soft-target cross-entropy of the logits,
      :func:`~lightningkd.functional.scalekd.scalekd_logit_loss`.

    The teacher's later stages are found by their ``named_modules()`` path in :meth:`attach_teacher`
    (``["layers.3", "norm"]`` for a timm Swin: patch merging, stage 4, final norm; ``["blocks.10",
    "blocks.11", "norm"]`` for a timm ViT; ``["layer4"]`` for a torchvision ResNet) and held in a plain
    attribute: they are not parameters, buffers or submodules of the distiller, so they are never trained,
    optimised or saved with it. :class:`~lightningkd.modules.DistillationModule` calls
    :meth:`attach_teacher` for you; they run with autograd on (the teacher's own forward still runs under
    ``no_grad``), so gradients pass through the frozen stages into the CAPs and the student while the
    teacher's parameters (``requires_grad=False``) get none. The teacher's stages run twice per step (one
    per view), as in the official code.

    The loss weights: every released config uses ``alpha_s3 = alpha_s4 = (0.08, 0.06)`` (Swin-S ->
    ResNet-50: ``alpha_s4=(0.08, 0.0)`` and no ``kd``), ``softmax_scale=(5, 5)``, ``kd_alpha=0.5``,
    ``temperature=1``, and the distiller's ``weight`` is 1. The official code multiplies the student's
    cross-entropy by ``1 - kd_alpha = 0.5`` when ``kd`` is on: set the module's ``task_weight: 0.5``.

    Departures from the official code:

    - layouts are explicit arguments and converted with :mod:`lightningkd.adapters` (the official code
      reads mmcls backbones, whose ViT and Swin outputs are already ``(N, C, H, W)``);
    - the DCT uses one matrix per axis, so ``H != W`` works (the official code builds one ``H x H``
      matrix and assumes ``H = W``; for square maps the two are the same); the matrices are built once per
      device (not at every call) and the DC coefficient is zeroed out of place;
    - the stage-3 CAPs always use their learned queries and the stage-4 CAPs always take the TPP
      outputs (what the official wiring does whatever ``self_query`` says), so the stage-4 CAPs hold no
      unused query embedding;
    - only global attention (the released ``window_shapes=(1, 1)``); ``num_heads`` must divide the
      width (the official reshape would fail otherwise);
    - ``kd`` uses ``log_softmax`` (the official ``log(softmax)`` can give ``-inf``); half-precision
      features are promoted to float32 for the DFM terms;
    - the official code runs the teacher's stages through ``forward_specific_stage``, a method it adds to
      its mmcls backbones with hard-coded 224-pixel grids; here they are the teacher's own modules named by
      path and run in order, and every size is an argument, checked at each call;
    - the ``is_vit=True`` wiring of ``distiller.py`` (the stage-4 projections also run through the
      teacher's last block) is set by no released config and is not implemented.

    Args:
        student_s3_layer: the student's stage-3 layer (``layer3`` of a ResNet-50, ``blocks.8`` of a ViT).
        student_s4_layer: the student's stage-4 layer (``layer4``; ``norm`` of a ViT).
        teacher_layer: the teacher's final features (``norm`` of a timm Swin or ViT, ``layer4`` of a ResNet).
        teacher_stages: ``named_modules()`` paths of the teacher's later stage(s) that TPP runs, in order.
        student_s3_channels: C of the student's stage-3 features (1024 for ResNet-50).
        student_s4_channels: C of the student's stage-4 features (2048 for ResNet-50).
        teacher_s3_channels: the width the teacher's stages take (768: Swin-L's stage 3).
        teacher_channels: the width of the teacher's final features (1536: Swin-L).
        student_s3_hw: the student's stage-3 grid (14x14 at 224 px, stride 16).
        student_s4_hw: the student's stage-4 grid (7x7 for ResNet-50; 14x14 for ViT-B/16).
        teacher_s3_hw: the grid the teacher's stages take, the stage-3 CAPs' query grid (14x14).
        teacher_hw: the grid of the teacher's final features, the stage-4 CAPs' query grid (7x7).
        num_heads_s3: attention heads of the stage-3 CAPs (16 for Swin-L's 768; official default 8).
        num_heads_s4: attention heads of the stage-4 CAPs (24 for 1536).
        softmax_scale: the attention-logit factor of the ``(direct, DC-removed)`` CAPs (5, 5).
        alpha_s3: stage-3 ``(direct, DC-removed)`` coefficients.
        alpha_s4: stage-4 ``(direct, DC-removed)`` coefficients.
        kd_alpha: the logit term's coefficient; 0 drops the term (and the logits are not read).
        temperature: the logit term's temperature.
        student_layout: ``"nchw"``, ``"tokens"`` or ``"nhwc"``, of both student layers.
        student_prefix_tokens: class/distillation tokens before the student's grid (``"tokens"`` only).
        teacher_layout: layout of ``teacher_layer``.
        teacher_prefix_tokens: class/distillation tokens of ``teacher_layer`` (``"tokens"`` only).
        stage_layout: the layout the teacher's stages take and return (``"nhwc"`` for a timm Swin,
            ``"tokens"`` for a ViT (run without prefix tokens, as the official code), ``"nchw"`` for a CNN).
        student_logits_layer: where the student's logits are read (``kd`` only).
        teacher_logits_layer: where the teacher's logits are read (``kd`` only).
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        the student's layers ``(N, C_s, H, W)`` maps, ``(N, P + H*W, C_s)`` tokens or ``(N, H, W, C_s)``;
        the teacher's final features likewise with ``teacher_channels`` and ``teacher_hw``; logits
        ``(N, K)``.

    Returns:
        the unweighted 0-dim sum of the terms ``s3, s3_alt, s4, s4_alt`` (and ``kd``) from
        :meth:`forward`; :meth:`terms` gives them apart.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> teacher = nn.Sequential()
        >>> teacher.add_module("stage", nn.Conv2d(6, 8, 3, stride=2, padding=1))  # 4x4 -> 2x2
        >>> kd = ScaleKD(student_s3_layer="s3", student_s4_layer="s4", teacher_layer="t", teacher_stages=["stage"],
        ...              student_s3_channels=4, student_s4_channels=5, teacher_s3_channels=6, teacher_channels=8,
        ...              student_s3_hw=(4, 4), student_s4_hw=(2, 2), teacher_s3_hw=(4, 4), teacher_hw=(2, 2),
        ...              num_heads_s3=2, num_heads_s4=2, kd_alpha=0.0, teacher_layout="nchw", stage_layout="nchw")
        >>> kd.attach_teacher(teacher.requires_grad_(False))
        >>> s = {"s3": torch.randn(2, 4, 4, 4), "s4": torch.randn(2, 5, 2, 2)}
        >>> list(kd.terms(s, {"t": torch.randn(2, 8, 2, 2)}))
        ['s3', 's3_alt', 's4', 's4_alt']
    """

    def __init__(
        self,
        *,
        student_s3_layer: str = "layer3",
        student_s4_layer: str = "layer4",
        teacher_layer: str = "norm",
        teacher_stages: Sequence[str] = ("layers.3", "norm"),
        student_s3_channels: int = 1024,
        student_s4_channels: int = 2048,
        teacher_s3_channels: int = 768,
        teacher_channels: int = 1536,
        student_s3_hw: tuple[int, int] = (14, 14),
        student_s4_hw: tuple[int, int] = (7, 7),
        teacher_s3_hw: tuple[int, int] = (14, 14),
        teacher_hw: tuple[int, int] = (7, 7),
        num_heads_s3: int = 16,
        num_heads_s4: int = 24,
        softmax_scale: tuple[float, float] = (5.0, 5.0),
        alpha_s3: tuple[float, float] = (0.08, 0.06),
        alpha_s4: tuple[float, float] = (0.08, 0.06),
        kd_alpha: float = 0.5,
        temperature: float = 1.0,
        student_layout: FeatureLayout = "nchw",
        student_prefix_tokens: int = 0,
        teacher_layout: FeatureLayout = "nhwc",
        teacher_prefix_tokens: int = 0,
        stage_layout: FeatureLayout = "nhwc",
        student_logits_layer: str = OUTPUT,
        teacher_logits_layer: str = OUTPUT,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        who = "ScaleKD"
        for key, value in (
            ("student_s3_layer", student_s3_layer),
            ("student_s4_layer", student_s4_layer),
            ("teacher_layer", teacher_layer),
            ("student_logits_layer", student_logits_layer),
            ("teacher_logits_layer", teacher_logits_layer),
        ):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{who}: {key} must be a non-empty layer name, got {value!r}.")
        if (
            isinstance(teacher_stages, str)
            or not isinstance(teacher_stages, Sequence)
            or not teacher_stages
            or any(not isinstance(n, str) or not n for n in teacher_stages)
        ):
            raise ValueError(
                f"{who}: teacher_stages must be a non-empty list of the teacher's module paths, e.g. "
                f"['layers.3', 'norm'] (timm Swin) or ['layer4'] (ResNet), got {teacher_stages!r}."
            )
        self.student_s3_layer, self.student_s4_layer = student_s3_layer, student_s4_layer
        self.teacher_layer = teacher_layer
        self.teacher_stages = tuple(teacher_stages)
        self.student_s3_channels = check_positive_int(who, "student_s3_channels", student_s3_channels)
        self.student_s4_channels = check_positive_int(who, "student_s4_channels", student_s4_channels)
        self.teacher_s3_channels = check_positive_int(who, "teacher_s3_channels", teacher_s3_channels)
        self.teacher_channels = check_positive_int(who, "teacher_channels", teacher_channels)
        self.student_s3_hw = _check_hw(who, "student_s3_hw", student_s3_hw)
        self.student_s4_hw = _check_hw(who, "student_s4_hw", student_s4_hw)
        self.teacher_s3_hw = _check_hw(who, "teacher_s3_hw", teacher_s3_hw)
        self.teacher_hw = _check_hw(who, "teacher_hw", teacher_hw)
        self.num_heads_s3 = check_positive_int(who, "num_heads_s3", num_heads_s3)
        self.num_heads_s4 = check_positive_int(who, "num_heads_s4", num_heads_s4)
        for key, heads, width in (
            ("num_heads_s3", num_heads_s3, teacher_s3_channels),
            ("num_heads_s4", num_heads_s4, teacher_channels),
        ):
            if width % heads:
                raise ValueError(
                    f"{who}: {key}={heads} must divide the CAP's width {width} "
                    f"({'teacher_s3_channels' if key.endswith('s3') else 'teacher_channels'})."
                )
        if (
            isinstance(softmax_scale, str)
            or not isinstance(softmax_scale, Sequence)
            or len(softmax_scale) != 2
        ):
            raise ValueError(
                f"{who}: softmax_scale must be two numbers (direct-view CAP, DC-removed-view CAP), e.g. (5.0, 5.0), "
                f"got {softmax_scale!r}."
            )
        self.softmax_scale = tuple(
            check_positive(who, f"softmax_scale[{i}]", v) for i, v in enumerate(softmax_scale)
        )
        self.alpha_s3 = check_alpha_pair(who, "alpha_s3", alpha_s3)
        self.alpha_s4 = check_alpha_pair(who, "alpha_s4", alpha_s4)
        self.kd_alpha = check_non_negative(who, "kd_alpha", kd_alpha)
        self.temperature = check_positive(who, "temperature", temperature)
        self.student_layout = check_choice(who, "student_layout", student_layout, FEATURE_LAYOUTS)
        self.teacher_layout = check_choice(who, "teacher_layout", teacher_layout, FEATURE_LAYOUTS)
        self.stage_layout = check_choice(who, "stage_layout", stage_layout, FEATURE_LAYOUTS)
        for key, value, layout in (
            ("student_prefix_tokens", student_prefix_tokens, student_layout),
            ("teacher_prefix_tokens", teacher_prefix_tokens, teacher_layout),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{who}: {key} must be an integer >= 0, got {value!r}.")
            if value and layout != "tokens":
                raise ValueError(
                    f"{who}: {key}={value} applies to layout 'tokens' only, the layout is {layout!r}."
                )
        self.student_prefix_tokens, self.teacher_prefix_tokens = student_prefix_tokens, teacher_prefix_tokens
        self.student_logits_layer, self.teacher_logits_layer = student_logits_layer, teacher_logits_layer

        self.student_layers = (student_s3_layer, student_s4_layer)
        self.teacher_layers = (teacher_layer,)
        if self.kd_alpha > 0:
            self.student_layers += (student_logits_layer,)
            self.teacher_layers += (teacher_logits_layer,)

        def cap(stage: int, view: int) -> CrossAttentionProjector:
            if stage == 3:
                sizes = (student_s3_channels, teacher_s3_channels, self.student_s3_hw, self.teacher_s3_hw)
            else:
                sizes = (student_s4_channels, teacher_channels, self.student_s4_hw, self.teacher_hw)
            return CrossAttentionProjector(
                in_channels=sizes[0],
                out_channels=sizes[1],
                in_hw=sizes[2],
                query_hw=sizes[3],
                num_heads=num_heads_s3 if stage == 3 else num_heads_s4,
                softmax_scale=self.softmax_scale[view],
                self_query=stage == 3,
            )

        self.cap_s3, self.cap_s3_alt = cap(3, 0), cap(3, 1)
        self.cap_s4, self.cap_s4_alt = cap(4, 0), cap(4, 1)
        # the DCT matrices of the teacher's grid per (device, dtype): a plain cache, not buffers, so that a
        # half-precision model (.to(bfloat16)) does not round them and checkpoints do not hold them
        self._dct_cache: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}
        self.student_s3_to_map = self._to_map(student_layout, student_prefix_tokens, self.student_s3_hw)
        self.student_s4_to_map = self._to_map(student_layout, student_prefix_tokens, self.student_s4_hw)
        self.teacher_to_map = self._to_map(teacher_layout, teacher_prefix_tokens, self.teacher_hw)
        self.stage_to_map = self._to_map(stage_layout, 0, self.teacher_hw)
        # the teacher's later stages, set by attach_teacher: a plain tuple, never registered as submodules
        self._stage_modules: tuple[nn.Module, ...] | None = None

    @staticmethod
    def _to_map(layout: str, prefix_tokens: int, grid: tuple[int, int]) -> nn.Module:
        if layout == "nchw":
            return nn.Identity()
        if layout == "nhwc":
            return TokensToMap(layout="nhwc")
        return TokensToMap(prefix_tokens=prefix_tokens, grid=grid)

    # ---- the teacher's later stages ---------------------------------------------------------------------
    def attach_teacher(self, teacher: nn.Module) -> None:
        """Look up :attr:`teacher_stages` in the frozen ``teacher`` and keep them (unregistered) for TPP.

        Args:
            teacher: the frozen teacher model (``requires_grad=False`` on the stages' parameters).

        Raises:
            ValueError: a path that is not a module of ``teacher`` (the message lists close and top-level
                names), or a stage with trainable parameters.
        """
        modules = dict(teacher.named_modules())
        unknown = [n for n in self.teacher_stages if n not in modules or n == ""]
        if unknown:
            names = [n for n in modules if n]
            close = sorted({m for n in unknown for m in difflib.get_close_matches(n, names, n=5, cutoff=0.5)})
            top = [n for n in names if n.count(".") <= 1]
            raise ValueError(
                f"ScaleKD: teacher_stages names {unknown}, not module(s) of the teacher "
                f"({type(teacher).__name__}). Close names: {close}; top-level paths: {top[:80]}"
                f"{' ...' if len(top) > 80 else ''}. `lightningkd layers` prints them all."
            )
        stages = tuple(modules[n] for n in self.teacher_stages)
        trainable = [
            f"{n}.{p}"
            for n, m in zip(self.teacher_stages, stages)
            for p, t in m.named_parameters()
            if t.requires_grad
        ]
        if trainable:
            raise ValueError(
                f"ScaleKD: the teacher's stages have trainable parameters (e.g. {trainable[:3]}); freeze the "
                "teacher first (teacher.requires_grad_(False).eval(); DistillationModule does this), so TPP "
                "gradients reach the student but never the teacher."
            )
        self._stage_modules = stages

    def run_teacher_stages(self, x: Tensor) -> Tensor:
        """Run the attached teacher stages on a stage-3 CAP output (TPP), with autograd on.

        Args:
            x: ``(N, teacher_s3_channels, *teacher_s3_hw)`` map.

        Returns:
            ``(N, teacher_channels, *teacher_hw)`` map.
        """
        if self._stage_modules is None:
            raise RuntimeError(
                f"ScaleKD runs the teacher's later stage(s) {list(self.teacher_stages)} (teacher parameter "
                "perception) but has no teacher: the distillation modules call attach_teacher(teacher) for you; "
                "when you call ScaleKD yourself, call scalekd.attach_teacher(teacher) once first."
            )
        y = _to_layout(x, self.stage_layout)
        try:
            for stage in self._stage_modules:
                y = stage(y)
        except (RuntimeError, ValueError, AssertionError, IndexError) as err:
            raise RuntimeError(
                f"ScaleKD: the teacher's stages {list(self.teacher_stages)} failed on the stage-3 CAP output "
                f"{tuple(x.shape)} given in layout {self.stage_layout!r} ({err}). Check teacher_s3_channels and "
                "teacher_s3_hw (the input those stages take) and stage_layout."
            ) from err
        try:
            out = self.stage_to_map(y)
        except ValueError as err:
            raise ValueError(
                f"ScaleKD: the teacher's stages {list(self.teacher_stages)} returned {shape_of(y)}, which is not "
                f"a {self.stage_layout!r} output on the {self.teacher_hw} grid ({err})."
            ) from err
        expected = (x.shape[0], self.teacher_channels, *self.teacher_hw)
        if tuple(out.shape) != expected:
            raise ValueError(
                f"ScaleKD: the teacher's stages {list(self.teacher_stages)} turned the CAP output {tuple(x.shape)} "
                f"into {tuple(out.shape)} (as a map), but the teacher's final features are {expected}: check "
                "teacher_stages (the stages after the teacher's stage 3, up to its final features), "
                "teacher_channels and teacher_hw."
            )
        return out

    # ---- features -------------------------------------------------------------------------------------
    def _read_map(
        self,
        features: Features,
        layer: str,
        side: str,
        what: str,
        layout: str,
        prefix: int,
        to_map: Callable[[Tensor], Tensor],
        channels: int,
        hw: tuple[int, int],
        sizes: str,
    ) -> Tensor:
        x = require(features, layer, "ScaleKD", side)
        ndim = 3 if layout == "tokens" else 4
        expected_text = {
            "nchw": f"(N, {channels}, {hw[0]}, {hw[1]})",
            "nhwc": f"(N, {hw[0]}, {hw[1]}, {channels})",
            "tokens": f"(N, {prefix} + {hw[0]}*{hw[1]}, {channels}) = (N, {prefix + hw[0] * hw[1]}, {channels})",
        }[layout]
        problem = not torch.is_tensor(x) or x.ndim != ndim
        if not problem:
            got = tuple(x.shape[1:])
            problem = (
                got
                != {
                    "nchw": (channels, *hw),
                    "nhwc": (*hw, channels),
                    "tokens": (prefix + hw[0] * hw[1], channels),
                }[layout]
            )
        if problem:
            raise ValueError(
                f"ScaleKD: the {what} {layer!r} are {shape_of(x)}, but this ScaleKD was built for {expected_text} "
                f"({sizes}, layout {layout!r}): the CAPs' positional embeddings and queries have fixed sizes. "
                "Feed the models the input size the recipe was written for (e.g. 224x224, where stride 16 gives "
                "14x14), or set the sizes and layout to these features."
            )
        return to_map(x)

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        s_prefix, t_prefix = self.student_prefix_tokens, self.teacher_prefix_tokens
        s3 = self._read_map(
            student, self.student_s3_layer, "student", "student's stage-3 features", self.student_layout,
            s_prefix, self.student_s3_to_map, self.student_s3_channels, self.student_s3_hw,
            "student_s3_channels, student_s3_hw",
        )  # fmt: skip
        s4 = self._read_map(
            student, self.student_s4_layer, "student", "student's stage-4 features", self.student_layout,
            s_prefix, self.student_s4_to_map, self.student_s4_channels, self.student_s4_hw,
            "student_s4_channels, student_s4_hw",
        )  # fmt: skip
        t = self._read_map(
            teacher, self.teacher_layer, "teacher", "teacher's final features", self.teacher_layout,
            t_prefix, self.teacher_to_map, self.teacher_channels, self.teacher_hw,
            "teacher_channels, teacher_hw",
        )  # fmt: skip
        if s3.shape[0] != t.shape[0] or s4.shape[0] != t.shape[0]:
            raise ValueError(
                f"ScaleKD: batch sizes differ: student stage 3 {tuple(s3.shape)}, stage 4 {tuple(s4.shape)}, "
                f"teacher {tuple(t.shape)}."
            )
        logits: dict[str, Tensor] = {}
        if self.kd_alpha > 0:
            logits = {
                "student_logits": require(student, self.student_logits_layer, "ScaleKD", "student"),
                "teacher_logits": require(teacher, self.teacher_logits_layer, "ScaleKD", "teacher"),
            }
        return scalekd_terms(
            s3,
            s4,
            t,
            cap_s3=self.cap_s3,
            cap_s3_alt=self.cap_s3_alt,
            cap_s4=self.cap_s4,
            cap_s4_alt=self.cap_s4_alt,
            teacher_stage=self.run_teacher_stages,
            alpha_s3=self.alpha_s3,
            alpha_s4=self.alpha_s4,
            kd_alpha=self.kd_alpha,
            temperature=self.temperature,
            **self.dct_matrices(t),
            **logits,
        )

    def dct_matrices(self, like: Tensor) -> dict[str, Tensor]:
        """The DCT-II matrices of :attr:`teacher_hw` (one per axis) and their inverses, built once per device
        and dtype (at least float32) and cached.

        Args:
            like: a tensor on the device, and in the dtype family, the DFM terms compute in.

        Returns:
            ``{"dct_h", "dct_w", "idct_h", "idct_w"}`` for :func:`~lightningkd.functional.scalekd.scalekd_terms`.
        """
        dtype = like.dtype if like.dtype == torch.float64 else torch.float32
        key = (like.device, dtype)
        if key not in self._dct_cache:
            h, w = self.teacher_hw
            self._dct_cache[key] = {
                "dct_h": dct_matrix(h, dtype=dtype, device=like.device),
                "dct_w": dct_matrix(w, dtype=dtype, device=like.device),
                "idct_h": dct_matrix(h, inverse=True, dtype=dtype, device=like.device),
                "idct_w": dct_matrix(w, inverse=True, dtype=dtype, device=like.device),
            }
        return self._dct_cache[key]

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return sum_terms(self.terms(student, teacher, batch))

    def extra_repr(self) -> str:
        return (
            f"student_s3_layer={self.student_s3_layer!r}, student_s4_layer={self.student_s4_layer!r}, "
            f"teacher_layer={self.teacher_layer!r}, teacher_stages={list(self.teacher_stages)}, "
            f"student_s3_channels={self.student_s3_channels}, student_s4_channels={self.student_s4_channels}, "
            f"teacher_s3_channels={self.teacher_s3_channels}, teacher_channels={self.teacher_channels}, "
            f"student_s3_hw={self.student_s3_hw}, student_s4_hw={self.student_s4_hw}, "
            f"teacher_s3_hw={self.teacher_s3_hw}, teacher_hw={self.teacher_hw}, num_heads_s3={self.num_heads_s3}, "
            f"num_heads_s4={self.num_heads_s4}, softmax_scale={self.softmax_scale}, alpha_s3={self.alpha_s3}, "
            f"alpha_s4={self.alpha_s4}, kd_alpha={self.kd_alpha}, temperature={self.temperature}, "
            f"student_layout={self.student_layout!r}, student_prefix_tokens={self.student_prefix_tokens}, "
            f"teacher_layout={self.teacher_layout!r}, teacher_prefix_tokens={self.teacher_prefix_tokens}, "
            f"stage_layout={self.stage_layout!r}, student_logits_layer={self.student_logits_layer!r}, "
            f"teacher_logits_layer={self.teacher_logits_layer!r}, " + super().extra_repr()
        )
