"""Corrupt or unreadable files: the error that names them, and the opt-in skipping (``skip_corrupt``).

By default a file that cannot be read stops the run with a :class:`CorruptFileError` naming it. A
datamodule built with ``skip_corrupt=True`` gives its datasets a :class:`CorruptFileLog`: a sample whose
file cannot be read is recorded there and returned as ``None``, the collate functions drop it from its
batch, and :class:`SkippingDataLoader` refills (training) or leaves out (evaluation) a batch whose
samples were all dropped. The log is an append-only file, so that DataLoader worker processes (which
cannot change the main process' objects) record what they skipped where the main process can read it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader

__all__ = ["CorruptFileError", "CorruptFileLog", "SkippingDataLoader", "drop_skipped", "skip_or_raise"]

T = TypeVar("T")

_MAX_REASON = 500  # characters kept per record: one short line, written with a single write() call


class CorruptFileError(OSError):
    """An image or mask file that cannot be opened or decoded; ``path`` names it.

    Example:
        >>> err = CorruptFileError("Cannot decode image file 'a.jpg'.", path="a.jpg")
        >>> isinstance(err, OSError), err.path
        (True, 'a.jpg')
    """

    def __init__(self, message: str, path: str | os.PathLike) -> None:
        super().__init__(message)
        self.path = os.fspath(path)

    def __reduce__(self) -> tuple[Any, ...]:  # pickled back from DataLoader workers
        return type(self), (str(self), self.path)


class CorruptFileLog:
    """Append-only record of the files skipped as unreadable, shared with DataLoader worker processes.

    Every record is one JSON line ``[path, reason]`` appended with a single ``write`` on a file opened
    with ``O_APPEND``, so that concurrent workers never interleave their lines. Only the path of the
    file travels to the workers (the object pickles as that path).

    Args:
        path: the log file (created on the first record).

    Example:
        >>> import tempfile
        >>> log = CorruptFileLog(tempfile.mkdtemp() + "/skipped.jsonl")
        >>> log.record("a.jpg", "Cannot decode image file 'a.jpg'.")
        >>> log.record("a.jpg", "Cannot decode image file 'a.jpg'.")
        >>> log.counts()
        {'a.jpg': 2}
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)

    @classmethod
    def in_temp_dir(cls, owner: object) -> CorruptFileLog:
        """A log in a new temporary folder, deleted when ``owner`` is garbage-collected (or at exit)."""
        folder = tempfile.mkdtemp(prefix="datamodules-skipped-")
        weakref.finalize(owner, shutil.rmtree, folder, True)
        return cls(os.path.join(folder, "skipped.jsonl"))

    def record(self, file: str | os.PathLike, reason: str) -> None:
        """Append that ``file`` was skipped because of ``reason`` (first line kept)."""
        reason = (reason.splitlines() or [""])[0][:_MAX_REASON]
        line = (json.dumps([os.fspath(file), reason]) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def entries(self) -> list[tuple[str, str]]:
        """Every record so far, in order, as ``(path, reason)``."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [tuple(json.loads(line)) for line in f if line.strip()]

    def counts(self) -> dict[str, int]:
        """How many times each file was skipped (every epoch that reads it counts), sorted by path."""
        return dict(sorted(Counter(path for path, _ in self.entries()).items()))


def skip_or_raise(err: CorruptFileError, log: CorruptFileLog | None) -> None:
    """Re-raise ``err`` when there is no log (the default); else record its file and return ``None``.

    A dataset calls it in its ``except CorruptFileError`` branch and returns the result, ``None``, as
    the sample; the collate functions drop it.
    """
    if log is None:
        raise err
    log.record(err.path, str(err))


def drop_skipped(batch: Sequence[T | None]) -> list[T]:
    """The samples of ``batch`` that were not skipped (skipped samples are ``None``).

    Example:
        >>> drop_skipped([1, None, 3])
        [1, 3]
    """
    return [sample for sample in batch if sample is not None]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class SkippingDataLoader(DataLoader):
    """``DataLoader`` for datasets that skip unreadable samples (``collate_fn`` gives ``None`` for a batch
    whose samples were all skipped).

    Such a batch is handled so that the number of steps stays right:

    - ``refill_empty=True`` (training): it is replaced by randomly drawn readable samples, read in the
      main process. The epoch keeps its number of steps, which Lightning's epoch-end validation and the
      step-based schedules count on, and distributed ranks stay in step.
    - ``refill_empty=False`` (evaluation): it is left out, since an evaluation must not count a sample
      twice; under distributed training that would leave the other ranks waiting, so there it raises.

    Args:
        *args: as ``DataLoader``.
        refill_empty: refill an all-skipped batch instead of leaving it out.
        **kwargs: as ``DataLoader``.
    """

    def __init__(self, *args: Any, refill_empty: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refill_empty = refill_empty

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if batch is None and self.refill_empty:
                batch = self._refill()
            if batch is not None:
                yield batch
            elif _distributed() and torch.distributed.get_world_size() > 1:
                raise RuntimeError(
                    f"Every sample of an evaluation batch of {self.batch_size} was unreadable and skipped "
                    "(skip_corrupt=True). Under distributed training a rank cannot leave out a batch without "
                    "the other ranks waiting for it forever. Remove or repair the files listed in "
                    f"{self._log_path()}, or use a larger batch_size."
                )

    def _refill(self) -> Any:
        """A batch of randomly drawn readable samples (the draws that fail are skipped and logged too)."""
        samples = []
        for index in torch.randperm(len(self.dataset)).tolist():
            sample = self.dataset[index]
            if sample is not None:
                samples.append(sample)
                if len(samples) == self.batch_size:
                    break
        if not samples:
            raise RuntimeError(
                f"No sample of the {len(self.dataset)} in this split is readable; see {self._log_path()}."
            )
        return self.collate_fn(samples)

    def _log_path(self) -> str:
        log = getattr(self.dataset, "skip_log", None)
        return log.path if log is not None else "the datamodule's skipped_files"
