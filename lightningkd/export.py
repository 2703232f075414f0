"""Student-only export: a file that loads with ``strict=True`` into the bare student model."""

from __future__ import annotations

import os

import torch

from lightningkd.models.weights import STUDENT_PREFIX, extract_state_dict


def export_student(
    checkpoint: str | os.PathLike, output: str | os.PathLike, prefix: str = STUDENT_PREFIX
) -> int:
    """Write the student's ``state_dict`` from a lightningkd Lightning checkpoint to ``output``.

    The teacher and the distillers' adapters are left out, and the ``student.`` prefix is removed, so
    ``student.load_state_dict(torch.load(output), strict=True)`` works on the plain model.

    Returns:
        The number of tensors written.
    """
    checkpoint = os.fspath(checkpoint)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"Checkpoint {checkpoint!r} does not exist.")
    obj = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = extract_state_dict(obj, prefix=prefix)
    parent = os.path.dirname(os.fspath(output))
    if parent:
        os.makedirs(parent, exist_ok=True)
    torch.save(state, output)
    return len(state)
