"""FitNets: regress an intermediate student feature map onto the teacher's (hint learning)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from lightningkd.adapters import ConvAdapter
from lightningkd.distillers.base import Distiller, Features
from lightningkd.functional._helpers import ResizeMode, check_choice, check_positive_int
from lightningkd.functional.fitnet import FITNET_RESIZE_MODES, fitnet_loss


class FitNet(Distiller):
    """Hint loss ``MSE(r(f_s), f_t)`` with a learnable convolutional regressor ``r``.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015,
    arXiv:1412.6550 (official Theano code adri-romsor/FitNets). Follows the single-stage form of
    megvii-research/mdistiller (``mdistiller/distillers/FitNet.py``, a08d46f): the regressor is a
    convolution + BatchNorm (:class:`~lightningkd.adapters.ConvAdapter`) from the student's channels to the
    teacher's, trained jointly with the student, and the loss is the element-mean squared error
    (:func:`~lightningkd.functional.fitnet.fitnet_loss`). Published setting (mdistiller CIFAR-100):
    ``weight=100`` with CE weight 1 and the hint at the second residual stage. The paper's original
    two-stage schedule (hint pre-training, then KD) is not reproduced here.

    Differences from mdistiller, by design: mdistiller picks the regressor's stride/kernel from the
    feature sizes (1x1 conv for equal sizes, stride-2 conv or transposed conv for a factor 2) and adds a
    ReLU; here the regressor is a size-preserving ``kernel_size`` convolution (+ ReLU if ``relu=True``),
    and when the spatial sizes differ :func:`~lightningkd.functional.fitnet.fitnet_loss` resizes the
    *regressed* student map to the teacher's size (``resize`` mode). The regressor is created in
    ``__init__`` from the explicit channel sizes, so it is trained and checkpointed with the student.

    Args:
        student_layer: tapped student layer (a ``(N, C_s, H_s, W_s)`` feature map).
        teacher_layer: tapped teacher layer (a ``(N, C_t, H_t, W_t)`` feature map).
        student_channels: C_s.
        teacher_channels: C_t.
        kernel_size: odd kernel size of the regressor convolution (padding keeps the spatial size).
        resize: how the regressed student map is resized when ``(H_s, W_s) != (H_t, W_t)``: an
            :func:`~torch.nn.functional.interpolate` mode (``"bilinear"``, ``"bicubic"``, ``"nearest"``,
            ``"area"``) or ``"pool"`` (adaptive average pooling).
        relu: end the regressor with a ReLU (mdistiller does; useful when the teacher hint is post-ReLU).
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(N, C_s, H_s, W_s)``, teacher ``(N, C_t, H_t, W_t)``.

    Returns:
        the unweighted 0-dim loss from :meth:`forward`.

    Example:
        >>> import torch
        >>> fitnet = FitNet(student_layer="layer2", teacher_layer="layer2", student_channels=8,
        ...                 teacher_channels=16, weight=100.0)
        >>> loss = fitnet({"layer2": torch.randn(2, 8, 8, 8)}, {"layer2": torch.randn(2, 16, 4, 4)})
        >>> loss.ndim, sum(p.numel() for p in fitnet.parameters())  # 3x3 conv 8->16, BN affine
        (0, 1184)
    """

    def __init__(
        self,
        *,
        student_layer: str,
        teacher_layer: str,
        student_channels: int,
        teacher_channels: int,
        kernel_size: int = 3,
        resize: ResizeMode = "bilinear",
        relu: bool = False,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        for key, value in (
            ("student_channels", student_channels),
            ("teacher_channels", teacher_channels),
            ("kernel_size", kernel_size),
        ):
            check_positive_int("FitNet", key, value)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"FitNet: kernel_size must be odd so the regressor keeps the size, got {kernel_size}."
            )
        self.resize = check_choice("FitNet", "resize", resize, FITNET_RESIZE_MODES)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)
        self.regressor = ConvAdapter(student_channels, teacher_channels, kernel_size=kernel_size, relu=relu)

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        s, t = self.read_pair(student, teacher)
        if s.ndim != 4 or t.ndim != 4:
            raise ValueError(
                f"FitNet expects (N, C, H, W) feature maps, got student {tuple(s.shape)} and teacher "
                f"{tuple(t.shape)}: tap convolutional layers (token or vector features are not supported)."
            )
        if t.shape[1] != self.regressor.out_channels or s.shape[1] != self.regressor.in_channels:
            raise ValueError(
                f"FitNet was built for {self.regressor.in_channels} student and {self.regressor.out_channels} "
                f"teacher channels, got student {tuple(s.shape)} and teacher {tuple(t.shape)}."
            )
        return fitnet_loss(self.regressor(s), t, self.resize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, resize={self.resize!r}"
