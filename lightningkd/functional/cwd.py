"""Channel-wise distillation (CWD) for dense prediction, functional form."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightningkd.functional._helpers import check_dense_pair, check_positive, match_spatial


def cwd_loss(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """``tau^2 / (N*C) * sum_{n,c} KL(softmax(y_t[n,c] / tau) || softmax(y_s[n,c] / tau))`` over positions.

    Shu, Liu, Gao, Yan & Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021,
    arXiv:2011.13256. Authors' code: irfanICMLL/TorchDistiller ``SemSeg-distill/utils/criterion.py``
    ``CriterionCWD(norm_type='channel', divergence='kl')``; matches the maintained port
    open-mmlab/mmrazor ``mmrazor/models/losses/cwd.py`` ``ChannelWiseDivergence`` (90c7af1).

    Each channel of each image is turned into a distribution over its ``H*W`` spatial positions by a
    softmax at temperature tau; the KL divergence from the teacher's distribution to the student's is
    summed over the positions, averaged over the ``N*C`` channel maps (not over pixels) and multiplied by
    ``tau^2``. Works on logits (channels = classes) and on feature maps with the same channel count.

    mmrazor asserts equal spatial sizes; here, when they differ, the teacher map is resized to the
    student's ``(H, W)`` (bilinear, ``align_corners=False``) before the softmax. ``log_softmax`` is used
    for the student (TorchDistiller takes the log of a softmax, the same value but ``-inf`` for extreme
    logits). Half-precision inputs are computed in float32.

    Args:
        student: student logits or features.
        teacher: teacher logits or features (same N and C; resized to the student's size if needed).
        temperature: tau > 0 (paper / TorchDistiller ``exp_cwd.sh``: 4; mmrazor's seg config: 1).

    Shape:
        student ``(N, C, H, W)``, teacher ``(N, C, H_t, W_t)``.

    Returns:
        0-dim loss (multiply by the loss weight: 3 in the paper's logit setting, 5 in mmrazor's config).

    Example:
        >>> import torch
        >>> ys = torch.zeros(1, 1, 1, 2)  # uniform over the 2 positions
        >>> yt = torch.tensor([[[[0.0, 2.0]]]])
        >>> round(cwd_loss(ys, yt, temperature=1.0).item(), 4)  # KL([.12, .88] || [.5, .5])
        0.3278
    """
    t = check_positive("cwd_loss", "temperature", temperature)
    ys, yt = check_dense_pair("cwd_loss", student, teacher, "maps")
    yt = match_spatial(yt, tuple(ys.shape[-2:]), mode="bilinear")
    n, c = ys.shape[:2]
    log_p_s = F.log_softmax(ys.flatten(2) / t, dim=2)
    log_p_t = F.log_softmax(yt.flatten(2) / t, dim=2)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl / (n * c) * (t * t)
