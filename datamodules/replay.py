"""Replayable augmentation: a fixed set of augmentations per sample, each with a key for teacher caching.

A teacher-output cache (:mod:`lightningkd.teacher_cache`) is only correct if it is keyed on the exact
input the teacher would have seen. :class:`ReplayedAugmentation` makes the augmentation of a training
set replayable: sample ``i`` is always augmented in one of ``replays`` fixed ways (replay ``k`` is the
augmentation pipeline run with a seed derived from ``(seed, i, k)``), and each sample carries a ``key``,
a 64-bit hash of its index and of the parameters the pipeline applied (crop box, flip, scale,
colour-jitter draw, ... as albumentations records them). Which replay is used is drawn at random at
every access, so the student still sees ``replays`` different views of every image; the teacher's
outputs for all ``N * replays`` views can be computed once (``lightningkd cache``) and read back.

This is the scheme of FKD (Shen and Xing, "A Fast Knowledge Distillation Framework for Visual
Recognition", ECCV 2022, arXiv:2112.01528), which stores crop coordinates and soft labels per epoch;
here the key is the hash of every applied parameter, not of the crop alone, so any change of the
pipeline (a new jitter strength, another crop scale) gives new keys and cannot silently reuse stale
outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.corrupt import CorruptFileError, drop_skipped, skip_or_raise

__all__ = ["ReplayedAugmentation", "augmentation_fingerprint", "collate_keyed", "sample_key"]


def _digest(*parts: Any, size: int = 8) -> bytes:
    h = hashlib.blake2b(digest_size=size)
    for part in parts:
        h.update(part if isinstance(part, (bytes, memoryview)) else str(part).encode())
        h.update(b"\x00")
    return h.digest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    return repr(value)


def sample_key(index: int, applied: Sequence[Any]) -> int:
    """The 64-bit key of one augmented sample: a hash of its index and of the applied parameters.

    Args:
        index: the sample's index in the (unaugmented) training set.
        applied: what the augmentation applied (albumentations' ``applied_transforms``: a list of
            ``(transform name, parameters)``); an empty list for an unaugmented sample.

    Returns:
        A signed 64-bit integer (the dtype of a ``torch.int64`` key tensor).

    Example:
        >>> sample_key(3, []) == sample_key(3, [])
        True
        >>> sample_key(3, [("HorizontalFlip", {})]) == sample_key(3, [])
        False
    """
    canonical = json.dumps(applied, sort_keys=True, default=_jsonable)
    return int.from_bytes(_digest(int(index), canonical), "little", signed=True)


def augmentation_fingerprint(transform: Any) -> str:
    """A hex digest of an augmentation pipeline's full configuration (``None``: no augmentation).

    Two pipelines with the same transforms and parameters give the same digest; any change (a
    probability, a crop scale, a jitter strength, the normalisation) gives another.

    Raises:
        TypeError: ``transform`` is not an albumentations pipeline, so its configuration cannot be read.

    Example:
        >>> import albumentations as A
        >>> a = augmentation_fingerprint(A.Compose([A.HorizontalFlip(p=0.5)]))
        >>> a == augmentation_fingerprint(A.Compose([A.HorizontalFlip(p=0.5)]))
        True
        >>> a == augmentation_fingerprint(A.Compose([A.HorizontalFlip(p=0.25)]))
        False
    """
    if transform is None:
        return _digest("no augmentation").hex()
    import albumentations as A

    try:
        config = A.to_dict(transform)
    except Exception as err:  # a plain callable, or a transform albumentations cannot serialise
        raise TypeError(
            f"Cannot read the configuration of the augmentation {type(transform).__name__}: teacher "
            "caching needs an albumentations pipeline (A.Compose) so that a changed pipeline is detected. "
            f"({err})"
        ) from err
    return _digest(json.dumps(config, sort_keys=True, default=_jsonable)).hex()


class ReplayedAugmentation(Dataset):
    """A training set whose sample ``i`` is always augmented in one of ``replays`` fixed ways, with keys.

    Args:
        dataset: the training set; it must offer ``raw(index) -> (image, label)`` (the unaugmented
            sample), ``transform`` (an albumentations pipeline or ``None``) and ``fingerprint()`` (a digest
            of its images and labels), as :class:`~datamodules.datasets.ArrayDataset`,
            :class:`~datamodules.datasets.ImageFileDataset` and
            :class:`~datamodules.datasets.TensorPairDataset` do.
        replays: how many fixed augmentations each sample has (>= 1).
        seed: the seed the replays derive from; another seed gives other augmentations.

    Returns (per item):
        ``{"image": Tensor, "target": int, "key": int}``; batch them with :func:`collate_keyed`.

    Example:
        >>> import numpy as np
        >>> from datamodules import ArrayDataset, cifar_train_transform
        >>> base = ArrayDataset(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4), cifar_train_transform())
        >>> data = ReplayedAugmentation(base, replays=3)
        >>> data.replay(1, 2)["key"] == data.replay(1, 2)["key"]  # the same view, the same key
        True
        >>> len({data.replay(1, k)["key"] for k in range(3)}) <= 3
        True
    """

    def __init__(self, dataset: Dataset, replays: int, seed: int = 0) -> None:
        if int(replays) < 1:
            raise ValueError(f"replays must be >= 1, got {replays}.")
        missing = [name for name in ("raw", "fingerprint") if not callable(getattr(dataset, name, None))]
        if missing:
            raise TypeError(
                f"{type(dataset).__name__} cannot be replayed: it lacks {missing}. Replayed augmentation "
                "(for teacher caching) needs a dataset that returns its unaugmented samples (raw) and a "
                "digest of its content (fingerprint), like ArrayDataset or ImageFileDataset."
            )
        self.dataset = dataset
        self.replays = int(replays)
        self.seed = int(seed)
        self.transform = getattr(dataset, "transform", None)
        if self.transform is not None:
            self.transform.save_applied_params = True  # albumentations then reports what it applied
        self._skip_log = getattr(dataset, "skip_log", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> dict[str, Any]:
        """What a teacher cache must match: the data, the augmentation pipeline and the replay seed."""
        return {
            "data": self.dataset.fingerprint(),
            "augmentation": augmentation_fingerprint(self.transform),
            "replay_seed": self.seed,
            "samples": len(self.dataset),
        }

    def replay(self, index: int, replay: int) -> dict[str, Any] | None:
        """Sample ``index`` under augmentation ``replay`` (``0 <= replay < replays``), with its key.

        ``None`` when the sample's file is unreadable and the dataset skips such files.
        """
        if not 0 <= replay < self.replays:
            raise IndexError(f"replay must be in 0..{self.replays - 1}, got {replay}.")
        try:
            image, label = self.dataset.raw(index)
        except CorruptFileError as err:
            return skip_or_raise(err, self._skip_log)
        applied: list[Any] = []
        if self.transform is not None:
            seed = int.from_bytes(_digest(self.seed, int(index), int(replay), size=4), "little")
            self.transform.set_random_seed(seed)
            out = self.transform(image=image)
            image, applied = out["image"], out["applied_transforms"]
        return {"image": image, "target": int(label), "key": sample_key(index, applied)}

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        # one of the fixed views at random: torch's generator is seeded per worker and epoch
        replay = int(torch.randint(self.replays, ())) if self.replays > 1 else 0
        return self.replay(index, replay)


def collate_keyed(batch: Sequence[dict[str, Any] | None]) -> dict[str, Tensor] | None:
    """Stack keyed samples into ``{"image", "target", "key"}`` (skipped samples, ``None``, left out).

    Example:
        >>> batch = [{"image": torch.zeros(3, 2, 2), "target": 1, "key": 7}, None]
        >>> {k: tuple(v.shape) for k, v in collate_keyed(batch).items()}
        {'image': (1, 3, 2, 2), 'target': (1,), 'key': (1,)}
    """
    batch = drop_skipped(batch)
    if not batch:
        return None
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "target": torch.as_tensor([b["target"] for b in batch], dtype=torch.int64),
        "key": torch.as_tensor([b["key"] for b in batch], dtype=torch.int64),
    }


def file_fingerprint(root: str, files: np.ndarray, labels: np.ndarray) -> str:
    """Digest of image files by relative name, size and label (reading every image would take hours)."""
    sizes = np.fromiter(
        (os.stat(os.path.join(root, os.fsdecode(f))).st_size for f in files), dtype=np.int64, count=len(files)
    )
    return _digest(files.tobytes(), sizes.tobytes(), np.asarray(labels, np.int64).tobytes(), size=16).hex()


def array_fingerprint(*arrays: np.ndarray) -> str:
    """Digest of in-memory arrays (their bytes, shapes and dtypes)."""
    parts: list[Any] = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        parts += [a.dtype.str, a.shape, memoryview(a).cast("B")]
    return _digest(*parts, size=16).hex()
