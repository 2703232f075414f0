"""ND loss (KD++): align the student embedding with the teacher's class centre and enlarge its norm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightningkd.distillers.base import Distiller, Features, require_labels
from lightningkd.functional._helpers import check_positive_int, flatten_embedding
from lightningkd.functional.nd import nd_loss


class ND(Distiller):
    """Norm-and-direction loss on the penultimate embeddings, against the teacher's class centres.

    Wang, Cheng, Duan, Wang, Feng & Kong, "Improving Knowledge Distillation via Regularizing Feature Norm
    and Direction", arXiv:2305.17007 (ECCV 2024). Follows WangYZ1608/Knowledge-Distillation-via-ND
    (``CIFAR/utils.py`` ``DirectNormLoss``, fc6f3f9; projector ``ImageNet/Models/embtrans.py``):
    ``mean_i [1 - <s_i, c_{y_i}/||c_{y_i}||> / max(||s_i||, ||t_i||)]``
    (:func:`~lightningkd.functional.nd.nd_loss`). It is an add-on to a logit loss (KD++ = CE + KD + ND,
    DKD++ = DKD + ND): list it next to e.g. :class:`~lightningkd.distillers.kd.KD`.

    Embeddings are the penultimate features (e.g. a ResNet's ``avgpool``); un-pooled maps are
    global-average-pooled and tokens averaged. When ``student_dim != teacher_dim`` a
    projector BatchNorm1d -> Dropout(0.5) -> Linear (weight and bias drawn from N(0, 0.01), as the authors'
    ``EmbTrans``) maps the student embedding to the teacher's dimension; it is created here and trained
    with the student.

    The class centres (per-class mean of the *teacher* embeddings over the training set) are the buffer
    :attr:`centers` ``(num_classes, teacher_dim)``, saved in checkpoints. A distiller never runs a model,
    so it does not compute them: the ``lightningkd.callbacks.NDClassCenters`` callback computes them with
    the teacher before training (or loads them from a ``.pt`` file or the authors'
    ``center_emb_train.json`` with ``NDClassCenters(path=...)``), or give them with :meth:`set_centers`.
    The authors compute them once with the teacher in eval mode over the training set with its training
    augmentation, and round them to 4 decimals.

    Published weights (``nd_loss_factor``): ImageNet 1 (R34->R18, R50->R18, R50->MobileNetV1), 4 (R101->R18),
    2 (R152->R18); CIFAR-100 scripts 0.5 to 4 per pair (2 for res56->res20 and res32x4->res8x4).

    Args:
        student_layer: tapped student embedding layer.
        teacher_layer: tapped teacher embedding layer.
        student_dim: student embedding dimension D_s.
        teacher_dim: teacher embedding dimension D_t (the centres' dimension).
        num_classes: number of classes K.
        weight: see :class:`~lightningkd.distillers.base.Distiller`.
        name: see :class:`~lightningkd.distillers.base.Distiller`.

    Shape:
        student ``(N, D_s)`` (or ``(N, D_s, H, W)`` / ``(N, L, D_s)``), teacher likewise with ``D_t``;
        ``batch["target"]`` ``(N,)`` class indices.

    Returns:
        the unweighted 0-dim loss from :meth:`forward`.

    Example:
        >>> import torch
        >>> nd = ND(student_layer="avgpool", teacher_layer="avgpool", student_dim=4, teacher_dim=4,
        ...         num_classes=2)
        >>> nd.set_centers(torch.eye(2, 4))
        >>> s, t = torch.tensor([[2.0, 0, 0, 0]]), torch.tensor([[1.0, 1.0, 0, 0]])
        >>> nd({"avgpool": s}, {"avgpool": t}, {"target": torch.tensor([0])}).item()
        0.0
    """

    needs_labels = True

    def __init__(
        self,
        *,
        student_layer: str,
        teacher_layer: str,
        student_dim: int,
        teacher_dim: int,
        num_classes: int,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        for key, value in (
            ("student_dim", student_dim),
            ("teacher_dim", teacher_dim),
            ("num_classes", num_classes),
        ):
            check_positive_int("ND", key, value)
        self.student_layers = (student_layer,)
        self.teacher_layers = (teacher_layer,)
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.num_classes = num_classes
        if student_dim != teacher_dim:
            # The authors' EmbTrans; dropout 0.5 and N(0, 0.01) init from ImageNet/Models/embtrans.py.
            self.projector: nn.Module = nn.Sequential(
                nn.BatchNorm1d(student_dim), nn.Dropout(0.5), nn.Linear(student_dim, teacher_dim)
            )
            nn.init.normal_(self.projector[2].weight, mean=0.0, std=0.01)
            nn.init.normal_(self.projector[2].bias, mean=0.0, std=0.01)
        else:
            self.projector = nn.Identity()
        self.register_buffer("centers", torch.zeros(num_classes, teacher_dim))
        self.register_buffer("centers_ready", torch.tensor(False))
        # Python mirror of ``centers_ready``: reading the buffer every step would sync host and GPU.
        self._centers_ready = False
        self.register_load_state_dict_post_hook(_sync_ready_flag)

    @torch.no_grad()
    def set_centers(self, centers: Tensor) -> None:
        """Store the class centres ``(num_classes, teacher_dim)``; row k is the centre of class k."""
        expected = (self.num_classes, self.teacher_dim)
        if not torch.is_tensor(centers) or tuple(centers.shape) != expected:
            shape = tuple(centers.shape) if torch.is_tensor(centers) else type(centers).__name__
            raise ValueError(
                f"ND: class centres must have shape {expected} (num_classes, teacher_dim), got {shape}."
            )
        if not centers.is_floating_point():
            raise TypeError(f"ND: class centres must be floating point, got {centers.dtype}.")
        norms = centers.detach().float().norm(dim=1)
        if not torch.isfinite(norms).all():
            raise ValueError("ND: class centres contain NaN or inf values.")
        if (norms == 0).any():
            bad = torch.nonzero(norms == 0).flatten().tolist()
            raise ValueError(f"ND: the centres of classes {bad} are zero vectors and have no direction.")
        self.centers.copy_(centers.detach().to(self.centers))
        self.centers_ready.fill_(True)
        self._centers_ready = True

    @property
    def has_centers(self) -> bool:
        """Whether the class centres were set (by :meth:`set_centers`, ``NDClassCenters`` or a checkpoint)."""
        return self._centers_ready

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        if not self._centers_ready:
            raise RuntimeError(
                "ND: the teacher's class centres are not set. Add the lightningkd.callbacks.NDClassCenters "
                "callback to the Trainer (it computes them with the teacher, or loads them with "
                "NDClassCenters(path='<file>.pt|.json')), or call ND.set_centers(centres) with "
                "lightningkd.callbacks.centers.class_centers(teacher, train_loader, layer, num_classes)."
            )
        s, t = (flatten_embedding(x) for x in self.read_pair(student, teacher))
        labels = require_labels(batch, "ND")
        if s.shape[1] != self.student_dim or t.shape[1] != self.teacher_dim or s.shape[0] != t.shape[0]:
            raise ValueError(
                f"ND was built for student_dim={self.student_dim} and teacher_dim={self.teacher_dim}, got "
                f"student embedding {tuple(s.shape)} and teacher embedding {tuple(t.shape)}."
            )
        return nd_loss(self.projector(s), t, self.centers, labels)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, "
            f"num_classes={self.num_classes}, centers_set={self._centers_ready}"
        )


def _sync_ready_flag(module: nn.Module, incompatible_keys: Any) -> None:
    # Runs once per load_state_dict, so reading the buffer here costs nothing per step.
    if module.centers_ready.device.type != "meta":  # meta tensors (deferred init) have no value to read
        module._centers_ready = bool(module.centers_ready)
