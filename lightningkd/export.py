"""Student-only export: a file that loads with ``strict=True`` into the bare student model."""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any

import torch

from lightningkd.checkpoint_io import CheckpointError, is_lightning_checkpoint, load_checkpoint_file
from lightningkd.models.weights import STUDENT_PREFIX, extract_state_dict


def export_student(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    prefix: str = STUDENT_PREFIX,
    overwrite: bool = False,
) -> int:
    """Write the student's ``state_dict`` from a lightningkd Lightning checkpoint to ``output``.

    The teacher and the distillers' adapters are left out, and the ``student.`` prefix is removed, so
    ``student.load_state_dict(torch.load(output, weights_only=True), strict=True)`` works on the plain
    model. The input is read without running code (:func:`lightningkd.checkpoint_io.load_checkpoint_file`), and the output is
    written to a temporary file renamed into place, so a failed export leaves no partial file.

    Args:
        checkpoint: the Lightning checkpoint of a lightningkd run.
        output: the file to write (missing folders are created).
        prefix: the sub-module to export (``student.``; ``distillers.0.`` would export an adapter).
        overwrite: replace an existing ``output``. A Lightning checkpoint, or the input itself, is never
            replaced.

    Returns:
        The number of tensors written.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        IsADirectoryError: ``output`` is a folder.
        FileExistsError: ``output`` is the input, a Lightning checkpoint, or (without ``overwrite``) an
            existing file.
        lightningkd.checkpoint_io.CheckpointError: ``checkpoint`` is unreadable, or asks to run code.
        ValueError: no weights under ``prefix``.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     state = {"student.fc.weight": torch.ones(2, 2), "distillers.0.proj.weight": torch.ones(2)}
        ...     torch.save({"state_dict": state, "pytorch-lightning_version": "2.6"}, d + "/last.ckpt")
        ...     export_student(d + "/last.ckpt", d + "/student.pt"), list(torch.load(d + "/student.pt", weights_only=True))
        (1, ['fc.weight'])
    """
    checkpoint, output = os.fspath(checkpoint), os.fspath(output)
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"Checkpoint {checkpoint!r} does not exist.")
    _check_output(checkpoint, output, overwrite)
    state = extract_state_dict(load_checkpoint_file(checkpoint), prefix=prefix)
    _save_atomically(state, output)
    return len(state)


def _check_output(checkpoint: str, output: str, overwrite: bool) -> None:
    """Refuse outputs that would destroy something: the input, a training checkpoint, any file unasked."""
    if os.path.isdir(output) or output.endswith(("/", os.sep)):
        raise IsADirectoryError(
            f"The export output {output!r} is a folder: pass a file path, e.g. "
            f"{os.path.join(output, 'student.pt')!r}."
        )
    if not os.path.exists(output):
        return
    if os.path.samefile(checkpoint, output):
        raise FileExistsError(
            f"Refusing to export {checkpoint!r} over itself ({output!r} is the same file): pick another "
            "output path, e.g. student.pt beside it."
        )
    if is_lightning_checkpoint(_read_or_none(output)):
        raise FileExistsError(
            f"Refusing to write over {output!r}: it is a Lightning checkpoint (the state of a training "
            "run), which an export never replaces, even with --overwrite. Pick another output path."
        )
    if not overwrite:
        raise FileExistsError(
            f"The export output {output!r} already exists: pass --overwrite (overwrite=True) to replace "
            "it, or pick another output path."
        )


def _read_or_none(path: str) -> Any:
    try:
        return load_checkpoint_file(path)
    except (CheckpointError, OSError):  # not a readable checkpoint: an ordinary file
        return None


def _save_atomically(obj: Any, output: str) -> None:
    """``torch.save`` to a temporary file in the output's folder, then rename it to ``output``."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(output)}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never reuse an existing file; mode 0o666 minus the umask, as a plain open() would give
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
