"""Forward-hook feature taps: read intermediate activations of any unmodified model by layer name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

Features = Mapping[str, Tensor]
"""Tapped activations of one model: ``"output"`` is the model's own output, other keys are layer names."""

OUTPUT = "output"
"""Key of the model's own output in :data:`Features` (always present, never a layer name)."""

ITEM_SEPARATOR = ":"
"""``"<layer>:<key>"`` taps one entry of a layer that returns a dict (an FPN level ``"backbone:p6"``) or,
with an integer key, of a layer that returns a list or tuple (an mmseg backbone's stage ``"backbone:2"``)."""


def list_layers(model: nn.Module) -> list[str]:
    """Return the names of every tappable layer of ``model`` (its ``named_modules()`` paths).

    Example:
        >>> import torch.nn as nn
        >>> list_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
        ['0', '1']
    """
    return [name for name, _ in model.named_modules() if name]


def describe_layers(model: nn.Module, example_input: Tensor | None = None) -> str:
    """A printable table of layer names, module types and (given an example input) output shapes."""
    shapes: dict[str, str] = {}
    if example_input is not None:
        tap = FeatureTap(model, list_layers(model))
        with torch.no_grad():
            was_training = model.training
            model.eval()
            features = tap(example_input)
            model.train(was_training)
        tap.remove()
        shapes = {k: _shape(v) for k, v in features.items()}
    modules = dict(model.named_modules())
    width = max((len(n) for n in modules), default=4)
    lines = []
    for name in list_layers(model):
        line = f"{name:<{width}}  {type(modules[name]).__name__}"
        if name in shapes:
            line += f"  {shapes[name]}"
        lines.append(line)
    return "\n".join(lines)


def _shape(value: Any) -> str:
    if torch.is_tensor(value):
        return str(tuple(value.shape))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shape(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in value.items()) + "}"
    return type(value).__name__


class FeatureTap:
    """Record the outputs of named layers of a model with forward hooks.

    Calling the tap runs the model and returns a dict holding each tapped layer's output under its name
    and the model's own output under ``"output"``. Stored features are cleared at every call, so nothing
    from a previous batch leaks into the next.

    A name ``"<layer>:<key>"`` records one entry of a layer's output: the entry ``key`` of a dict (the FPN
    levels of a torchvision detector's ``backbone``: ``"backbone:0"`` ... ``"backbone:pool"``), or the
    entry at index ``key`` (a non-negative integer) of a list or tuple (the stage maps of an mmseg
    backbone: ``"backbone:0"`` ... ``"backbone:3"``; the tokens of mmseg's ``PatchEmbed``, which returns
    ``(tokens, hw_shape)``: ``"backbone.layers.0.0:0"``). A key the layer does not return, or an index out
    of range, fails at the first call naming the keys it does return or the length of its output.

    Args:
        model: any ``nn.Module``; it is not modified apart from the hooks.
        layers: ``named_modules()`` paths to record. ``"output"`` is always available and need not be named.

    Raises:
        ValueError: a name that is not a layer of ``model``; the message lists the valid names.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        >>> tap = FeatureTap(net, ["0"])
        >>> feats = tap(torch.zeros(2, 3, 5, 5))
        >>> sorted(feats), tuple(feats["0"].shape)
        (['0', 'output'], (2, 4, 5, 5))
    """

    def __init__(self, model: nn.Module, layers: Iterable[str]) -> None:
        self.model = model
        self.layers = tuple(dict.fromkeys(name for name in layers if name != OUTPUT))
        modules = dict(model.named_modules())
        # one hook per module, storing every name (whole output or one entry) read from that module
        by_module: dict[str, list[tuple[str, str | None]]] = {}
        unknown = []
        for name in self.layers:
            module_name, sep, key = name.partition(ITEM_SEPARATOR)
            if module_name not in modules or module_name == "":
                unknown.append(name)
            by_module.setdefault(module_name, []).append((name, key if sep else None))
        if unknown:
            raise ValueError(
                f"Unknown layer name(s) {unknown} for {type(model).__name__}. Valid names: "
                f"{_abbreviate(list_layers(model))}. `lightningkd layers` prints them with their shapes."
            )
        self.features: dict[str, Any] = {}
        # hooks store only inside run(): a model called directly (evaluation, or ScaleKD running teacher
        # stages on student features) leaves nothing behind that would hold its tensors or graph
        self._recording = False
        # partial of a method (not a closure) keeps the hooked model picklable and deep-copyable
        self._handles = [
            modules[module_name].register_forward_hook(partial(self._store, module_name, tuple(names)))
            for module_name, names in by_module.items()
        ]

    def _store(
        self,
        module_name: str,
        names: tuple[tuple[str, str | None], ...],
        module: nn.Module,
        inputs: Any,
        output: Any,
    ) -> None:
        if not self._recording:
            return
        for name, key in names:
            if key is None:
                self.features[name] = output
            elif isinstance(output, Mapping):
                if key not in output:
                    keys = list(output)
                    raise KeyError(
                        f"Layer {name!r}: {module_name!r} returns the keys {keys}; name one of them after "
                        f"{ITEM_SEPARATOR!r}"
                        + (f" (e.g. {module_name}{ITEM_SEPARATOR}{keys[0]})." if keys else ".")
                    )
                self.features[name] = output[key]
            elif isinstance(output, (list, tuple)):
                self.features[name] = output[_sequence_index(name, module_name, key, output)]
            else:
                raise KeyError(
                    f"Layer {name!r}: {module_name!r} returns a {type(output).__name__}, not a dict, list or "
                    f"tuple; tap it as {module_name!r} (the whole output)."
                )

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.run(self.model, *args, **kwargs)

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Call ``fn`` (the model, or a part of it such as its backbone) and return the features it tapped.

        ``"output"`` is what ``fn`` returns. Layers that ``fn`` does not run are absent from the result.
        """
        self.features = {}
        self._recording = True
        try:
            output = fn(*args, **kwargs)
            features = dict(self.features)
        finally:
            self._recording = False
            self.features = {}
        features[OUTPUT] = output
        return features

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _sequence_index(name: str, module_name: str, key: str, output: Sequence[Any]) -> int:
    """The index named by ``key`` in a list/tuple output, or a KeyError naming the output's length."""
    n = len(output)
    what = f"a {type(output).__name__} of length {n} (" + (f"indices 0 to {n - 1})" if n else "no entries)")
    if not (key.isascii() and key.isdigit()):
        raise KeyError(
            f"Layer {name!r}: {module_name!r} returns {what}, read by index: name a non-negative integer "
            f"after {ITEM_SEPARATOR!r} (e.g. {module_name}{ITEM_SEPARATOR}0), not {key!r}."
        )
    if int(key) >= n:
        raise KeyError(f"Layer {name!r}: index {int(key)} is out of range: {module_name!r} returns {what}.")
    return int(key)


def _abbreviate(names: Sequence[str], limit: int = 60) -> str:
    if len(names) <= limit:
        return str(list(names))
    return str(list(names[:limit]))[:-1] + f", ... ({len(names) - limit} more)]"
