"""FGD: focal and global knowledge distillation for object detectors (one feature level)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightningkd.distillers.base import Distiller, Features, read_aligned_pair, sum_terms
from lightningkd.functional._helpers import (
    at_least_float32,
    autocast_off,
    check_choice,
    check_non_negative,
    check_positive,
    check_positive_int,
)
from lightningkd.functional.fgd import fgd_masks, fgd_terms

FGDBoxScale = Literal["image", "padded"]
"""How :class:`FGD` maps box pixels onto the feature grid (see its docstring)."""

FGD_BOX_SCALES: tuple[str, ...] = get_args(FGDBoxScale)


class GcBlock(nn.Module):
    """The global-context block of FGD's relation loss: ``x + channel_add(context(x))``.

    Cao, Xu, Lin, Wei & Hu, "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    ICCVW 2019, arXiv:1904.11492, in the form used by yzd-v/FGD ``mmdet/distillation/losses/fgd.py``
    (``conv_mask_*`` / ``channel_add_conv_*``, c03a6cf): the context is the sum over positions of ``x``
    weighted by ``softmax_{h,w}(conv_mask(x))`` (1x1 conv ``C -> 1`` with bias); ``channel_add`` is
    1x1 conv ``C -> C/2`` -> LayerNorm over ``(C/2, 1, 1)`` -> ReLU -> 1x1 conv ``C/2 -> C`` (biases
    everywhere); the result is added to every position of ``x``.

    Args:
        channels: C (at least 2).

    Shape:
        ``(N, C, H, W)`` -> ``(N, C, H, W)``.

    Example:
        >>> block = GcBlock(8)
        >>> x = torch.randn(2, 8, 3, 3)
        >>> torch.equal(block(x), x)  # the last conv is zero at the official initialisation
        True
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        check_positive_int("GcBlock", "channels", channels)
        if channels < 2:
            raise ValueError(
                f"GcBlock: channels must be at least 2 (the bottleneck has C/2), got {channels}."
            )
        self.channels = channels
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // 2, channels, kernel_size=1),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Kaiming-normal (fan_in, ReLU gain) context conv with zero bias,
        PyTorch's default for the first conv and the LayerNorm, the last conv all zero."""
        nn.init.kaiming_normal_(self.conv_mask.weight, a=0, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        self.channel_add[0].reset_parameters()
        self.channel_add[1].reset_parameters()
        nn.init.zeros_(self.channel_add[3].weight)
        nn.init.zeros_(self.channel_add[3].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        # the attention pooling (a softmax over all H*W positions and a weighted sum) in float32; the
        # convolutions stay under autocast
        weights = F.softmax(at_least_float32(self.conv_mask(x)).reshape(n, 1, h * w), dim=2)  # (N, 1, HW)
        with autocast_off(weights):
            context = torch.matmul(at_least_float32(x).reshape(n, c, h * w), weights.transpose(1, 2))
        return x + self.channel_add(context.reshape(n, c, 1, 1))


class FGD(Distiller):
    """Focal and global distillation of one detector feature level: foreground, background, attention and
    global terms.

    Yang, Li, Jiang, Gong, Yuan, Zhao & Yuan, "Focal and Global Knowledge Distillation for Detectors",
    CVPR 2022, arXiv:2111.11837. Authors' code: yzd-v/FGD ``mmdet/distillation/losses/fgd.py``
    ``FeatureLoss`` (c03a6cf), hyper-parameters from ``configs/distillers/fgd/``; matches the parity
    fixtures made from it. See :func:`~lightningkd.functional.fgd.fgd_terms` for the four terms and
    :func:`~lightningkd.functional.fgd.fgd_masks` for the box masks. :meth:`terms` returns
    ``{"fg", "bg", "attention", "global"}``, each already multiplied by alpha / beta / gamma /
    lambda_global.

    The masks come from the ground-truth boxes of the detection batch (:attr:`needs_labels` is set):
    ``batch["target"]`` is a list of per-image dicts whose ``"boxes"`` are ``(K, 4)`` ``x1, y1, x2, y2``
    pixels of the resized, un-padded image; ``batch["image_sizes"]`` its ``(h, w)`` per image;
    ``batch["padded_size"]`` the ``(H, W)`` of the padded batch the features were computed from.
    ``box_scale="image"`` (default) reproduces the official code, which scales boxes by the un-padded
    image size although the feature map covers the padded batch (so boxes are stretched towards the
    padding by ``padded / un-padded``, up to one stride-32 cell at each level); ``box_scale="padded"``
    scales by the padded size, which puts the boxes where they really are on the map. The box values
    are float32 numbers even for float64 features (the official code divides integer tensors; the
    fixtures keep that).

    Learnable parts, trained and checkpointed with the student: a 1x1 ``align`` conv (bias, PyTorch's
    default init) ``student_channels -> channels`` when they differ, and two GcBlocks
    (:class:`GcBlock`), one for the student's map and one for the teacher's (the teacher-side block is
    trained too: it receives gradients through the global term). :meth:`reset_parameters` gives the
    official initialisation, whose zero last conv makes the global term start as ``sum((S-T)^2)/N``.

    One level per instance: the official detectors apply one FGD loss per FPN level, each with its own
    GcBlocks, and add them; :class:`~lightningkd.distillers.PerLevel` does exactly that. Published
    settings (``configs/distillers/fgd/``, all FPN levels, student initialised from the teacher's neck
    and head where shapes allow): RetinaNet / GFL ``temperature=0.5, alpha=1e-3, beta=5e-4, gamma=5e-4,
    lambda_global=5e-6`` (the defaults; the authors' class default gamma 1e-3 is not used by any
    config); Faster / Mask / Cascade R-CNN ``temperature=0.5, alpha=5e-5, beta=2.5e-5, gamma=5e-5,
    lambda_global=5e-7``; FCOS ``temperature=0.8, alpha=1.6e-3, beta=8e-4, gamma=8e-4,
    lambda_global=8e-6`` (RepPoints: the same with ``temperature=0.5``). The loss weight is 1.

    Args:
        student_layer: the student's feature level (``"<layer>:<key>"`` for an FPN level).
        teacher_layer: the teacher's feature level.
        channels: C_t, the teacher's channels (size of the GcBlocks; at least 2).
        student_channels: C_s when it differs from ``channels`` (adds the align conv); ``None``: equal.
        temperature: attention temperature t > 0.
        alpha: weight of the foreground feature term.
        beta: weight of the background feature term.
        gamma: weight of the attention term.
        lambda_global: weight of the global (GcBlock relation) term.
        box_scale: ``"image"`` (official: boxes scaled by the un-padded image size) or ``"padded"``
            (scaled by the padded batch size the map covers).
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(N, C_s, H, W)``, teacher ``(N, C_t, H, W)`` (same spatial size).

    Returns:
        the unweighted 0-dim loss from :meth:`forward` (the sum of the four terms).

    Example:
        >>> import torch
        >>> fgd = FGD(channels=16, student_channels=8)
        >>> boxes = [torch.tensor([[4.0, 4.0, 20.0, 28.0]]), torch.zeros(0, 4)]
        >>> batch = {"target": [{"boxes": b} for b in boxes], "image_sizes": [(32, 32), (32, 24)],
        ...          "padded_size": (32, 32)}
        >>> s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)
        >>> terms = fgd.terms({"backbone:0": s}, {"backbone:0": t}, batch)
        >>> list(terms)
        ['fg', 'bg', 'attention', 'global']
    """

    needs_labels = True

    def __init__(
        self,
        *,
        student_layer: str = "backbone:0",
        teacher_layer: str = "backbone:0",
        channels: int = 256,
        student_channels: int | None = None,
        temperature: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 5e-4,
        lambda_global: float = 5e-6,
        box_scale: FGDBoxScale = "image",
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        who = "FGD"
        self.channels = check_positive_int(who, "channels", channels)
        if channels < 2:
            raise ValueError(
                f"FGD: channels must be at least 2 (the GcBlock bottleneck has C/2), got {channels}."
            )
        if student_channels is not None:
            check_positive_int(who, "student_channels", student_channels)
        self.student_channels = student_channels
        self.temperature = check_positive(who, "temperature", temperature)
        self.alpha = check_non_negative(who, "alpha", alpha)
        self.beta = check_non_negative(who, "beta", beta)
        self.gamma = check_non_negative(who, "gamma", gamma)
        self.lambda_global = check_non_negative(who, "lambda_global", lambda_global)
        self.box_scale = check_choice(who, "box_scale", box_scale, FGD_BOX_SCALES)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)
        self.align: nn.Conv2d | None = None
        if student_channels is not None and student_channels != channels:
            self.align = nn.Conv2d(student_channels, channels, kernel_size=1)
        self.student_global = GcBlock(channels)
        self.teacher_global = GcBlock(channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise as the official code: PyTorch's default for the align conv,
        :meth:`GcBlock.reset_parameters` for both GcBlocks (:class:`~lightningkd.distillers.PerLevel` calls
        this on every level's copy)."""
        if self.align is not None:
            self.align.reset_parameters()
        self.student_global.reset_parameters()
        self.teacher_global.reset_parameters()

    def masks(
        self,
        batch: Mapping[str, Any] | None,
        num_images: int,
        feature_size: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The ``(foreground, background)`` masks of ``batch`` on a ``feature_size`` map, as :meth:`forward`
        computes them (``box_scale`` applied); also used to preview the masks."""
        boxes, sizes = detection_boxes(batch, num_images, "FGD", padded=self.box_scale == "padded")
        return fgd_masks(boxes, sizes, feature_size, dtype=dtype, device=device)

    def terms(
        self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        s, t = read_aligned_pair(self, student, teacher, promote=True)
        # the background is normalised in the features' precision, as the official code
        dtype = torch.promote_types(s.dtype, t.dtype)
        fg, bg = self.masks(batch, t.shape[0], (t.shape[2], t.shape[3]), dtype=dtype, device=t.device)
        return fgd_terms(
            s,
            t,
            fg,
            bg,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
            lambda_global=self.lambda_global,
            student_global=self.student_global,
            teacher_global=self.teacher_global,
        )

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        return sum_terms(self.terms(student, teacher, batch))

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, student_channels={self.student_channels}, "
            f"temperature={self.temperature}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, "
            f"lambda_global={self.lambda_global}, box_scale={self.box_scale!r}, " + super().extra_repr()
        )


def detection_boxes(
    batch: Mapping[str, Any] | None, num_images: int, who: str, padded: bool = False
) -> tuple[list[Tensor], list[tuple[int, int]]]:
    """The ground-truth boxes of a detection batch and the ``(h, w)`` they are scaled by.

    ``padded=False``: each image's ``batch["image_sizes"]`` (the un-padded resized image, the official
    FGD ``img_shape``); ``padded=True``: ``batch["padded_size"]`` for every image.

    Example:
        >>> batch = {"target": [{"boxes": torch.zeros(0, 4)}], "image_sizes": [(30, 40)],
        ...          "padded_size": (32, 64)}
        >>> detection_boxes(batch, 1, "FGD", padded=True)[1]
        [(32, 64)]
    """
    if batch is None or "target" not in batch:
        raise ValueError(
            f"{who} needs the ground-truth boxes: call it with batch={{'target': [{{'boxes': ...}}, ...], "
            "'image_sizes': [(h, w), ...], 'padded_size': (H, W)}} (the detection module does this for you)."
        )
    targets = batch["target"]
    if not isinstance(targets, (list, tuple)) or len(targets) != num_images:
        got = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(
            f"{who}: batch['target'] must be a list of one dict per image ({num_images} images in the "
            f"features), got {got}."
        )
    boxes = []
    for n, target in enumerate(targets):
        if not isinstance(target, Mapping) or "boxes" not in target:
            raise ValueError(
                f"{who}: batch['target'][{n}] must be a dict with 'boxes' (K, 4), got {type(target).__name__}."
            )
        boxes.append(target["boxes"])
    key = "padded_size" if padded else "image_sizes"
    if key not in batch:
        raise ValueError(
            f"{who} scales the boxes by batch[{key!r}], which is missing"
            + (
                ": pass box_scale='image' or give the padded (H, W)."
                if padded
                else ": give one (h, w) per image."
            )
        )
    if padded:
        size = tuple(int(v) for v in batch[key])
        sizes = [size] * num_images
    else:
        sizes = [tuple(int(v) for v in s) for s in batch[key]]
        if len(sizes) != num_images:
            raise ValueError(
                f"{who}: batch['image_sizes'] has {len(sizes)} entries for {num_images} images; give one (h, w) "
                "per image."
            )
    return boxes, sizes  # type: ignore[return-value]
