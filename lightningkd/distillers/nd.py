"""ND loss (KD++): align the student embedding with the teacher's class centre and enlarge its norm."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightningkd.adapters import flatten_embedding
from lightningkd.distillers.base import Distiller, Features, require_labels
from lightningkd.functional.nd import nd_loss


class ND(Distiller):
    """Norm-and-direction loss on the penultimate embeddings, against the teacher's class centres.

    Wang, Cheng, Duan, Wang, Feng & Kong, "Improving Knowledge Distillation via Regularizing Feature Norm
    and Direction", arXiv:2305.17007 (ECCV 2024). Follows WangYZ1608/Knowledge-Distillation-via-ND
    (``CIFAR/utils.py`` ``DirectNormLoss``, fc6f3f9; projector ``ImageNet/Models/embtrans.py``):
    ``mean_i [1 - <s_i, c_{y_i}/||c_{y_i}||> / max(||s_i||, ||t_i||)]``
    (:func:`~lightningkd.functional.nd.nd_loss`). It is an add-on to a logit loss (KD++ = CE + KD + ND,
    DKD++ = DKD + ND): list it next to e.g. :class:`~lightningkd.distillers.kd.KD`.

    Embeddings are the penultimate features (e.g. a ResNet's ``avgpool``); un-pooled maps and tokens are
    averaged by :func:`~lightningkd.adapters.flatten_embedding`. When ``student_dim != teacher_dim`` a
    projector BatchNorm1d -> Dropout(0.5) -> Linear (weight and bias drawn from N(0, 0.01), as the authors'
    ``EmbTrans``) maps the student embedding to the teacher's dimension; it is created here and trained
    with the student.

    The class centres (per-class mean of the *teacher* embeddings over the training set) are the buffer
    :attr:`centers` ``(num_classes, teacher_dim)``, saved in checkpoints. Give them with ``centers=`` (a
    ``.pt`` tensor file or the authors' ``center_emb_train.json``), with :meth:`set_centers`, or let the
    ``lightningkd.callbacks.NDClassCenters`` callback compute them with :func:`class_centers` before
    training. The authors compute them once with the teacher in eval mode over the training set with its
    training augmentation, and round them to 4 decimals.

    Published weights (``nd_loss_factor``): ImageNet 1 (R34->R18, R50->R18, R50->MobileNetV1), 4 (R101->R18),
    2 (R152->R18); CIFAR-100 scripts 0.5 to 4 per pair (2 for res56->res20 and res32x4->res8x4).

    Args:
        student_layer: tapped student embedding layer.
        teacher_layer: tapped teacher embedding layer.
        student_dim: student embedding dimension D_s.
        teacher_dim: teacher embedding dimension D_t (the centres' dimension).
        num_classes: number of classes K.
        centers: optional path of the class centres: ``.pt`` (a ``(K, D_t)`` tensor) or ``.json`` (the
            authors' format, ``{"0": [...], "1": [...], ...}``).
        weight, name: see :class:`~lightningkd.distillers.base.Distiller`.

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
        centers: str | None = None,
        weight: float = 1.0,
        name: str | None = None,
    ) -> None:
        super().__init__(weight=weight, name=name)
        for key, value in (
            ("student_dim", student_dim),
            ("teacher_dim", teacher_dim),
            ("num_classes", num_classes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ND: {key} must be a positive integer, got {value!r}.")
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
        if centers is not None:
            self.set_centers(load_class_centers(centers))

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
        """Whether the class centres were set (by ``centers=``, :meth:`set_centers` or a checkpoint)."""
        return self._centers_ready

    def forward(self, student: Features, teacher: Features, batch: Mapping[str, Any] | None = None) -> Tensor:
        if not self._centers_ready:
            raise RuntimeError(
                "ND: the teacher's class centres are not set. Pass centers='<file>.pt|.json' to ND, call "
                "ND.set_centers(lightningkd.distillers.nd.class_centers(teacher, train_loader, layer, "
                "num_classes)), or add the lightningkd.callbacks.NDClassCenters callback to the Trainer."
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


def load_class_centers(path: str | Path) -> Tensor:
    """Read class centres from a ``.pt`` file (a ``(K, D)`` tensor) or the authors' JSON format.

    The JSON format of WangYZ1608/Knowledge-Distillation-via-ND (``center_emb_train.json``) maps
    ``str(class)`` to the list of the centre's D values; the classes must be ``"0"`` .. ``"K-1"``. A
    ``.pt`` file may also hold such a mapping.

    Args:
        path: file path ending in ``.pt``/``.pth`` or ``.json``.

    Returns:
        float32 ``(K, D)`` tensor whose row k is the centre of class k.

    Example:
        >>> import json, os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "centres.json")
        >>> with open(path, "w") as f:
        ...     json.dump({"1": [0.0, 2.0], "0": [1.0, 0.5]}, f)
        >>> load_class_centers(path)
        tensor([[1.0000, 0.5000],
                [0.0000, 2.0000]])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ND: class-centre file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data: Any = json.loads(path.read_text())
    elif suffix in (".pt", ".pth"):
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"ND: class centres must be a .pt/.pth or .json file, got {str(path)!r}.")
    if isinstance(data, Mapping):
        return _centers_from_mapping(data, str(path))
    if torch.is_tensor(data) and data.ndim == 2 and data.is_floating_point():
        return data.float()
    described = tuple(data.shape) if torch.is_tensor(data) else type(data).__name__
    raise ValueError(
        f"ND: {str(path)!r} must hold a (num_classes, dim) float tensor or a mapping "
        f"{{'0': [...], '1': [...]}}, got {described}."
    )


def _centers_from_mapping(data: Mapping[Any, Any], source: str) -> Tensor:
    try:
        by_class = {int(k): v for k, v in data.items()}
    except (TypeError, ValueError):
        raise ValueError(f"ND: the keys of {source!r} must be class indices '0', '1', ...") from None
    k = len(by_class)
    if sorted(by_class) != list(range(k)):
        missing = sorted(set(range(max(by_class, default=-1) + 1)) - set(by_class))
        raise ValueError(
            f"ND: {source!r} must hold the classes 0..K-1 once each; missing {missing}, "
            f"got keys {sorted(by_class)[:10]}{'...' if k > 10 else ''}."
        )
    rows = [torch.as_tensor(by_class[i], dtype=torch.float32).flatten() for i in range(k)]
    dims = {len(r) for r in rows}
    if len(dims) != 1:
        raise ValueError(f"ND: the centres in {source!r} have different lengths {sorted(dims)}.")
    return torch.stack(rows)


@torch.no_grad()
def class_centers(
    teacher: nn.Module,
    dataloader: Iterable[Any],
    layer: str,
    num_classes: int,
    device: torch.device | str | None = None,
    teacher_input: nn.Module | None = None,
) -> Tensor:
    """Per-class mean of the teacher's ``layer`` embeddings over a data loader (ND's class centres).

    The teacher runs in eval mode under ``torch.no_grad`` (its previous mode is restored); ``layer`` is read
    with a :class:`~lightningkd.taps.FeatureTap` and flattened by
    :func:`~lightningkd.adapters.flatten_embedding`. Sums are accumulated in float64. Follows the authors'
    ``ImageNet/emb_fea_distribution.py`` (WangYZ1608/Knowledge-Distillation-via-ND, fc6f3f9), which uses
    the training set (with its training augmentation). Under data parallelism each process sees only its
    shard: reduce the sums and counts across processes, or run this on the full loader in every process.

    Args:
        teacher: the trained teacher.
        dataloader: iterable of ``(images, labels, ...)`` tuples/lists or dicts with ``"image"`` and
            ``"target"``.
        layer: ``named_modules()`` path of the embedding layer (``"output"`` for the model's output).
        num_classes: K; every class must occur at least once.
        device: where the teacher runs the images; defaults to the device of its parameters.
        teacher_input: optional conversion applied to the images first (the module's ``teacher_input``).

    Shape:
        returns ``(num_classes, D)``.

    Returns:
        float32 centres on the CPU, row k the centre of class k.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
        >>> with torch.no_grad():
        ...     _ = net[1].weight.copy_(torch.eye(2)), net[1].bias.zero_()
        >>> loader = [(torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]]), torch.tensor([0, 0, 1]))]
        >>> class_centers(net, loader, layer="1", num_classes=2)
        tensor([[2., 1.],
                [0., 5.]])
    """
    # Imported here: lightningkd.taps imports lightningkd.distillers, which may import this module.
    from lightningkd.taps import FeatureTap

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"class_centers: num_classes must be a positive integer, got {num_classes!r}.")
    if device is None:
        param = next(iter(teacher.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    sums: Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.long)
    was_training = teacher.training
    teacher.eval()
    try:
        with FeatureTap(teacher, [layer]) as tap:
            for batch in dataloader:
                images, labels = _split_batch(batch)
                images = images.to(device)
                if teacher_input is not None:
                    images = teacher_input(images)
                emb = flatten_embedding(tap(images)[layer]).detach().to("cpu", torch.float64)
                labels = torch.as_tensor(labels).to("cpu").long()
                if labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
                    raise ValueError(
                        f"class_centers: labels {tuple(labels.shape)} do not match the embeddings "
                        f"{tuple(emb.shape)} (expected one class index per image)."
                    )
                if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                    raise ValueError(
                        f"class_centers: labels must lie in [0, {num_classes}), got values in "
                        f"[{int(labels.min())}, {int(labels.max())}]."
                    )
                if sums is None:
                    sums = torch.zeros(num_classes, emb.shape[1], dtype=torch.float64)
                sums.index_add_(0, labels, emb)
                counts += torch.bincount(labels, minlength=num_classes)
    finally:
        teacher.train(was_training)
    if sums is None:
        raise ValueError("class_centers: the dataloader yielded no batches.")
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        shown = missing if len(missing) <= 20 else [*missing[:20], "..."]
        raise ValueError(
            f"class_centers: {len(missing)} of {num_classes} classes never appear in the dataloader "
            f"({shown}); their centres are undefined. Use the training set."
        )
    return (sums / counts.unsqueeze(1).to(sums.dtype)).float()


def _split_batch(batch: Any) -> tuple[Tensor, Any]:
    if isinstance(batch, Mapping):
        if "image" not in batch or "target" not in batch:
            raise ValueError(
                f"class_centers: dict batches need 'image' and 'target' keys, got {sorted(batch)}."
            )
        return batch["image"], batch["target"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "class_centers expects batches of (images, labels) or {'image': ..., 'target': ...}, "
        f"got {type(batch).__name__}."
    )
