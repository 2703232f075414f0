"""Load weights a user points at: a Lightning checkpoint of a lightningkd run, or a plain state_dict file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

STUDENT_PREFIX = "student."


def extract_state_dict(obj: Any, prefix: str | None = None) -> dict[str, Tensor]:
    """Find the model weights inside a loaded checkpoint object.

    Accepts a plain ``state_dict``, a dict holding one under ``"state_dict"``, ``"model"``,
    ``"model_state_dict"`` or ``"module"``, and Lightning checkpoints of lightningkd runs (whose weights
    sit under the ``student.`` prefix; pass ``prefix`` to pick another sub-module).
    """
    state = obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            "The file does not hold a state_dict (a mapping of names to tensors), nor a dict with one under "
            "'state_dict', 'model', 'model_state_dict' or 'module'."
        )
    if prefix is None and any(k.startswith(STUDENT_PREFIX) for k in state):
        prefix = STUDENT_PREFIX  # a lightningkd run: its student is the model the user wants
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ValueError(f"No weights start with the prefix {prefix!r} in this checkpoint.")
    return dict(state)


def load_weights(
    model: nn.Module, path: str | os.PathLike, prefix: str | None = None, strict: bool = True
) -> nn.Module:
    """Load the weights in ``path`` into ``model`` (see :func:`extract_state_dict`) and return it.

    Example:
        >>> import tempfile, torch, torch.nn as nn
        >>> net = nn.Linear(2, 2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save({"state_dict": {"student." + k: v for k, v in net.state_dict().items()}}, d + "/run.ckpt")
        ...     _ = load_weights(nn.Linear(2, 2), d + "/run.ckpt")
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    state = extract_state_dict(obj, prefix)
    hint = "Check the model name, num_classes and small_input against the run that wrote the file."
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when strict=False
        raise RuntimeError(
            f"The weights in {path!r} do not fit {type(model).__name__}: {err}\n{hint}"
        ) from None
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"The weights in {path!r} do not fit {type(model).__name__}: missing keys {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
            f"{'...' if len(unexpected) > 10 else ''}. {hint}"
        )
    return model
