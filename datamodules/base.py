"""Shared LightningDataModule plumbing of every datamodule (splits and loaders)."""

from __future__ import annotations

import abc
import warnings
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.corrupt import CorruptFileLog, SkippingDataLoader
from datamodules.datasets import collate_classification, seed_worker
from datamodules.replay import ReplayedAugmentation, collate_keyed

__all__ = ["BaseClassificationDataModule", "BaseDataModule", "Split"]

Split = Literal["train", "val", "test"]

_STAGE_SPLITS: dict[str | None, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
    None: ("train", "val", "test"),
}


class BaseDataModule(L.LightningDataModule, abc.ABC):
    """Splits and loaders shared by the classification, segmentation and detection datamodules.

    Subclasses set ``classes``, ``mean`` and ``std``, implement :meth:`_build` and name the batch
    assembly in :attr:`collate_fn`. The train loader shuffles and drops the last incomplete batch;
    memory is pinned when CUDA is available and workers persist across epochs when ``num_workers > 0``.
    ``predict_dataloader`` serves the test split (with its labels).

    With ``skip_corrupt`` (for the datamodules that read image / mask files) an unreadable file does not
    stop the run: its sample is dropped from its batch (a training batch left empty is refilled with
    random readable samples, an evaluation batch left empty is left out: see
    :class:`~datamodules.corrupt.SkippingDataLoader`), recorded in :attr:`skip_log` by whichever
    process read it, listed with counts by :attr:`skipped_files` and reported in a warning when the
    stage ends (:meth:`teardown`). Label errors (e.g. a mask value outside the classes) are never skipped.

    Args:
        batch_size: samples per batch (per device under DDP).
        num_workers: DataLoader worker processes (0 loads in the main process).
        skip_corrupt: skip unreadable image / mask files instead of stopping with an error naming them.
    """

    collate_fn = staticmethod(collate_classification)
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self, batch_size: int, num_workers: int, skip_corrupt: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.skip_corrupt = bool(skip_corrupt)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._skip_log: CorruptFileLog | None = None
        self._reported = 0  # records of the skip log already reported by teardown()

    @property
    def skip_log(self) -> CorruptFileLog | None:
        """Where the datasets record skipped files (``None`` unless ``skip_corrupt``); pass it to datasets."""
        if self.skip_corrupt and self._skip_log is None:
            self._skip_log = CorruptFileLog.in_temp_dir(self)
        return self._skip_log

    @property
    def skipped_files(self) -> dict[str, int]:
        """Unreadable files skipped so far, with how many times each was skipped (once per epoch read)."""
        return self._skip_log.counts() if self._skip_log is not None else {}

    @abc.abstractmethod
    def _build(self, split: Split) -> Dataset:
        """Create the dataset of ``split`` (called at most once per split)."""

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets that ``stage`` needs (``fit``: train and val; ``test``/``predict``: test)."""
        if stage not in _STAGE_SPLITS:
            raise ValueError(f"Unknown stage {stage!r}; expected one of {list(_STAGE_SPLITS)}.")
        for split in _STAGE_SPLITS[stage]:
            if getattr(self, f"{split}_set") is None:
                setattr(self, f"{split}_set", self._build(split))

    def _loader(self, split: Split, train: bool = False) -> DataLoader:
        dataset = getattr(self, f"{split}_set")
        if dataset is None:  # used outside a Trainer without calling setup()
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
            dataset = getattr(self, f"{split}_set")
        if train and len(dataset) < self.batch_size:
            raise ValueError(
                f"The train split has {len(dataset)} samples, fewer than batch_size={self.batch_size}; "
                "the train loader drops incomplete batches and would be empty."
            )
        # with skip_corrupt, a train batch left empty is refilled (the epoch keeps its steps), others left out
        skipping = {"refill_empty": train} if self.skip_corrupt else {}
        return (SkippingDataLoader if self.skip_corrupt else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=collate_keyed if isinstance(dataset, ReplayedAugmentation) else self.collate_fn,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            worker_init_fn=seed_worker,
            **skipping,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, incomplete last batch dropped."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in order."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches, in order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split, in order, batched like the other splits."""
        return self._loader("test")

    def teardown(self, stage: str | None = None) -> None:
        """At the end of a stage, warn about the files skipped since the last report (``skip_corrupt``)."""
        if self._skip_log is None:
            return
        entries = self._skip_log.entries()
        new, self._reported = entries[self._reported :], len(entries)
        if not new:
            return
        reasons: dict[str, str] = {}
        counts: dict[str, int] = {}
        for path, reason in new:
            reasons.setdefault(path, reason)
            counts[path] = counts.get(path, 0) + 1
        lines = "\n".join(f"  {path} ({counts[path]}x): {reasons[path]}" for path in sorted(counts))
        warnings.warn(
            f"{type(self).__name__} skipped {len(new)} samples of {len(counts)} unreadable files during "
            f"stage '{getattr(stage, 'value', stage)}' (skip_corrupt=True); remove or repair them:\n{lines}",
            UserWarning,
            stacklevel=2,
        )


class BaseClassificationDataModule(BaseDataModule):
    """Base of the classification datamodules: ``(images, labels)`` batches.

    Images are ``float32`` ``(N, 3, H, W)`` normalised with ``mean``/``std``, labels ``int64`` ``(N,)``.
    Subclasses also set ``num_classes``.

    With ``replays`` the training split becomes a :class:`~datamodules.replay.ReplayedAugmentation`:
    every image has ``replays`` fixed augmentations (one drawn at random at each access) and training
    batches are dicts ``{"image", "target", "key"}``, the key naming the exact augmented input. That is
    what a teacher-output cache needs (``lightningkd cache``, ``teacher_cache:`` of the modules).

    Args:
        batch_size, num_workers, skip_corrupt: see :class:`BaseDataModule`.
        replays: fixed augmentations per training image (``None``: a fresh augmentation every time).
        replay_seed: the seed the fixed augmentations derive from.
    """

    num_classes: int

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        skip_corrupt: bool = False,
        replays: int | None = None,
        replay_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, skip_corrupt=skip_corrupt)
        if replays is not None and replays < 1:
            raise ValueError(f"replays must be >= 1 (or None for fresh augmentations), got {replays}.")
        self.replays = replays
        self.replay_seed = int(replay_seed)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if (
            self.replays
            and self.train_set is not None
            and not isinstance(self.train_set, ReplayedAugmentation)
        ):
            self.train_set = ReplayedAugmentation(self.train_set, self.replays, self.replay_seed)

    def cache_fingerprint(self) -> dict:
        """What a teacher-output cache of this training split is tied to (data, augmentation, seed)."""
        if not self.replays:
            raise ValueError(
                f"{type(self).__name__} draws a fresh augmentation at every step (replays is None), so no "
                "teacher output can be stored for it: set data.init_args.replays (e.g. 8) both when writing "
                "the cache (lightningkd cache) and when training with it."
            )
        if self.train_set is None:
            self.setup("fit")
        assert isinstance(self.train_set, ReplayedAugmentation)
        return self.train_set.fingerprint()
