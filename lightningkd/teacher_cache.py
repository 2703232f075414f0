"""Teacher-output caching: the teacher's outputs stored once, keyed on the exact augmented input.

Running the teacher costs a forward pass per step. When the training inputs are replayable (a
datamodule with ``replays``, see :class:`datamodules.replay.ReplayedAugmentation`), every input the
student can see is known in advance: ``N`` images times ``replays`` fixed augmentations, each with a
64-bit key hashed from the image index and the augmentation parameters actually applied. ``lightningkd
cache`` runs the teacher once over all of them and writes a cache folder; a module given
``teacher_cache:`` then reads the teacher's outputs by key instead of running the teacher. A key that is
not in the cache (an input the cache was not written for, e.g. more replays than were cached) runs the
teacher on those samples only: outputs are never approximated by another view's (FKD's region soft
labels draw from the stored set instead; here correctness wins).

The cache is tied to what produced it: a digest of the teacher's weights (and of ``teacher_input``), of
the training images and labels, and of the augmentation pipeline's configuration and replay seed. A
module refuses a cache whose digests differ from its own, saying which.

Storage (a folder; nothing in it is executed when read): ``meta.json`` (written last: a folder without
it is an interrupted write), ``keys.npy`` (sorted keys) and ``rows.npy`` (their rows), and per layer
either ``<layer>.npy`` (``rows x shape``) or, for logits with ``top_k``, ``<layer>.values.npy``,
``<layer>.indices.npy`` and ``<layer>.logsumexp.npy``. Arrays are memory-mapped, so a cache larger than
memory works.

Top-k logits: only the ``k`` largest logits and the log-sum-exp of all logits are kept; the other classes
share the remaining probability mass equally. At temperature 1 the top-k probabilities are then exact
and the rest keeps its total mass; at other temperatures the tail is approximate (as in FKD's top-k soft
labels).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightningkd.taps import OUTPUT, Features, FeatureTap

__all__ = [
    "CACHE_VERSION",
    "TeacherCache",
    "TeacherCacheMismatch",
    "teacher_fingerprint",
    "write_teacher_cache",
]

CACHE_VERSION = 1
META = "meta.json"
_DTYPES = {"float16": np.float16, "float32": np.float32}


class TeacherCacheMismatch(ValueError):
    """A teacher cache was written for another teacher, data set or augmentation than this run's."""


def teacher_fingerprint(teacher: nn.Module, teacher_input: nn.Module | None = None) -> str:
    """A hex digest of the teacher's weights and buffers (and of ``teacher_input``'s), names included.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> teacher_fingerprint(a) == teacher_fingerprint(a), teacher_fingerprint(a) == teacher_fingerprint(b)
        (True, False)
    """
    h = hashlib.blake2b(digest_size=16)
    for module in (teacher, teacher_input):
        if module is None:
            continue
        h.update(type(module).__qualname__.encode())
        tensors = dict(module.named_parameters())
        tensors.update(module.named_buffers())  # non-persistent buffers too (Renormalize's statistics)
        for name in sorted(tensors):
            value = tensors[name].detach().cpu().contiguous()
            h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
            h.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _layer_file(folder: Path, layer: str, part: str) -> Path:
    """``<layer>.npy`` for full outputs, ``<layer>.<part>.npy`` for the parts of top-k logits."""
    safe = layer.replace("/", "_")
    return folder / (f"{safe}.npy" if part == "full" else f"{safe}.{part}.npy")


class TeacherCache:
    """A written teacher-output cache, opened for reading (see the module docstring for the format).

    Args:
        folder: the cache folder written by :func:`write_teacher_cache` (``lightningkd cache``).

    Raises:
        FileNotFoundError: the folder does not exist, or has no ``meta.json`` (an interrupted write).
        ValueError: the cache was written by another format version.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        meta_path = self.folder / META
        if not self.folder.is_dir():
            raise FileNotFoundError(
                f"Teacher cache folder '{self.folder}' does not exist. Write it first with "
                "`lightningkd cache --config RECIPE.yaml --output FOLDER`."
            )
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"'{self.folder}' has no {META}: it is not a teacher cache, or its writing was interrupted "
                "(meta.json is written last). Delete the folder and write the cache again."
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("version") != CACHE_VERSION:
            raise ValueError(
                f"Teacher cache '{self.folder}' has format version {self.meta.get('version')}, this "
                f"lightningkd reads version {CACHE_VERSION}: write the cache again."
            )
        self.keys = np.load(self.folder / "keys.npy", mmap_mode="r", allow_pickle=False)
        self.rows = np.load(self.folder / "rows.npy", mmap_mode="r", allow_pickle=False)
        self.layers: dict[str, dict[str, Any]] = self.meta["layers"]
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        for layer, spec in self.layers.items():
            parts = ("values", "indices", "logsumexp") if spec.get("top_k") else ("full",)
            self._arrays[layer] = {
                part: np.load(_layer_file(self.folder, layer, part), mmap_mode="r", allow_pickle=False)
                for part in parts
            }

    def __len__(self) -> int:
        return len(self.keys)

    def check(self, teacher: str, data: dict[str, Any]) -> None:
        """Refuse the cache unless it was written for this teacher digest and data fingerprint.

        Raises:
            TeacherCacheMismatch: naming every part that differs (teacher, data, augmentation, seed).
        """
        problems = []
        if self.meta["teacher"] != teacher:
            problems.append(
                "the teacher differs (its weights, or teacher_input): the cache holds another teacher's outputs"
            )
        written = self.meta["data"]
        labels = {
            "data": "the training images or labels differ (another data set, split or file list)",
            "samples": "the training split has another number of images",
            "augmentation": "the augmentation pipeline differs (a transform or one of its parameters)",
            "replay_seed": "the replay seed differs, so the fixed augmentations are other ones",
        }
        for field, text in labels.items():
            if written.get(field) != data.get(field):
                problems.append(f"{text} (cache: {written.get(field)}, this run: {data.get(field)})")
        if problems:
            raise TeacherCacheMismatch(
                f"The teacher cache '{self.folder}' does not fit this run:\n  - "
                + "\n  - ".join(problems)
                + "\nWrite a new cache for this recipe (`lightningkd cache --config RECIPE.yaml --output NEW`)"
                " or drop teacher_cache to run the teacher."
            )

    def lookup(self, keys: Tensor) -> tuple[Tensor, np.ndarray]:
        """Which ``keys`` are cached (a bool tensor on the keys' device) and the rows of those that are."""
        wanted = keys.detach().cpu().numpy().astype(np.int64, copy=False)
        pos = np.searchsorted(self.keys, wanted)
        pos = np.minimum(pos, len(self.keys) - 1)
        hit = np.asarray(self.keys[pos]) == wanted
        return torch.from_numpy(hit).to(keys.device), np.asarray(self.rows[pos[hit]])

    def read(self, layer: str, rows: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
        """The stored outputs of ``layer`` at ``rows``, as float32 on ``device`` (top-k logits rebuilt)."""
        spec, arrays = self.layers[layer], self._arrays[layer]
        order = np.argsort(rows)  # memory maps read fastest in file order
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        sorted_rows = rows[order]
        if not spec.get("top_k"):
            data = torch.from_numpy(np.asarray(arrays["full"][sorted_rows])[inverse])
            return data.to(device=device, dtype=torch.float32, non_blocking=True)
        values = torch.from_numpy(np.asarray(arrays["values"][sorted_rows])[inverse]).float()
        indices = torch.from_numpy(np.asarray(arrays["indices"][sorted_rows])[inverse]).long()
        lse = torch.from_numpy(np.asarray(arrays["logsumexp"][sorted_rows])[inverse]).float()
        full = topk_to_logits(values, indices, lse, int(spec["shape"][-1]))
        return full.to(device, non_blocking=True)


def topk_to_logits(values: Tensor, indices: Tensor, logsumexp: Tensor, num_classes: int) -> Tensor:
    """Full logits from the top-k logits and the log-sum-exp of all: the rest share the remaining mass.

    The softmax of the result equals the original softmax on the top-k classes, and the other classes
    together keep the original remaining mass, split equally.

    Example:
        >>> logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
        >>> v, i = logits.topk(2)
        >>> full = topk_to_logits(v, i, logits.logsumexp(1), 4)
        >>> torch.allclose(full.softmax(1)[0, :2], logits.softmax(1)[0, :2])
        True
        >>> round(float(full.softmax(1)[0, 2:].sum()), 6) == round(float(logits.softmax(1)[0, 2:].sum()), 6)
        True
    """
    k = values.shape[-1]
    if k >= num_classes:
        return torch.empty(values.shape[:-1] + (num_classes,)).scatter_(-1, indices, values)
    top_mass = (values - logsumexp[..., None]).exp().sum(-1).clamp(max=1.0)
    rest = (1.0 - top_mass).clamp(min=1e-12) / (num_classes - k)  # probability of each other class
    fill = (rest.log() + logsumexp)[..., None].expand(*values.shape[:-1], num_classes).clone()
    return fill.scatter_(-1, indices, values)


class _ReplayGrid(Dataset):
    """Every (image, replay) pair of a replayed training set, in order."""

    def __init__(self, data: Any, replays: int) -> None:
        self.data, self.replays = data, replays

    def __len__(self) -> int:
        return len(self.data) * self.replays

    def __getitem__(self, index: int) -> Any:
        return self.data.replay(index // self.replays, index % self.replays)


def _bytes(shape: Sequence[int], dtype: str, top_k: int | None) -> int:
    if top_k:
        return top_k * (np.dtype(_DTYPES[dtype]).itemsize + 4) + 4
    return int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize


def write_teacher_cache(
    module: Any,
    datamodule: Any,
    output: str | os.PathLike,
    *,
    layers: Iterable[str] = (OUTPUT,),
    top_k: int | None = None,
    dtype: str = "float16",
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    precision: torch.dtype | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Run ``module``'s teacher over every replayed training input of ``datamodule`` and write a cache.

    Args:
        module: a :class:`~lightningkd.modules.DistillationModule` (its ``teacher``, ``teacher_input`` and
            ``channels_last`` are used exactly as in training).
        datamodule: a classification datamodule with ``replays`` set.
        output: the cache folder to create; an existing path is refused (nothing is overwritten).
        layers: the teacher outputs to store; ``"output"`` (the logits) by default. Other layers are
            feature maps: their disk cost is logged before anything is written.
        top_k: keep only the ``k`` largest logits of ``"output"`` (plus the log-sum-exp); ``None``: all.
        dtype: ``"float16"`` (default; half the disk) or ``"float32"`` for stored values.
        batch_size: teacher batch size (default: the datamodule's).
        device: where the teacher runs.
        precision: autocast dtype for the teacher (e.g. ``torch.bfloat16``), ``None`` for full precision.
        log: where progress lines go.

    Returns:
        The cache folder.
    """
    output = Path(output).expanduser()
    if output.exists():
        raise FileExistsError(
            f"'{output}' already exists; a teacher cache is never written over anything. Choose a new "
            "folder, or delete this one yourself if it is an old cache."
        )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    if module.teacher is None:
        raise ValueError("The module has no teacher, so there is nothing to cache.")
    layers = tuple(dict.fromkeys(layers))
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    fingerprint = datamodule.cache_fingerprint()
    data = datamodule.train_set
    # an unaugmented set has one view per image whatever replays says
    replays = data.replays if data.transform is not None else 1
    grid = _ReplayGrid(data, replays)
    loader = DataLoader(
        grid,
        batch_size=batch_size or datamodule.batch_size,
        num_workers=datamodule.num_workers,
        collate_fn=_collate_keyed,
    )
    teacher = module.teacher.to(device).eval()
    teacher_input = module.teacher_input.to(device) if module.teacher_input is not None else None
    count = len(grid)

    keys = np.empty(count, dtype=np.int64)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    specs: dict[str, dict[str, Any]] = {}
    written = 0
    start = time.time()
    output.mkdir(parents=True)
    with FeatureTap(teacher, layers) as tap:
        for batch in loader:
            if batch is None:
                continue
            images = batch["image"].to(device)
            with torch.inference_mode(), _autocast(device, precision):
                if teacher_input is not None:
                    images = teacher_input(images)
                features = tap(module.prepare_images(images))
            n = len(batch["key"])
            if not arrays:  # the first batch gives the shapes: say what the cache will cost
                specs, arrays = _allocate(output, features, layers, top_k, dtype, count, log)
                log(
                    f"writing {count:,} teacher outputs ({len(data):,} images x {replays} replays) to "
                    f"'{output}': {_human(sum(_bytes(s['shape'], dtype, s['top_k']) for s in specs.values()) * count)}"
                )
            keys[written : written + n] = batch["key"].numpy()
            for layer in layers:
                value = _tensor(features, layer).float()
                if specs[layer]["top_k"]:
                    v, i = value.topk(specs[layer]["top_k"], dim=-1)
                    arrays[layer]["values"][written : written + n] = v.cpu().numpy()
                    arrays[layer]["indices"][written : written + n] = i.cpu().numpy()
                    arrays[layer]["logsumexp"][written : written + n] = value.logsumexp(-1).cpu().numpy()
                else:
                    arrays[layer]["full"][written : written + n] = value.cpu().numpy()
            written += n
            if written % (50 * n) < n:
                rate = written / max(time.time() - start, 1e-9)
                log(f"  {written:,}/{count:,} inputs ({rate:,.0f}/s)")
    if not arrays:
        raise ValueError("The training split gave no readable samples; nothing was cached.")
    for parts in arrays.values():
        for array in parts.values():
            array.flush()
    keys = keys[:written]
    order = np.argsort(keys, kind="stable")
    np.save(output / "keys.npy", keys[order])
    np.save(output / "rows.npy", order.astype(np.int64))
    meta = {
        "version": CACHE_VERSION,
        "teacher": teacher_fingerprint(module.teacher, module.teacher_input),
        "teacher_class": type(module.teacher).__name__,
        "data": fingerprint,
        "replays": replays,
        "augmented": data.transform is not None,
        "count": written,
        "layers": specs,
        "precision": str(precision) if precision is not None else "float32",
        "seconds": round(time.time() - start, 1),
    }
    (output / META).write_text(json.dumps(meta, indent=2))  # last: marks the cache complete
    log(f"wrote {written:,} teacher outputs in {meta['seconds']} s")
    return output


def _tensor(features: Features, layer: str) -> Tensor:
    value = features[layer]
    if not torch.is_tensor(value):
        raise TypeError(
            f"The teacher's '{layer}' output is a {type(value).__name__}, not a tensor: only tensor outputs "
            "can be cached."
        )
    return value


def _allocate(
    output: Path,
    features: Features,
    layers: Sequence[str],
    top_k: int | None,
    dtype: str,
    count: int,
    log: Callable[[str], None],
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    specs: dict[str, dict[str, Any]] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for layer in layers:
        shape = tuple(_tensor(features, layer).shape[1:])
        k = top_k if layer == OUTPUT and top_k is not None and top_k < shape[-1] else None
        if top_k is not None and layer == OUTPUT and len(shape) != 1:
            raise ValueError(
                f"top_k needs (N, classes) logits; the teacher's output has shape (N, *{shape})."
            )
        specs[layer] = {"shape": list(shape), "dtype": dtype, "top_k": k}
        log(
            f"  {layer}: {shape} {dtype}{f' top-{k}' if k else ''}: {_human(_bytes(shape, dtype, k) * count)}"
        )
        mm = np.lib.format.open_memmap
        if k:
            arrays[layer] = {
                "values": mm(_layer_file(output, layer, "values"), "w+", _DTYPES[dtype], (count, k)),
                "indices": mm(_layer_file(output, layer, "indices"), "w+", np.int32, (count, k)),
                "logsumexp": mm(_layer_file(output, layer, "logsumexp"), "w+", np.float32, (count,)),
            }
        else:
            arrays[layer] = {
                "full": mm(_layer_file(output, layer, "full"), "w+", _DTYPES[dtype], (count, *shape))
            }
    return specs, arrays


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TB"


def _autocast(device: str | torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return torch.autocast(torch.device(device).type, enabled=False)
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _collate_keyed(batch: Sequence[dict[str, Any] | None]) -> dict[str, Tensor] | None:
    """Stack ``{"image", "key"}`` samples (unreadable ones, ``None``, left out)."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "key": torch.as_tensor([b["key"] for b in batch], dtype=torch.int64),
    }


def expected_hit_rate(cached_replays: int, replays: int) -> float:
    """The share of training inputs found in a cache of ``cached_replays`` when training uses ``replays``."""
    return min(1.0, cached_replays / replays)
