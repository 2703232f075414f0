"""Save a resumable checkpoint when a run is stopped by SIGTERM or SIGINT, and exit with a non-zero status."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException


class InterruptCheckpoint(L.Callback):
    """Turn SIGTERM and SIGINT (Ctrl+C) into a resumable checkpoint and a failing exit status.

    Schedulers stop jobs with SIGTERM; Lightning then raises ``SIGTERMException``, a ``SystemExit`` whose
    status is 0, so the scheduler would believe the job succeeded, and nothing is saved. With this
    callback:

    - SIGTERM: the current batch finishes, a checkpoint is written, and the process exits with status 143
      (128 + 15, the shell's convention for "killed by SIGTERM").
    - SIGINT (Ctrl+C): handled like SIGTERM (finish the batch, checkpoint, status 130); a second Ctrl+C
      stops at once, without a checkpoint (the weights may then be half-updated). A process started with
      SIGINT ignored (``nohup``, a background job) keeps ignoring it.

    The checkpoint is ``interrupted-step<global step>.ckpt`` (an existing file is never replaced: a ``-v1``
    suffix is added) in ``dirpath``, by default the folder of the first ``ModelCheckpoint``, else
    ``<default_root_dir>/checkpoints``. It holds what Lightning needs to resume (weights, optimizer and
    scheduler state, loop progress): ``lightningkd fit --config ... --ckpt_path <it>`` continues at the
    next step. Under DDP every process stops at the same batch (Lightning broadcasts the signal). The
    ``lightningkd`` command always adds this callback.

    Args:
        dirpath: folder for the checkpoint (see above for the default).

    Example:
        >>> InterruptCheckpoint(dirpath="runs/x").dirpath
        'runs/x'
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved: str | None = None
        self._trainer: L.Trainer | None = None
        self._signal: int | None = None
        self._previous_sigint: Any = None

    # ---- SIGINT: stop at the next batch boundary, like Lightning's SIGTERM ------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its own signal handlers (it restores the ones it found at teardown)
        self._trainer = trainer
        self._signal = None
        # signal handlers live in the main thread; a process started with SIGINT ignored (nohup, a
        # background job) keeps ignoring it
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._signal is not None or self._trainer is None:
            raise KeyboardInterrupt  # second Ctrl+C: stop now
        self._signal = signal.SIGINT
        rank_zero_info(
            "\nInterrupted (Ctrl+C): finishing this batch, then saving a checkpoint; press again to stop now."
        )
        # Lightning's loops stop at the next batch boundary when they see this flag (as for SIGTERM), on
        # every process, and raise SIGTERMException
        self._trainer._signal_connector.received_sigterm = True

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_sigint()

    # ---- the checkpoint and the exit status ----------------------------------------------------------
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        signum = self._signal or signal.SIGTERM
        name = signal.Signals(signum).name
        path = self._path(trainer)
        try:
            trainer.save_checkpoint(path)
        except Exception as err:  # e.g. non-finite weights: report, but keep the failing exit status
            rank_zero_warn(f"{name} received at step {trainer.global_step}; no checkpoint written: {err}")
        else:
            self.saved = path
            rank_zero_info(
                f"{name} received: saved {path} at step {trainer.global_step} (epoch {trainer.current_epoch}). "
                f"Resume with --ckpt_path {path}"
            )
        exception.code = 128 + int(signum)  # a scheduler must not read this as success

    def _path(self, trainer: L.Trainer) -> str:
        folder = self.dirpath
        if folder is None:
            checkpoint = trainer.checkpoint_callback
            folder = getattr(checkpoint, "dirpath", None) or os.path.join(
                trainer.default_root_dir, "checkpoints"
            )
        stem = os.path.join(folder, f"interrupted-step{trainer.global_step}")
        path, version = f"{stem}.ckpt", 0
        while os.path.exists(path):
            version += 1
            path = f"{stem}-v{version}.ckpt"
        return path
