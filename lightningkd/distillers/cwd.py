"""CWD: channel-wise distillation of spatial distributions for dense prediction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightningkd.adapters import ConvAdapter
from lightningkd.distillers.base import OUTPUT, Distiller, Features
from lightningkd.functional._helpers import check_positive, check_positive_int
from lightningkd.functional.cwd import cwd_loss


class ChannelWiseDivergence(Distiller):
    """Match each channel's softmax over the spatial positions: ``tau^2 * mean_{n,c} KL(phi(y_t) || phi(y_s))``.

    Shu, Liu, Gao, Yan & Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021,
    arXiv:2011.13256. Authors' code: irfanICMLL/TorchDistiller ``SemSeg-distill/utils/criterion.py``
    ``CriterionCWD`` (channel norm, KL); maintained port open-mmlab/mmrazor ``mmrazor/models/losses/cwd.py``
    ``ChannelWiseDivergence``. The KL divergence is summed over the ``H*W`` positions and averaged over the
    ``N*C`` channel maps, see :func:`~lightningkd.functional.cwd.cwd_loss`.

    On logits (the default layers ``"output"``) the channels are the classes. On feature maps whose
    channel counts differ, give ``student_channels`` and ``teacher_channels``: a learnable 1x1 convolution
    + BatchNorm + ReLU (:class:`~lightningkd.adapters.ConvAdapter`, created here and trained and
    checkpointed with the student), TorchDistiller's connector, maps the student's channels to the
    teacher's before the loss. Without the ReLU (``relu=False``) the BatchNorm shift has no effect, since
    a softmax over positions ignores a per-channel constant. When the spatial sizes differ, the teacher map
    is resized to the student's size (bilinear, ``align_corners=False``); mmrazor instead asserts equal
    sizes.

    Published settings: paper / TorchDistiller ``exp_cwd.sh`` (Cityscapes, PSPNet-R101 -> R18 logits):
    ``temperature=4``, ``weight=3``; mmrazor's segmentation config: ``temperature=1``, ``weight=5`` on the
    logits; mmrazor's detection configs: ``temperature=1``, ``weight=10`` per FPN level. On detector
    features, give it as the template of :class:`~lightningkd.distillers.PerLevel` (one CWD per FPN level,
    summed, each with its own adapter): ``PerLevel(distiller=CWD(temperature=1.0, weight=10.0),
    levels=[...])``.

    Args:
        temperature: tau > 0 (paper: 4).
        student_layer: where the student's maps are read (``"output"``: the model's logits).
        teacher_layer: where the teacher's maps are read (``"output"``: the model's logits).
        student_channels: C_s of feature maps; give both channel counts or neither. When they differ,
            a 1x1 conv adapter C_s -> C_t is created; when given, the inputs are checked against them.
        teacher_channels: C_t of feature maps (see ``student_channels``).
        relu: end the adapter with a ReLU (TorchDistiller's connector does; use ``False`` for teacher
            features taken before an activation). Unused without an adapter.
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(N, C_s, H, W)``, teacher ``(N, C_t, H_t, W_t)`` (``C_s == C_t`` without an adapter).

    Returns:
        the unweighted 0-dim loss from :meth:`forward`.

    Example:
        >>> import torch
        >>> z = torch.randn(2, 19, 8, 8)
        >>> ChannelWiseDivergence(weight=3.0)({"output": z}, {"output": z}).item()
        0.0
        >>> cwd = ChannelWiseDivergence(student_layer="head", teacher_layer="head", student_channels=128,
        ...                             teacher_channels=512)
        >>> cwd({"head": torch.randn(2, 128, 8, 8)}, {"head": torch.randn(2, 512, 16, 16)}).ndim
        0
    """

    def __init__(
        self,
        *,
        temperature: float = 4.0,
        student_layer: str = OUTPUT,
        teacher_layer: str = OUTPUT,
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        relu: bool = True,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        self.temperature = check_positive("ChannelWiseDivergence", "temperature", temperature)
        if (student_channels is None) != (teacher_channels is None):
            raise ValueError(
                "ChannelWiseDivergence: give both student_channels and teacher_channels (for an adapter "
                f"between feature maps) or neither, got student_channels={student_channels!r}, "
                f"teacher_channels={teacher_channels!r}."
            )
        for key, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
            if value is not None:
                check_positive_int("ChannelWiseDivergence", key, value)
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)
        self.adapter: ConvAdapter | None = None
        if (
            student_channels is not None
            and teacher_channels is not None
            and student_channels != teacher_channels
        ):
            self.adapter = ConvAdapter(student_channels, teacher_channels, kernel_size=1, relu=relu)

    def reset_parameters(self) -> None:
        """Re-initialise the adapter (if any) with PyTorch's default init and fresh BatchNorm statistics
        (:class:`~lightningkd.distillers.PerLevel` calls this on every level's copy)."""
        if self.adapter is not None:
            for layer in self.adapter:
                if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d)):
                    layer.reset_parameters()

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        s, t = self.read_pair(student, teacher)
        if s.ndim != 4 or t.ndim != 4:
            raise ValueError(
                f"ChannelWiseDivergence expects (N, C, H, W) maps, got student {tuple(s.shape)} and teacher "
                f"{tuple(t.shape)}: tap dense logits or convolutional feature maps."
            )
        if self.student_channels is not None and (
            s.shape[1] != self.student_channels or t.shape[1] != self.teacher_channels
        ):
            raise ValueError(
                f"ChannelWiseDivergence was built for {self.student_channels} student and "
                f"{self.teacher_channels} teacher channels, got student {tuple(s.shape)} and teacher "
                f"{tuple(t.shape)}."
            )
        if self.adapter is not None:
            s = self.adapter(s)
        elif s.shape[1] != t.shape[1]:
            raise ValueError(
                f"ChannelWiseDivergence: the student map {tuple(s.shape)} and teacher map {tuple(t.shape)} have "
                f"different channel counts; pass student_channels={s.shape[1]} and "
                f"teacher_channels={t.shape[1]} to add a learnable 1x1 conv adapter."
            )
        return cwd_loss(s, t, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + super().extra_repr()


CWD = ChannelWiseDivergence
"""Short alias of :class:`ChannelWiseDivergence`."""
