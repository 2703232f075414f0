"""Forward-hook feature taps: read intermediate activations of any unmodified model by layer name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
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


class ModelCompileError(RuntimeError):
    """``torch.compile`` failed on a model run by a :class:`FeatureTap` (the cause is chained)."""


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

    :meth:`compile` makes calls of the tap run the model through ``torch.compile``: the hooks are traced
    into the compiled graph, and the model object itself is left uncompiled (see there).

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
        self._compile_options: dict[str, Any] | None = None
        self._compile_label = ""
        self._eager_hint = ""
        self._compiled: Callable[..., Any] | None = None
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
        if self._compile_options is None:
            return self.run(self.model, *args, **kwargs)
        if self._compiled is None:
            self._compiled = torch.compile(self.model, **self._compile_options)
        try:
            return self.run(self._compiled, *args, **kwargs)
        except Exception as error:
            # imported here: torch.compile has loaded it by now, and importing it up front costs seconds
            from torch._dynamo.exc import TorchDynamoException

            if not isinstance(error, TorchDynamoException):
                raise  # the model's own error (or a tap's), raised as in eager mode
            # dynamo and inductor errors (an op without a fake/meta kernel, a backend or C++ compiler
            # failure) surface here at the first call, or at a recompilation for a new input shape
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            # dynamo's first line is generic ("RuntimeError when making fake tensor call"); its
            # "Explanation:" line names the op or construct that failed
            summary = ". ".join(
                [line.rstrip(".") for line in lines[:1]]
                + [line for line in lines[1:] if line.startswith("Explanation:")][:1]
            )
            summary = summary if len(summary) <= 600 else summary[:597] + "..."
            raise ModelCompileError(
                f"torch.compile failed on {self._compile_label} ({type(self.model).__name__}): "
                f"{type(error).__name__}: {summary.rstrip('.')}. {self._eager_hint} (if the error remains "
                "eagerly, the model itself fails on this input)."
            ) from error

    def compile(
        self,
        label: str = "the model",
        eager_hint: str = "Run it eagerly (without FeatureTap.compile) to avoid compiling it",
        **options: Any,
    ) -> None:
        """Run the model through ``torch.compile`` whenever the tap is called; nothing is compiled yet.

        The compiled callable is built at the next call and compiled there (the cost of compiling falls on
        that first call, and again on a recompilation, e.g. for a new input shape or grad mode). Dynamo
        traces the forward hooks into the graph, so the tapped features are graph outputs and the
        features and gradients equal the eager ones up to floating-point reordering.

        The model itself stays a plain module: calling it directly (evaluation), its ``state_dict`` keys,
        pickling and export (``torch.onnx.export``, ``torch.jit.trace``, which refuse a dynamo-compiled
        module) are those of the uncompiled model. :meth:`run` with another ``fn`` runs ``fn`` as given.
        Hooks added to the model after the first compiled call are not seen (dynamo does not guard on
        module hooks by default, ``torch._dynamo.config.skip_nnmodule_hook_guards``): make every tap
        before that call.

        Args:
            label: how an error names the model (``"the student"``).
            eager_hint: the sentence an error ends with, saying how to run the model eagerly.
            **options: keyword arguments of :func:`torch.compile` (``mode``, ``backend``, ``dynamic`` ...).

        Raises:
            ModelCompileError: (at a call of the tap) dynamo or the backend failed on the model; the
                message names ``label`` and the model's class and ends with ``eager_hint``, and the
                original error is chained.

        Example:
            >>> import torch, torch.nn as nn
            >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            >>> tap = FeatureTap(net, ["0"])
            >>> tap.compile("the student", backend="eager")  # backend="eager": dynamo only, compiles fast
            >>> feats = tap(torch.ones(2, 4))
            >>> sorted(feats), tap.compiled, "_orig_mod" in str(list(net.state_dict()))
            (['0', 'output'], True, False)
        """
        self._compile_options = dict(options)
        self._compile_label = label
        self._eager_hint = eager_hint.rstrip(".")
        self._compiled = None

    @property
    def compiled(self) -> bool:
        """Whether calls of the tap run the model through ``torch.compile`` (see :meth:`compile`)."""
        return self._compile_options is not None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_compiled"] = None  # a compiled callable does not pickle: it is rebuilt at the next call
        return state

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
