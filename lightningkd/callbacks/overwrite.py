"""Refuse to start a run whose checkpoints would replace the files of an earlier run."""

from __future__ import annotations

import fnmatch
import os
import re

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class NoOverwrite(L.Callback):
    """Stop a fit before it starts when a ``ModelCheckpoint`` would overwrite existing checkpoint files.

    Lightning replaces an existing file of the same name when a ``ModelCheckpoint`` has
    ``enable_version_counter: false`` (recipes use fixed names so that the next recipe can read, e.g., the
    trained teacher): a one-step trial of the teacher recipe would replace the trained teacher. For every
    such callback this one lists the files in its folder that the run could write (the ``filename``
    template, and ``last.ckpt`` with ``save_last``) and refuses to start when one exists, naming it. The
    checkpoint the run resumes from (``ckpt_path``) may be replaced: that is the same run going on.
    ``ModelCheckpoint`` callbacks with the version counter on (Lightning's default) write ``-v1`` names
    and never overwrite. The ``lightningkd`` command always adds this callback; ``--overwrite true``
    allows the replacement.

    Args:
        overwrite: allow replacing the files.

    Example:
        >>> NoOverwrite().overwrite
        False
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.overwrite:
            return
        resumed = os.path.realpath(trainer.ckpt_path) if trainer.ckpt_path else None
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or callback._enable_version_counter:
                continue
            for path in would_overwrite(callback):
                if os.path.realpath(path) != resumed:
                    raise FileExistsError(
                        f"{path} exists (a checkpoint of an earlier run) and this run's ModelCheckpoint "
                        f"(filename {callback.filename!r}, enable_version_counter: false) would overwrite it. "
                        "Move or rename the file, resume from it with --ckpt_path, pass --overwrite true to "
                        "replace it, or set enable_version_counter: true to write a -v1 file beside it."
                    )


def would_overwrite(callback: ModelCheckpoint) -> list[str]:
    """Existing files in ``callback.dirpath`` whose names ``callback`` can write with its counter off."""
    folder = callback.dirpath
    if not folder or not os.path.isdir(folder):
        return []
    template = callback.filename or "{epoch}-{step}"
    # every {field} or {field:format} of the template can become any text
    patterns = [re.sub(r"\{[^}]*\}", "*", template) + callback.FILE_EXTENSION]
    if callback.save_last:
        patterns.append(re.sub(r"\{[^}]*\}", "*", callback.CHECKPOINT_NAME_LAST) + callback.FILE_EXTENSION)
    names = sorted(os.listdir(folder))
    return [os.path.join(folder, n) for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
