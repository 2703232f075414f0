"""Load weights a user points at into a model: a Lightning checkpoint, a model-zoo file or a state_dict.

Files are read with :func:`lightningkd.checkpoint_io.load_checkpoint_file` (no code runs while reading).
Their keys may carry a wrapper's prefix (``student.`` for lightningkd runs, ``architecture.`` for
mmrazor, ``module.`` for DDP, ``model.``, ``_orig_mod.`` for ``torch.compile``, ``teacher.``, or a run of
them): the prefix under which most keys are keys of the model is stripped. A load that matches no key
fails, even with ``strict=False``, rather than leaving the model at its random initialisation.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightningkd.checkpoint_io import (
    KNOWN_PREFIXES,
    best_key_prefix,
    describe_key_mismatch,
    load_checkpoint_file,
)

STUDENT_PREFIX = "student."
# Names of auxiliary heads: mmseg's segmentors and torchvision's segmentation models.
AUX_HEAD_NAMES = ("auxiliary_head", "aux_classifier")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
_STRICT_FALSE = "strict=False loads the matching keys only."


def extract_state_dict(
    obj: Any, prefix: str | None = None, model_state: Mapping[str, Tensor] | Collection[str] | None = None
) -> dict[str, Tensor]:
    """Find the model weights inside a loaded checkpoint object and strip their prefix.

    Accepts a plain ``state_dict`` and a dict holding one under ``"state_dict"`` (Lightning, mmengine,
    mmrazor), ``"model_state_dict"``, ``"model"`` or ``"module"``. The state_dict's version metadata
    (which modules such as BatchNorm read while loading) is kept, with the prefix stripped from it too.

    Args:
        obj: the loaded file.
        prefix: strip exactly this prefix and keep only the keys that carry it (``""``: keep every key
            as it is). Wins over the automatic choice.
        model_state: the ``state_dict()`` (or the keys) of the model the weights are for. With it (and no
            ``prefix``), the prefix (a run of :data:`~lightningkd.checkpoint_io.KNOWN_PREFIXES`, or none)
            under which most keys fit the model is stripped, and keys outside it are dropped (see
            :func:`~lightningkd.checkpoint_io.best_key_prefix`). Without it, ``student.`` is stripped when
            keys carry it (a lightningkd run: its student is the model).

    Returns:
        The weights, keys relative to the model.

    Raises:
        ValueError: no tensor mapping in ``obj``, or no key starts with the explicit ``prefix``.

    Example:
        >>> import torch
        >>> ckpt = {"state_dict": {"module.student.fc.weight": torch.ones(1), "distillers.0.w": torch.ones(1)}}
        >>> list(extract_state_dict(ckpt, model_state=["fc.weight", "fc.bias"]))
        ['fc.weight']
    """
    state = obj
    if isinstance(obj, Mapping):
        for key in _CONTAINER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        found = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            "The file does not hold a state_dict (a mapping of names to tensors), nor a dict with one under "
            f"{_CONTAINER_KEYS}; found {found}."
        )
    if prefix is None:
        if model_state is not None:
            prefix, _ = best_key_prefix(state, model_state)
        else:
            prefix = STUDENT_PREFIX if any(k.startswith(STUDENT_PREFIX) for k in state) else ""
    stripped = _strip_prefix(state, prefix)
    if state and not stripped:
        raise ValueError(
            f"No weights start with the prefix {prefix!r} in this checkpoint; its keys start with "
            f"{_leading_components(state)}."
        )
    return stripped


def _strip_prefix(state: Mapping[str, Tensor], prefix: str) -> OrderedDict[str, Tensor]:
    """The keys under ``prefix``, without it; ``state._metadata`` (module versions) re-keyed alike."""
    stripped = OrderedDict((k[len(prefix) :], v) for k, v in state.items() if k.startswith(prefix))
    metadata = getattr(state, "_metadata", None)
    if isinstance(metadata, Mapping):
        # metadata keys are module paths without the trailing dot: "student" is the root of "student."
        module = prefix[:-1] if prefix.endswith(".") else prefix
        stripped._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if k == module else k[len(prefix) :], v)
            for k, v in metadata.items()
            if not prefix or k == module or k.startswith(prefix)
        )
    return stripped


def _leading_components(keys: Iterable[str], limit: int = 8) -> list[str]:
    """The first dot-components of ``keys``, most common first (e.g. ``['student.', 'distillers.']``)."""
    counts: dict[str, int] = {}
    for key in keys:
        head = key.split(".", 1)[0] + ("." if "." in key else "")
        counts[head] = counts.get(head, 0) + 1
    return sorted(counts, key=lambda k: -counts[k])[:limit]


def _mismatch_hint(missing: list[str], unexpected: list[str]) -> str:
    """A fix that fits what differs, or ``""`` when nothing specific applies."""

    def under_aux_head(key: str) -> bool:
        return key.split(".", 1)[0] in AUX_HEAD_NAMES

    if missing and not unexpected and all(under_aux_head(k) for k in missing):
        return "The file has no auxiliary head: build the model with aux_head=False."
    if unexpected and not missing and all(under_aux_head(k) for k in unexpected):
        return "The file has an auxiliary head the model lacks: build the model with aux_head=True."
    return ""


def load_state_dict_checked(
    model: nn.Module, state: Mapping[str, Tensor], source: str, strict: bool = True, hint: str = ""
) -> nn.Module:
    """``model.load_state_dict(state)`` with errors that name ``source`` and say what differs.

    Args:
        model: the model to fill.
        state: weights whose keys are relative to ``model`` (see :func:`extract_state_dict`).
        source: where the weights come from (the file), for messages.
        strict: fail on missing or unexpected keys; ``False`` loads the matching keys only.
        hint: what to check when the weights do not fit (the arguments that shape this model).

    Raises:
        RuntimeError: no key of ``state`` is a model key (even with ``strict=False``), shapes differ, or
            (``strict``) keys are missing or unexpected; the message groups them by module.

    Example:
        >>> import torch.nn as nn
        >>> net = load_state_dict_checked(nn.Linear(2, 2), nn.Linear(2, 2).state_dict(), "a fresh Linear")
    """
    model_keys = list(model.state_dict())
    name = type(model).__name__
    if not any(key in state for key in model_keys):
        raise RuntimeError(
            f"None of the {len(state)} weights in {source} is a key of {name}, so nothing would be loaded "
            f"(refused even with strict=False). The file's keys look like {sorted(state)[:5]}; the model's "
            f"like {model_keys[:5]}. If the file's keys carry a prefix other than {list(KNOWN_PREFIXES)}, "
            "pass it as `prefix`; otherwise the file holds another model."
        )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when strict=False
        raise RuntimeError(f"The weights in {source} do not fit {name}: {err}\n{hint}".rstrip()) from None
    if strict and (missing or unexpected):
        advice = " ".join(filter(None, [_mismatch_hint(missing, unexpected) or hint, _STRICT_FALSE]))
        raise RuntimeError(
            f"The weights in {source} do not fit {name}:\n{describe_key_mismatch(missing, unexpected)}\n{advice}"
        )
    return model


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    prefix: str | None = None,
    strict: bool = True,
    hint: str = "Check that the file holds this architecture (name, num_classes ...) without a wrapper.",
) -> nn.Module:
    """Load the weights in ``path`` into ``model`` and return it.

    The file is read without running code (:func:`~lightningkd.checkpoint_io.load_checkpoint_file`); its
    weights are found and their prefix stripped by :func:`extract_state_dict` (``prefix`` overrides the
    automatic choice), then loaded by :func:`load_state_dict_checked`.

    Args:
        model: the model to fill.
        path: a Lightning checkpoint (``student.`` weights are taken), a model-zoo file or a state_dict.
        prefix: the key prefix to strip; ``None`` picks the known prefix matching most model keys.
        strict: fail on missing or unexpected keys. A file matching no key fails in both cases.
        hint: appended to the error when the weights do not fit.

    Example:
        >>> import tempfile, torch, torch.nn as nn
        >>> net = nn.Linear(2, 2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.save({"state_dict": {"student." + k: v for k, v in net.state_dict().items()}}, d + "/run.ckpt")
        ...     loaded = load_weights(nn.Linear(2, 2), d + "/run.ckpt")
        >>> torch.equal(loaded.weight, net.weight)
        True
    """
    path = os.fspath(path)
    obj = load_checkpoint_file(path)
    state = extract_state_dict(obj, prefix, model_state=model.state_dict())
    return load_state_dict_checked(model, state, repr(path), strict=strict, hint=hint)
