"""ND (KD++) class centres: computed with the teacher or loaded from a file, before training starts.

A distiller never runs a model, so :class:`~lightningkd.distillers.ND` only holds the centres; this module
computes them (:func:`class_centers`, the teacher over a data loader) or reads them
(:func:`load_class_centers`), and the :class:`NDClassCenters` callback fills every ND distiller with them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightningkd.distillers.nd import ND
from lightningkd.functional._helpers import check_positive_int, flatten_embedding
from lightningkd.modules.base import DistillationModule
from lightningkd.taps import FeatureTap


class NDClassCenters(L.Callback):
    """Fill the ``centers`` of every :class:`~lightningkd.distillers.ND` distiller that has none.

    Without ``path``, the centre of class ``k`` is the mean teacher embedding of the training images of
    class ``k`` (:func:`class_centers`), as in WangYZ1608/Knowledge-Distillation-via-ND
    (``emb_fea_distribution.py``), which iterates the training set with its training augmentation. Each
    process iterates a fresh, un-sharded training loader from the datamodule, so all DDP ranks get the same
    centres. With ``path``, the centres are read from that file (:func:`load_class_centers`) and checked
    against each distiller's ``num_classes`` and ``teacher_dim``. The centres are buffers of the distiller:
    they are saved in checkpoints and not recomputed on resume.

    Args:
        path: optional ``.pt``/``.pth`` file (a ``(num_classes, teacher_dim)`` tensor) or the authors'
            ``center_emb_train.json``; ``None`` computes the centres with the teacher.

    Example:
        >>> NDClassCenters(path="checkpoints/center_emb_train.json").path.name
        'center_emb_train.json'
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, DistillationModule):
            raise TypeError("NDClassCenters works with lightningkd DistillationModule subclasses.")
        pending = [d for d in pl_module.distillers if isinstance(d, ND) and not d.has_centers]
        if not pending:
            return
        if self.path is not None:
            centers = load_class_centers(self.path)
            for d in pending:
                _check_centers_fit(centers, d, str(self.path))
                d.set_centers(centers)
            return
        if trainer.datamodule is None:
            raise RuntimeError(
                "NDClassCenters needs a LightningDataModule (trainer.fit(module, datamodule=...)) to iterate "
                "the training set; otherwise give it the centres file: NDClassCenters(path='<file>.pt|.json')."
            )
        loader = trainer.datamodule.train_dataloader()
        for d in pending:
            rank_zero_info(
                f"NDClassCenters: computing {d.num_classes} teacher class centres at {d.teacher_layers[0]!r}"
            )
            centers = class_centers(
                pl_module.teacher,
                loader,
                d.teacher_layers[0],
                d.num_classes,
                device=pl_module.device,
                teacher_input=pl_module.teacher_input,
            )
            d.set_centers(centers)


def _check_centers_fit(centers: Tensor, distiller: ND, source: str) -> None:
    expected = (distiller.num_classes, distiller.teacher_dim)
    if tuple(centers.shape) != expected:
        raise ValueError(
            f"NDClassCenters: the class centres in {source!r} have shape {tuple(centers.shape)}, but the ND "
            f"distiller {distiller.name!r} was built for num_classes={expected[0]} and "
            f"teacher_dim={expected[1]}, so it needs {expected}. Use the centres of this teacher's "
            f"{distiller.teacher_layers[0]!r} layer on this data set, or remove path= to compute them."
        )


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
        raise FileNotFoundError(f"load_class_centers: class-centre file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".json":
        data: Any = json.loads(path.read_text())
    elif suffix in (".pt", ".pth"):
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"load_class_centers: class centres must be a .pt/.pth or .json file, got {str(path)!r}."
        )
    if isinstance(data, Mapping):
        return _centers_from_mapping(data, str(path))
    if torch.is_tensor(data) and data.ndim == 2 and data.is_floating_point():
        return data.float()
    described = tuple(data.shape) if torch.is_tensor(data) else type(data).__name__
    raise ValueError(
        f"load_class_centers: {str(path)!r} must hold a (num_classes, dim) float tensor or a mapping "
        f"{{'0': [...], '1': [...]}}, got {described}."
    )


def _centers_from_mapping(data: Mapping[Any, Any], source: str) -> Tensor:
    try:
        by_class = {int(k): v for k, v in data.items()}
    except (TypeError, ValueError):
        raise ValueError(
            f"load_class_centers: the keys of {source!r} must be class indices '0', '1', ..."
        ) from None
    k = len(by_class)
    if sorted(by_class) != list(range(k)):
        missing = sorted(set(range(max(by_class, default=-1) + 1)) - set(by_class))
        raise ValueError(
            f"load_class_centers: {source!r} must hold the classes 0..K-1 once each; missing {missing}, "
            f"got keys {sorted(by_class)[:10]}{'...' if k > 10 else ''}."
        )
    rows = [torch.as_tensor(by_class[i], dtype=torch.float32).flatten() for i in range(k)]
    dims = {len(r) for r in rows}
    if len(dims) != 1:
        raise ValueError(
            f"load_class_centers: the centres in {source!r} have different lengths {sorted(dims)}."
        )
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
    with a :class:`~lightningkd.taps.FeatureTap` and flattened to ``(N, D)`` (un-pooled maps are
    global-average-pooled, tokens averaged). Sums are accumulated in float64. Follows the authors'
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
    check_positive_int("class_centers", "num_classes", num_classes)
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
