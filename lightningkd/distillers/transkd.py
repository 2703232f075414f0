"""TransKD: cross selective fusion of the student's stages, HCL against the teacher's, patch-embedding alignment."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningkd.adapters import ChannelProjection, map_to_tokens, resample_to
from lightningkd.adapters.resample import MODES as RESAMPLE_MODES
from lightningkd.adapters.resample import ResampleMode
from lightningkd.distillers.base import Distiller, Features, require, sum_terms
from lightningkd.functional._helpers import check_choice, check_non_negative, check_positive_int, shape_of
from lightningkd.functional.transkd import PEA_WEIGHTS, transkd_fuse, transkd_terms

SEGFORMER_STAGES: tuple[str, ...] = ("backbone:0", "backbone:1", "backbone:2", "backbone:3")
"""The four stage maps ``(N, C_i, H/2^(i+1), W/2^(i+1))`` of an mmseg SegFormer (``MixVisionTransformer``
returns them as a list)."""

SEGFORMER_EMBEDDINGS: tuple[str, ...] = tuple(f"backbone.layers.{i}.0:0" for i in range(4))
"""The four patch embeddings ``(N, N_i, C_i)`` of an mmseg SegFormer, after the patch embedding's
LayerNorm: entry 0 of the ``(tokens, hw_shape)`` that stage ``i``'s ``PatchEmbed`` returns (the same
tensor as the output of ``backbone.layers.{i}.0.norm``)."""

EmbeddingLayout = Literal["tokens", "map"]
"""How the student's embeddings arrive: ``(N, L, C)`` tokens (a transformer's patch embeddings) or a
``(N, C, H, W)`` map (a CNN stage standing in for them)."""

EMBEDDING_LAYOUTS: tuple[str, ...] = get_args(EmbeddingLayout)


class SelectiveFusion(nn.Module):
    """One stage of cross selective fusion: reduce to ``mid_channels``, fuse with the deeper stage, expand.

    As ``SK`` in the official ``train/CSF.py``: ``x = BN(Conv1x1(S_i))``; for all but the deepest stage
    ``y`` = the deeper stage's fused map (nearest-resized to ``x``), ``s = GAP(x + y)``,
    ``z = ReLU(BN(Conv1x1(s)))`` with ``max(mid_channels // 16, 32)`` channels, two ``Conv1x1`` heads (with
    bias) give the branch logits and :func:`~lightningkd.functional.transkd_fuse` the fused
    ``a_x x + a_y y``; the output is ``BN(Conv3x3(x))`` with the teacher's channels, and ``x`` is passed to
    the next shallower stage. Both convolutions of the main path start from Kaiming-uniform with ``a=1``,
    the rest from PyTorch's defaults. Attribute names follow the official module (``conv1``, ``conv2``,
    ``fc``, ``fcs``).

    The official module switches to a separate Conv1x1 + ReLU without BatchNorm (other weights, ``fc1``)
    when the batch holds one image, where BatchNorm over the pooled ``(1, C, 1, 1)`` descriptor is
    undefined. This port has no such branch: a one-image batch in training mode raises a ValueError (train
    with at least two images per device); in eval mode BatchNorm's running statistics serve any batch.

    Args:
        in_channels: the student stage's channels.
        mid_channels: the fused width (official 64).
        out_channels: the teacher stage's channels.
        fuse: fuse with the deeper stage (every stage but the deepest).

    Shape:
        ``x`` ``(N, in_channels, H, W)``, ``residual`` ``(N, mid_channels, H', W')`` -> output
        ``(N, out_channels, H, W)`` and fused ``(N, mid_channels, H, W)``.

    Example:
        >>> import torch
        >>> stage = SelectiveFusion(8, 16, 12, fuse=True)
        >>> out, fused = stage(torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3))
        >>> out.shape, fused.shape
        (torch.Size([2, 12, 6, 6]), torch.Size([2, 16, 6, 6]))
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        for key, value in (
            ("in_channels", in_channels),
            ("mid_channels", mid_channels),
            ("out_channels", out_channels),
        ):
            check_positive_int("SelectiveFusion", key, value)
        self.in_channels, self.mid_channels, self.out_channels = in_channels, mid_channels, out_channels
        self.fuse = bool(fuse)
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        if self.fuse:
            hidden = max(
                mid_channels // 16, 32
            )  # official SK: len = max(mid // reduce, len), reduce 16, len 32
            self.fc = nn.Sequential(
                nn.Conv2d(mid_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
            )
            self.fcs = nn.ModuleList([nn.Conv2d(hidden, mid_channels, 1) for _ in range(2)])
        # official SK: Kaiming-uniform (a=1) on the two main convolutions, PyTorch's defaults elsewhere
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def branch_logits(self, x: Tensor, y: Tensor) -> Tensor:
        """The ``(N, 2, mid_channels, 1, 1)`` logits of the two branches from ``GAP(x + y)``."""
        if self.training and x.shape[0] == 1:
            raise ValueError(
                "TransKD's cross selective fusion applies BatchNorm to the pooled (N, C, 1, 1) descriptor, which "
                "needs at least 2 images per batch in training; got a batch of 1. Use batch_size >= 2 per device "
                "(the official code switches to a separate un-normalised branch for one image; this port does not)."
            )
        z = self.fc(F.adaptive_avg_pool2d(x + y, 1))
        return torch.stack([head(z) for head in self.fcs], dim=1)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"SelectiveFusion expects a (N, {self.in_channels}, H, W) map, got {shape_of(x)}; check the "
                "student channels given to TransKD."
            )
        x = self.conv1(x)
        if self.fuse:
            if residual is None:
                raise ValueError("SelectiveFusion(fuse=True) needs the deeper stage's fused map as residual.")
            y = resample_to(residual, tuple(x.shape[-2:]), "nearest")
            x, _ = transkd_fuse(x, y, self.branch_logits(x, y))
        return self.conv2(x), x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, mid_channels={self.mid_channels}, out_channels={self.out_channels}, fuse={self.fuse}"


class CrossSelectiveFusion(nn.Module):
    """TransKD's CSF: the student's stage maps, fused from the deepest to the shallowest, in teacher channels.

    One :class:`SelectiveFusion` per stage (``SKF`` in the official ``train/CSF.py``). The deepest stage
    only reduces and expands; each shallower stage fuses its reduced map with the fused map of the stage
    below it. The outputs come back shallow to deep, each at its student stage's size with the teacher
    stage's channels.

    Args:
        student_channels: the student stages' channels, shallow to deep.
        teacher_channels: the teacher stages' channels, one per student stage.
        mid_channels: the fused width (official 64).

    Shape:
        stage ``i``: ``(N, student_channels[i], H_i, W_i)`` -> ``(N, teacher_channels[i], H_i, W_i)``.

    Example:
        >>> import torch
        >>> csf = CrossSelectiveFusion(student_channels=[4, 8], teacher_channels=[6, 12], mid_channels=8)
        >>> [tuple(o.shape) for o in csf([torch.randn(2, 4, 8, 10), torch.randn(2, 8, 4, 5)])]
        [(2, 6, 8, 10), (2, 12, 4, 5)]
    """

    def __init__(
        self, student_channels: Sequence[int], teacher_channels: Sequence[int], mid_channels: int = 64
    ) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels) or not len(student_channels):
            raise ValueError(
                f"CrossSelectiveFusion: one teacher channel count per student stage, got student_channels="
                f"{list(student_channels)} and teacher_channels={list(teacher_channels)}."
            )
        last = len(student_channels) - 1
        self.stages = nn.ModuleList(
            SelectiveFusion(s, mid_channels, t, fuse=i < last)
            for i, (s, t) in enumerate(zip(student_channels, teacher_channels))
        )

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        if len(maps) != len(self.stages):
            raise ValueError(
                f"CrossSelectiveFusion was built for {len(self.stages)} stages, got {len(maps)} maps."
            )
        out, residual = self.stages[-1](maps[-1])
        outputs = [out]
        for i in range(len(maps) - 2, -1, -1):
            out, residual = self.stages[i](maps[i], residual)
            outputs.insert(0, out)
        return outputs


class TransKD(Distiller):
    """TransKD-Base: HCL between the cross-selectively fused student stages and the teacher's, plus PEA.

    Liu, Yang, Roitberg, Zhang, Peng, Liu, Wang & Stiefelhagen, "TransKD: Transformer Knowledge Distillation for
    Efficient Semantic Segmentation", IEEE T-ITS 2024, arXiv:2202.13393. Official code: RuipingL/TransKD
    (39ab795) ``train/CSF.py``, ``train/train_TransKDBase.py``, ``train/models/Segformer4EmbeddingKD.py``.

    Two terms (:meth:`terms`):

    - ``"hcl"``: :class:`CrossSelectiveFusion` turns the student's stage maps into maps with the teacher's
      channels (fused from the deepest stage to the shallowest, 64 channels in between); each is resized
      to its teacher map's size with :func:`lightningkd.adapters.resample_to` (``resize_mode``; a no-op
      when the sizes agree, as for SegFormer pairs) and compared with it by the hierarchical context loss
      (:func:`~lightningkd.functional.transkd_hcl_loss`), times ``hcl_weight``.
    - ``"pea"`` (patch-embedding alignment): each student patch embedding goes through its own linear
      projection (:class:`lightningkd.adapters.ChannelProjection`, PyTorch's default init as the official
      ``nn.Linear``) and is compared with the teacher's patch embedding (after its LayerNorm) by a mean
      squared error, weighted per stage (:func:`~lightningkd.functional.transkd_pea_loss`). Off when the
      embedding layers are ``None`` (a CNN teacher has no patch embeddings).

    Total of the official script: ``CE + 1.0 * HCL + PEA``, i.e. this distiller with ``weight=1``.

    Cross-architecture use (not in the paper): the student and teacher stages may have different sizes,
    e.g. a CNN with output stride 8 (strides 4, 8, 8, 8) against SegFormer (4, 8, 16, 32): the fused maps
    are resized to the teacher's. A CNN *student* can still take part in PEA with
    ``embedding_layout="map"``: its embedding maps are projected, resized to the grid of the teacher's
    stage map with the same index (SegFormer's patch embedding ``i`` and stage ``i`` share a grid, read
    from the map, so non-square crops work) and flattened with :func:`lightningkd.adapters.map_to_tokens`.

    Departures from the official code: the batch-of-one branch of the fusion is not ported (a one-image
    training batch raises, see :class:`SelectiveFusion`); the ERFNet class weights of the official
    cross-entropy belong to the task loss, not to this distiller; the CSF modules are here, next to the
    loss, instead of wrapping the student.

    SegFormer layer names (mmseg ``MixVisionTransformer``): stage maps ``backbone:0`` ... ``backbone:3``,
    patch embeddings ``backbone.layers.0.0:0`` ... ``backbone.layers.3.0:0`` (the defaults).

    Args:
        student_stages: the student's stage maps, shallow to deep.
        teacher_stages: the teacher's stage maps, one per student stage.
        student_channels: channels of each student stage (MiT-B0: 32, 64, 160, 256).
        teacher_channels: channels of each teacher stage (MiT-B2: 64, 128, 320, 512).
        student_embeddings: the student's patch embeddings (``None``: no PEA).
        teacher_embeddings: the teacher's patch embeddings, one per student embedding (``None``: no PEA).
        student_embedding_channels: channels of each student embedding; ``None``: the first stage
            channels (SegFormer's embedding ``i`` has stage ``i``'s width).
        teacher_embedding_channels: channels of each teacher embedding; ``None``: the first stage channels.
        embedding_layout: ``"tokens"`` (``(N, L, C)`` student embeddings) or ``"map"`` (``(N, C, H, W)``).
        embedding_weights: PEA's weight per embedding stage (official 0.1, 0.1, 0.5, 1.0).
        hcl_weight: factor of the HCL term (official ``--review-kd-loss-weight`` 1.0).
        mid_channels: width of the fusion (official 64).
        resize_mode: how fused maps (and ``"map"`` embeddings) are resized to the teacher's sizes.
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student stage ``i`` ``(N, C_s_i, H_s_i, W_s_i)``, teacher stage ``i`` ``(N, C_t_i, H_t_i, W_t_i)``;
        embeddings ``(N, L_i, C_i)`` tokens (student ``(N, C_i, H, W)`` with ``embedding_layout="map"``).

    Returns:
        the unweighted 0-dim loss ``hcl + pea`` from :meth:`forward`.

    Example:
        >>> import torch
        >>> kd = TransKD(student_stages=["s1", "s2"], teacher_stages=["t1", "t2"], student_channels=[4, 8],
        ...              teacher_channels=[6, 12], student_embeddings=["e1", "e2"],
        ...              teacher_embeddings=["f1", "f2"], embedding_weights=[0.5, 1.0])
        >>> s = {"s1": torch.randn(2, 4, 8, 10), "s2": torch.randn(2, 8, 4, 5),
        ...      "e1": torch.randn(2, 80, 4), "e2": torch.randn(2, 20, 8)}
        >>> t = {"t1": torch.randn(2, 6, 8, 10), "t2": torch.randn(2, 12, 4, 5),
        ...      "f1": torch.randn(2, 80, 6), "f2": torch.randn(2, 20, 12)}
        >>> list(kd.terms(s, t)), kd(s, t).ndim
        (['hcl', 'pea'], 0)
    """

    def __init__(
        self,
        *,
        student_stages: Sequence[str] = SEGFORMER_STAGES,
        teacher_stages: Sequence[str] = SEGFORMER_STAGES,
        student_channels: Sequence[int] = (32, 64, 160, 256),
        teacher_channels: Sequence[int] = (64, 128, 320, 512),
        student_embeddings: Sequence[str] | None = SEGFORMER_EMBEDDINGS,
        teacher_embeddings: Sequence[str] | None = SEGFORMER_EMBEDDINGS,
        student_embedding_channels: Sequence[int] | None = None,
        teacher_embedding_channels: Sequence[int] | None = None,
        embedding_layout: EmbeddingLayout = "tokens",
        embedding_weights: Sequence[float] = PEA_WEIGHTS,
        hcl_weight: float = 1.0,
        mid_channels: int = 64,
        resize_mode: ResampleMode = "bilinear",
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        who = "TransKD"
        self.student_stages = _names(who, "student_stages", student_stages)
        self.teacher_stages = _names(who, "teacher_stages", teacher_stages)
        self.student_channels = _sizes(who, "student_channels", student_channels)
        self.teacher_channels = _sizes(who, "teacher_channels", teacher_channels)
        n = len(self.student_stages)
        for key, value in (
            ("teacher_stages", self.teacher_stages),
            ("student_channels", self.student_channels),
            ("teacher_channels", self.teacher_channels),
        ):
            if len(value) != n:
                raise ValueError(
                    f"{who}: {key} has {len(value)} entries for {n} student stages {list(self.student_stages)}; "
                    "give one per stage."
                )
        self.mid_channels = check_positive_int(who, "mid_channels", mid_channels)
        self.hcl_weight = check_non_negative(who, "hcl_weight", hcl_weight)
        self.resize_mode = check_choice(who, "resize_mode", resize_mode, RESAMPLE_MODES)
        self.embedding_layout = check_choice(who, "embedding_layout", embedding_layout, EMBEDDING_LAYOUTS)
        self.csf = CrossSelectiveFusion(self.student_channels, self.teacher_channels, self.mid_channels)

        if (student_embeddings is None) != (teacher_embeddings is None):
            raise ValueError(
                f"{who}: give both student_embeddings and teacher_embeddings (PEA) or neither (no PEA, e.g. a "
                f"CNN teacher), got student_embeddings={student_embeddings!r} and "
                f"teacher_embeddings={teacher_embeddings!r}."
            )
        self.student_embeddings: tuple[str, ...] | None = None
        self.teacher_embeddings: tuple[str, ...] | None = None
        self.student_embedding_channels: tuple[int, ...] | None = None
        self.teacher_embedding_channels: tuple[int, ...] | None = None
        self.embedding_weights = tuple(
            check_non_negative(who, f"embedding_weights[{i}]", w) for i, w in enumerate(embedding_weights)
        )
        self.projections = nn.ModuleList()
        if student_embeddings is not None and teacher_embeddings is not None:
            self.student_embeddings = _names(who, "student_embeddings", student_embeddings)
            self.teacher_embeddings = _names(who, "teacher_embeddings", teacher_embeddings)
            k = len(self.student_embeddings)
            s_ch = (
                self.student_channels[:k]
                if student_embedding_channels is None
                else student_embedding_channels
            )
            t_ch = (
                self.teacher_channels[:k]
                if teacher_embedding_channels is None
                else teacher_embedding_channels
            )
            self.student_embedding_channels = _sizes(who, "student_embedding_channels", s_ch)
            self.teacher_embedding_channels = _sizes(who, "teacher_embedding_channels", t_ch)
            for key, value in (
                ("teacher_embeddings", self.teacher_embeddings),
                ("student_embedding_channels", self.student_embedding_channels),
                ("teacher_embedding_channels", self.teacher_embedding_channels),
                ("embedding_weights", self.embedding_weights),
            ):
                if len(value) != k:
                    raise ValueError(
                        f"{who}: {key} has {len(value)} entries for {k} student embeddings "
                        f"{list(self.student_embeddings)}; give one per embedding (the channel lists default "
                        "to the first stage channels only when there are at most as many embeddings as stages)."
                    )
            if self.embedding_layout == "map" and k > n:
                raise ValueError(
                    f"{who}: embedding_layout='map' reads the grid of embedding i from teacher stage i, but there "
                    f"are {k} embeddings and only {n} stages."
                )
            self.projections = nn.ModuleList(
                ChannelProjection(s, t)
                for s, t in zip(self.student_embedding_channels, self.teacher_embedding_channels)
            )
        self.student_layers = (*self.student_stages, *(self.student_embeddings or ()))
        self.teacher_layers = (*self.teacher_stages, *(self.teacher_embeddings or ()))

    @property
    def term_names(self) -> tuple[str, ...]:
        """``("hcl", "pea")``, or ``("hcl",)`` without embeddings."""
        return ("hcl", "pea") if self.student_embeddings is not None else ("hcl",)

    def stage_maps(self, student: Features, teacher: Features) -> tuple[list[Tensor], list[Tensor]]:
        """The student's and teacher's stage maps, checked against the channels the distiller was built for."""
        who = "TransKD"
        s_maps = [require(student, name, who, "student") for name in self.student_stages]
        t_maps = [require(teacher, name, who, "teacher") for name in self.teacher_stages]
        for side, names, maps, channels in (
            ("student", self.student_stages, s_maps, self.student_channels),
            ("teacher", self.teacher_stages, t_maps, self.teacher_channels),
        ):
            for name, x, c in zip(names, maps, channels):
                if x.ndim == 3:
                    raise ValueError(
                        f"{who}: the {side} stage {name!r} gave {shape_of(x)}, (N, L, C) tokens, where a (N, C, H, W) "
                        f"stage map is expected. Tap the stage maps as {side}_stages (mmseg SegFormer: backbone:0 "
                        f"... backbone:3) and the patch-embedding tokens as {side}_embeddings, or convert tokens "
                        "with lightningkd.adapters.TokensToMap."
                    )
                if x.ndim != 4 or x.shape[1] != c:
                    raise ValueError(
                        f"{who} was built for {c} channels at the {side} stage {name!r}, got {shape_of(x)}; set "
                        f"{side}_channels to the stage widths (expected (N, {c}, H, W))."
                    )
        batch = {x.shape[0] for x in (*s_maps, *t_maps)}
        if len(batch) != 1:
            raise ValueError(
                f"{who}: the stage maps disagree on the batch size: student {[shape_of(x) for x in s_maps]}, "
                f"teacher {[shape_of(x) for x in t_maps]}."
            )
        return s_maps, t_maps

    def fused_maps(self, s_maps: Sequence[Tensor], t_maps: Sequence[Tensor]) -> list[Tensor]:
        """The student's maps through CSF, each resized to its teacher map's size (HCL's inputs)."""
        fused = self.csf(s_maps)
        return [resample_to(f, tuple(t.shape[-2:]), self.resize_mode) for f, t in zip(fused, t_maps)]

    def projected_embeddings(
        self, student: Features, teacher: Features, t_maps: Sequence[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The student's embeddings projected to the teacher's channels and grid, and the teacher's (PEA's
        inputs)."""
        who = "TransKD"
        assert self.student_embeddings is not None and self.teacher_embeddings is not None
        projected, targets = [], []
        for i, (s_name, t_name) in enumerate(zip(self.student_embeddings, self.teacher_embeddings)):
            e = require(student, s_name, who, "student")
            t = require(teacher, t_name, who, "teacher")
            if t.ndim != 3 or t.shape[-1] != self.teacher_embedding_channels[i]:
                hint = (
                    " That is a (N, C, H, W) map: a CNN teacher has no patch embeddings (set both embedding "
                    "lists to null); for a transformer, tap the patch-embedding tokens (mmseg SegFormer: "
                    f"backbone.layers.{i}.0:0)."
                    if t.ndim == 4
                    else ""
                )
                raise ValueError(
                    f"{who}: the teacher embedding {t_name!r} gave {shape_of(t)}; expected (N, L, "
                    f"{self.teacher_embedding_channels[i]}) patch-embedding tokens.{hint}"
                )
            c = self.student_embedding_channels[i]
            if self.embedding_layout == "tokens":
                if e.ndim != 3 or e.shape[-1] != c:
                    hint = (
                        " That is a (N, C, H, W) map: tap the patch-embedding tokens (mmseg SegFormer: "
                        f"backbone.layers.{i}.0:0), or set embedding_layout='map' to align a CNN student's map."
                        if e.ndim == 4
                        else ""
                    )
                    raise ValueError(
                        f"{who}: the student embedding {s_name!r} gave {shape_of(e)}; expected (N, L, {c}) "
                        f"tokens.{hint}"
                    )
                e = self.projections[i](e)
            else:
                if e.ndim != 4 or e.shape[1] != c:
                    raise ValueError(
                        f"{who}: embedding_layout='map' expects the student embedding {s_name!r} as a (N, {c}, H, W) "
                        f"map, got {shape_of(e)}"
                        + ("; it looks like tokens: use embedding_layout='tokens'." if e.ndim == 3 else ".")
                    )
                grid = tuple(t_maps[i].shape[-2:])
                if grid[0] * grid[1] != t.shape[1]:
                    raise ValueError(
                        f"{who}: embedding_layout='map' takes the teacher's token grid from its stage map "
                        f"{self.teacher_stages[i]!r} ({grid[0]}x{grid[1]} = {grid[0] * grid[1]}), but the teacher "
                        f"embedding {t_name!r} has {t.shape[1]} tokens: pair each embedding with the stage of "
                        "the same stride."
                    )
                e = map_to_tokens(resample_to(self.projections[i](e), grid, self.resize_mode))
            if e.shape[:2] != t.shape[:2]:
                raise ValueError(
                    f"{who}: the student embedding {s_name!r} ({shape_of(e)} after projection) and the teacher "
                    f"embedding {t_name!r} ({shape_of(t)}) must have the same batch and token count; tap "
                    "embeddings of the same stride."
                )
            projected.append(e)
            targets.append(t)
        return projected, targets

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """``{"hcl": ..., "pea": ...}`` (``"pea"`` only with embeddings), as
        :func:`~lightningkd.functional.transkd_terms`."""
        s_maps, t_maps = self.stage_maps(student, teacher)
        fused = self.fused_maps(s_maps, t_maps)
        s_emb = t_emb = None
        if self.student_embeddings is not None:
            s_emb, t_emb = self.projected_embeddings(student, teacher, t_maps)
        return transkd_terms(
            fused, t_maps, s_emb, t_emb, hcl_weight=self.hcl_weight, embedding_weights=self.embedding_weights
        )

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return sum_terms(self.terms(student, teacher, batch))

    def extra_repr(self) -> str:
        return (
            f"student_stages={list(self.student_stages)}, teacher_stages={list(self.teacher_stages)}, "
            f"student_channels={list(self.student_channels)}, teacher_channels={list(self.teacher_channels)}, "
            f"student_embeddings={_listed(self.student_embeddings)}, "
            f"teacher_embeddings={_listed(self.teacher_embeddings)}, "
            f"student_embedding_channels={_listed(self.student_embedding_channels)}, "
            f"teacher_embedding_channels={_listed(self.teacher_embedding_channels)}, "
            f"embedding_layout={self.embedding_layout!r}, embedding_weights={list(self.embedding_weights)}, "
            f"hcl_weight={self.hcl_weight}, mid_channels={self.mid_channels}, resize_mode={self.resize_mode!r}, "
            + super().extra_repr()
        )


def _listed(values: Sequence[Any] | None) -> list[Any] | None:
    return None if values is None else list(values)


def _names(who: str, key: str, names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"{who}: {key} must be a non-empty list of layer names, got {names!r}.")
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{who}: {key} must hold layer names (strings), got {list(names)!r}.")
    return tuple(names)


def _sizes(who: str, key: str, sizes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(sizes, str) or not isinstance(sizes, Sequence) or not sizes:
        raise ValueError(f"{who}: {key} must be a non-empty list of positive integers, got {sizes!r}.")
    return tuple(check_positive_int(who, f"{key}[{i}]", c) for i, c in enumerate(sizes))
