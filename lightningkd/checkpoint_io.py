"""Read checkpoint files without running code, and explain key mismatches.

Every weight file lightningkd opens (a teacher checkpoint, a backbone's ImageNet weights, the input of
``lightningkd export``) goes through :func:`load_checkpoint_file`. Pickle files can hold instructions to
call any Python function while they are read; this module lets them build tensors and plain data only:

1. ``torch.load(path, map_location="cpu", weights_only=True)``: torch's own restricted unpickler.
2. Files that hold more than tensors and plain data, but only known, harmless metadata, are read again
   with a restricted unpickler whose ``find_class`` returns the real object only for the globals of
   torch's weights-only allowlist and an inert :class:`PickledStandIn` for a short allowlist of metadata
   globals (:data:`METADATA_GLOBALS`): mmsegmentation model-zoo checkpoints saved by mmengine carry the
   training's ``message_hub`` (mmengine ``HistoryBuffer`` objects holding numpy arrays, whose statistics
   methods are pickled as ``getattr(HistoryBuffer, "min")``). A stand-in records what it stands for and
   runs nothing: no import, no call of the real function.
3. Any other global (``os.system``, ``builtins.exec``, an unknown class) is refused with
   :class:`UnsafeCheckpointError`, before anything it asks for happens.

Missing, empty, truncated, text and folder paths get a :class:`CheckpointError` (or ``FileNotFoundError``
/ ``IsADirectoryError``) naming the file and the problem, never a raw zip or unpickling traceback.

The key helpers (:func:`best_key_prefix`, :func:`describe_key_mismatch`) compare the keys (and shapes) of
a file with those of a model. This module imports nothing from the rest of lightningkd.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import re
import types
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import _weights_only_unpickler

# Metadata globals read as inert stand-ins, not built (names after the Python 2 -> 3 renaming that
# protocol-2 pickles, the torch.save default, need: "__builtin__.getattr" is "builtins.getattr").
METADATA_GLOBALS: frozenset[str] = frozenset(
    {
        "mmengine.logging.history_buffer.HistoryBuffer",  # the message_hub of mmengine checkpoints
        "builtins.getattr",  # HistoryBuffer's statistics methods: getattr(HistoryBuffer, "min")
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",  # numpy < 2 spelling
        "numpy._core.multiarray._reconstruct",  # numpy >= 2 spelling
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        # DeepSpeed ZeRO optimizer files (zero_pp_rank_*_optim_states.pt): the stage as an enum, the loss
        # scaler's settings and the address of each parameter's slice; read by load_deepspeed_checkpoint
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)
# ``_codecs.encode`` (the bytes of numpy arrays in protocol-2 pickles) is in torch's own allowlist, so the
# real function is used: it only turns a string into bytes.

KNOWN_PREFIXES: tuple[str, ...] = ("student.", "architecture.", "module.", "model.", "_orig_mod.", "teacher.")
"""Key prefixes that wrap a model's own keys in a checkpoint, in tie-break order.

``student.``: lightningkd runs; ``architecture.``: mmrazor's student; ``module.``: DDP / DataParallel;
``model.``: many training scripts; ``_orig_mod.``: ``torch.compile``; ``teacher.``: a saved teacher.
"""

_CONVERT_HINT = (
    "If you trust this file, convert it once in Python, outside lightningkd: `obj = torch.load(path)` with "
    "weights_only turned off (this runs what the file asks for), then "
    "`torch.save(obj['state_dict'], 'weights.pt')` (or the state_dict() of the model it holds), and point "
    "lightningkd at weights.pt."
)


class CheckpointError(ValueError):
    """A file that is not a complete, readable PyTorch checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint asking to build or call something other than tensors and plain metadata."""


class PickledStandIn:
    """Inert stand-in for an object of a checkpoint's metadata (an mmengine HistoryBuffer, a numpy array).

    Each allowed metadata global gets a subclass whose :attr:`pickled_global` names it. Calling the
    subclass, or the unpickler creating an instance of it, records the arguments in :attr:`args`; the
    state the file sets on it lands in :attr:`state`. Nothing else happens.

    Example:
        >>> getattr_stand_in = _stand_in_class("builtins.getattr")
        >>> call = getattr_stand_in(_stand_in_class("numpy.ndarray"), "min")
        >>> call.pickled_global, call.args[1]
        ('builtins.getattr', 'min')
        >>> call
        <stand-in builtins.getattr(<stand-in class numpy.ndarray>, 'min')>
    """

    pickled_global: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledStandIn:
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # everything was recorded by __new__

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        args = ", ".join(_short_repr(a) for a in self.args)
        return f"<stand-in {self.pickled_global}({args})>"


def _short_repr(value: Any) -> str:
    if isinstance(value, type) and issubclass(value, PickledStandIn):
        return f"<stand-in class {value.pickled_global}>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_STAND_IN_CLASSES: dict[str, type[PickledStandIn]] = {}


def _stand_in_class(qualified_name: str) -> type[PickledStandIn]:
    """The (cached) :class:`PickledStandIn` subclass standing for ``qualified_name``."""
    if qualified_name not in _STAND_IN_CLASSES:
        cls = type(qualified_name.rsplit(".", 1)[-1], (PickledStandIn,), {"pickled_global": qualified_name})
        _STAND_IN_CLASSES[qualified_name] = cls
    return _STAND_IN_CLASSES[qualified_name]


def _python3_name(module: str, name: str) -> str:
    """``module.name`` with Python 2 names (written by protocol-2 pickles) mapped as pickle itself does."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


class _RefusedGlobal(Exception):
    """Raised from find_class: the pickle asked for a global outside both allowlists."""

    def __init__(self, qualified_name: str) -> None:
        super().__init__(qualified_name)
        self.qualified_name = qualified_name


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals from two allowlists only; never imports a module or calls what a file names.

    Why this is safe: a pickle can only reach Python callables through ``find_class`` (the GLOBAL,
    STACK_GLOBAL and INST opcodes resolve through it, and so do EXT codes, of which none is registered
    with ``copyreg``; REDUCE, NEWOBJ and BUILD then act on what it returned). Here it returns torch's weights-only allowlist (tensor rebuild functions, dtypes,
    ``OrderedDict`` ...: what ``torch.load(weights_only=True)`` itself builds) or inert stand-ins, and
    raises for any other name, before it is imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        qualified = _python3_name(module, name)
        torch_allowed = _weights_only_unpickler._get_allowed_globals()
        if qualified in torch_allowed:
            return torch_allowed[qualified]
        if qualified in METADATA_GLOBALS:
            return _stand_in_class(qualified)
        raise _RefusedGlobal(qualified)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load(pickle_module=...) subclasses ``pickle_module.Unpickler`` (its subclass reaches our find_class
# through super()) and calls ``pickle_module.load`` for legacy files: both go through _RestrictedUnpickler,
# so whichever path torch takes, every global is resolved from the allowlists only (safe).
_restricted_pickle = types.ModuleType("lightningkd_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = _restricted_load  # restricted too: see the comment above
_restricted_pickle.UnpicklingError = pickle.UnpicklingError


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file on the CPU without running any code it contains.

    Tensors, containers and plain values load as usual; the metadata of mmengine checkpoints
    (:data:`METADATA_GLOBALS`) loads as inert :class:`PickledStandIn` objects. ``.safetensors`` files are
    read with safetensors.

    Args:
        path: the file.

    Returns:
        The saved object (for a checkpoint: a dict).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        UnsafeCheckpointError: the file asks for other globals (names them; nothing was run).
        CheckpointError: an empty, truncated, text or otherwise unreadable file.

    Example:
        >>> import tempfile, torch
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     torch.save({"state_dict": {"fc.weight": torch.ones(2, 2)}}, folder + "/w.pt")
        ...     load_checkpoint_file(folder + "/w.pt")["state_dict"]["fc.weight"].sum().item()
        4.0
    """
    path = os.fspath(path)
    zipped = check_checkpoint_file(path)
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    with open(path, "rb") as file:
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if not zipped:
                raise _legacy_refusal(path, err) from None
        except Exception as err:  # torch's zip reader raises RuntimeError, EOFError ...
            raise CheckpointError(
                f"Checkpoint {path!r} is damaged or incomplete and cannot be read ({type(err).__name__}: "
                f"{_first_line(err)}). Copy or save it again."
            ) from None
        file.seek(0)
        return _load_with_metadata(path, file)


def check_checkpoint_file(path: str | os.PathLike) -> bool:
    """Check, without reading its content, that ``path`` can be a complete PyTorch checkpoint.

    Looks at the file's size, its first bytes and (for the zip format of ``torch.save``) the archive's
    index at its end, so a truncated download, an empty file, a text file or a folder is named before a
    loader fails on it with a raw zip or unpickling error. Lightning's ``--ckpt_path`` goes through it in
    the ``lightningkd`` command.

    Returns:
        ``True`` for the zip format (torch >= 1.6), ``False`` for the legacy pickle format and safetensors.

    Raises:
        FileNotFoundError, IsADirectoryError, CheckpointError: as :func:`load_checkpoint_file`.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix=".ckpt") as f:
        ...     _ = f.write("model: resnet18")
        ...     f.flush()
        ...     check_checkpoint_file(f.name)
        Traceback (most recent call last):
        ...
        lightningkd.checkpoint_io.CheckpointError: Checkpoint '...' is a text file (it starts with 'model: resnet18'), not a PyTorch checkpoint. Point at the .ckpt / .pth / .pt file written by torch.save.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Checkpoint {path!r} does not exist.")
    if os.path.isdir(path):
        if is_deepspeed_checkpoint(path):
            raise IsADirectoryError(
                f"Checkpoint {path!r} is a DeepSpeed checkpoint folder (Lightning's DeepSpeedStrategy writes "
                f"one per save), not a file: write its student with `lightningkd export {path} student.pt` "
                "and point at student.pt."
            )
        if os.path.exists(os.path.join(path, ".metadata")):
            raise IsADirectoryError(
                f"Checkpoint {path!r} is a sharded checkpoint folder (torch.distributed.checkpoint, written by "
                "FSDP with state_dict_type 'sharded'), which lightningkd does not read: train with "
                "lightningkd.strategies.DistillationFSDPStrategy (full checkpoints), or, if you trust the "
                "folder, convert it once with torch.distributed.checkpoint.format_utils.dcp_to_torch_save."
            )
        raise IsADirectoryError(
            f"Checkpoint {path!r} is a folder, not a file: point at the checkpoint file inside it "
            "(e.g. a .ckpt or .pth file saved by torch.save)."
        )
    if os.path.getsize(path) == 0:
        raise CheckpointError(
            f"Checkpoint {path!r} is empty (0 bytes): the save or copy that wrote it was interrupted. "
            "Copy or save it again."
        )
    if path.endswith(".safetensors"):
        return False
    with open(path, "rb") as file:
        return _check_format(path, file)


_DEEPSPEED_MODEL_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_DEEPSPEED_OPTIMIZER_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
# what DeepSpeed adds to the client state (Lightning's checkpoint) in its model file
_DEEPSPEED_KEYS = frozenset(
    {
        "module",
        "buffer_names",
        "optimizer",
        "param_shapes",
        "frozen_param_shapes",
        "frozen_param_fragments",
        "shared_params",
        "lr_scheduler",
        "data_sampler",
        "random_ltd",
        "sparse_tensor_module_names",
        "skipped_steps",
        "global_steps",
        "global_samples",
        "dp_world_size",
        "mp_world_size",
        "checkpoint_parallel_dimensions",
        "ds_config",
        "ds_version",
    }
)


def _deepspeed_tag_folder(path: str) -> str | None:
    """The folder holding a DeepSpeed checkpoint's files: ``path`` itself, or the tag named in ``latest``."""
    if any(_DEEPSPEED_MODEL_FILE.fullmatch(name) for name in os.listdir(path)):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest) and os.path.getsize(latest) < 4096:
        with open(latest, encoding="utf-8", errors="replace") as file:
            tag = file.read().strip()
        folder = os.path.join(path, tag)
        if (
            tag
            and os.path.isdir(folder)
            and any(_DEEPSPEED_MODEL_FILE.fullmatch(n) for n in os.listdir(folder))
        ):
            return folder
    return None


def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint folder (``latest`` + ``<tag>/mp_rank_00_model_states.pt``).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     is_deepspeed_checkpoint(folder)
        False
    """
    path = os.fspath(path)
    return os.path.isdir(path) and _deepspeed_tag_folder(path) is not None


def _plain_int(value: Any) -> int:
    """An int, or the value inside the stand-in of an int enum (DeepSpeed's ZeroStageEnum)."""
    if isinstance(value, PickledStandIn) and len(value.args) == 1:
        value = value.args[0]
    if isinstance(value, (list, tuple)):  # partition_count: one entry per parameter group
        return max(_plain_int(v) for v in value)
    if not isinstance(value, int):
        raise CheckpointError(f"Expected an integer in a DeepSpeed optimizer file, found {value!r}.")
    return int(value)


def load_deepspeed_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed ZeRO stage 1 or 2 checkpoint folder into a Lightning checkpoint, without running code.

    Lightning's ``DeepSpeedStrategy`` saves a folder per checkpoint: ``latest`` names the tag folder
    (``checkpoint``), which holds ``mp_rank_00_model_states.pt`` (the module's weights in the training
    precision, its buffers, the parameter shapes, and Lightning's own checkpoint entries) and one
    ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per process, each with the fp32 master weights of its
    slice of every parameter group. The trainable weights are rebuilt in fp32 as DeepSpeed's
    ``zero_to_fp32`` does: per group, the ranks' slices are concatenated in rank order and cut into the
    parameters in the order of ``param_shapes`` (skipping the alignment padding the file records); buffers,
    frozen parameters (when the run saved them) and tied parameters come from the model file. Every file
    is read with :func:`load_checkpoint_file` (DeepSpeed's enum, loss-scaler and fragment objects load as
    inert stand-ins).

    Args:
        path: the checkpoint folder (the ``.ckpt`` folder Lightning wrote, or its tag folder).

    Returns:
        Lightning's checkpoint entries with ``"state_dict"``: full fp32 weights, keys as in the module.

    Raises:
        CheckpointError: not a DeepSpeed folder, ZeRO stage 3 (parameters themselves partitioned), model
            parallel files, or files missing or inconsistent with each other.
    """
    path = os.fspath(path)
    folder = _deepspeed_tag_folder(path) if os.path.isdir(path) else None
    if folder is None:
        raise CheckpointError(
            f"{path!r} is not a DeepSpeed checkpoint folder: it holds neither mp_rank_00_model_states.pt nor a "
            "'latest' file naming a folder that does."
        )
    names = os.listdir(folder)
    model_files = sorted(n for n in names if _DEEPSPEED_MODEL_FILE.fullmatch(n))
    if model_files != ["mp_rank_00_model_states.pt"]:
        raise CheckpointError(
            f"DeepSpeed checkpoint {folder!r} holds the model files {model_files}: tensor or pipeline model "
            "parallel checkpoints are not supported; only data parallel ZeRO stage 1/2 folders are."
        )
    optimizer_files = {}
    for name in names:
        match = _DEEPSPEED_OPTIMIZER_FILE.fullmatch(name)
        if match:
            optimizer_files[int(match.group(1))] = os.path.join(folder, name)
    model = load_checkpoint_file(os.path.join(folder, model_files[0]))
    if not optimizer_files:
        raise CheckpointError(
            f"DeepSpeed checkpoint {folder!r} has no zero_pp_rank_*_optim_states.pt files, which hold the fp32 "
            "weights: the save was interrupted or the files were not copied. Copy the whole folder."
        )
    first = load_checkpoint_file(optimizer_files[min(optimizer_files)])["optimizer_state_dict"]
    stage = _plain_int(first["zero_stage"])
    if stage not in (1, 2):
        raise CheckpointError(
            f"DeepSpeed checkpoint {folder!r} is ZeRO stage {stage}; lightningkd reads stages 1 and 2. If you trust "
            "the folder, convert it once with lightning.pytorch.utilities.deepspeed."
            "convert_zero_checkpoint_to_fp32_state_dict(folder, 'model.ckpt') (it unpickles the files, running "
            "what they ask for) and export model.ckpt."
        )
    world_size = _plain_int(first["partition_count"])
    if sorted(optimizer_files) != list(range(world_size)):
        raise CheckpointError(
            f"DeepSpeed checkpoint {folder!r} was written by {world_size} processes but holds the optimizer files "
            f"of ranks {sorted(optimizer_files)}: files are missing or left from another save. Copy the folder "
            "again."
        )
    slices = [first["single_partition_of_fp32_groups"]]
    for rank in range(1, world_size):
        state = load_checkpoint_file(optimizer_files[rank])["optimizer_state_dict"]
        slices.append(state["single_partition_of_fp32_groups"])
    paddings = first.get("param_alignment_paddings")
    module = model["module"]
    weights: dict[str, torch.Tensor] = {}
    for group, shapes in enumerate(model["param_shapes"]):
        flat = torch.cat([ranks[group].reshape(-1) for ranks in slices])
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = int(torch.Size(shape).numel())
            if offset + numel > flat.numel():
                raise CheckpointError(
                    f"DeepSpeed checkpoint {folder!r}: the fp32 slices of parameter group {group} hold "
                    f"{flat.numel()} values, fewer than its parameters need (at {name!r}): the files come "
                    "from different saves or runs."
                )
            weights[name] = flat[offset : offset + numel].view(shape).clone()
            offset += numel + (int(paddings[group][index]) if paddings else 0)
    for name in [*(model.get("buffer_names") or []), *(model.get("frozen_param_shapes") or {})]:
        if name in module:
            value = module[name]
            weights[name] = value.float() if value.is_floating_point() else value
    for name, source in (model.get("shared_params") or {}).items():
        if source in weights:
            weights[name] = weights[source]
    # the module's key order; keys written only by older Lightning carry its wrapper's prefix
    order = {key: i for i, key in enumerate(module)}
    state_dict = {
        key.removeprefix("_forward_module."): weights[key]
        for key in sorted(weights, key=lambda k: order.get(k, len(order)))
    }
    checkpoint = {k: v for k, v in model.items() if k not in _DEEPSPEED_KEYS}
    checkpoint["state_dict"] = state_dict
    return checkpoint


def _load_safetensors(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise CheckpointError(
            f"Checkpoint {path!r} is not a complete safetensors file ({type(err).__name__}: "
            f"{_first_line(err)}). Copy or save it again."
        ) from None


def _check_format(path: str, file: Any) -> bool:
    """Check the leading bytes: ``True`` for a torch zip checkpoint, ``False`` for the legacy format."""
    head = file.read(512)
    file.seek(0)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(file) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            raise CheckpointError(
                f"Checkpoint {path!r} is incomplete: it is a truncated zip archive (its end, which indexes the "
                "content, is missing), e.g. an interrupted download, copy or save. Copy or save it again."
            ) from None
        finally:
            file.seek(0)
        records = {name.split("/", 1)[-1] for name in names}
        if "constants.pkl" in records:
            raise CheckpointError(
                f"Checkpoint {path!r} is a TorchScript archive (torch.jit.save), not a state_dict file. "
                "lightningkd loads weights only; if you trust the file, save its weights once with "
                "`torch.save(torch.jit.load(path).state_dict(), 'weights.pt')`."
            )
        if "data.pkl" not in records:
            raise CheckpointError(
                f"Checkpoint {path!r} is a zip archive but not a PyTorch checkpoint (it holds no data.pkl; "
                f"first entries: {names[:5]}). Point at a file written by torch.save."
            )
        return True
    if head.startswith(b"\x80") or head[257:262] == b"ustar":  # a pickle, or the oldest tar-based format
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        preview = text[:60].splitlines()[0] if text.strip() else repr(text[:20])
        raise CheckpointError(
            f"Checkpoint {path!r} is a text file (it starts with {preview!r}), not a PyTorch checkpoint. "
            "Point at the .ckpt / .pth / .pt file written by torch.save."
        )
    raise CheckpointError(
        f"Checkpoint {path!r} is not a PyTorch checkpoint (it starts with the bytes {head[:8]!r}, not a "
        "zip archive nor a pickle). Point at a file written by torch.save."
    )


def _legacy_refusal(path: str, err: pickle.UnpicklingError) -> CheckpointError:
    """Error for a legacy-format (pre-1.6, non-zip) file that torch's weights-only loader refused."""
    asked = sorted(set(re.findall(r"GLOBAL (\S+)", str(err))))
    if asked:
        return UnsafeCheckpointError(
            f"Refused to load {path!r}: this legacy-format (non-zip) checkpoint asks to build or call {asked}, "
            "which are not tensors nor plain data, and nothing it asks for was run. lightningkd loads only "
            f"tensors and plain metadata, so that reading a file never runs code. {_CONVERT_HINT}"
        )
    return CheckpointError(
        f"Checkpoint {path!r} is damaged, incomplete or not a PyTorch checkpoint: torch's weights-only loader "
        "cannot read it. Copy or save it again."
    )


def _load_with_metadata(path: str, file: Any) -> Any:
    """Read a zip checkpoint through :class:`_RestrictedUnpickler` (storages load as usual)."""
    try:
        # weights_only=False only hands torch our pickle module: _RestrictedUnpickler resolves every global
        # the file names from the two allowlists and refuses the rest before anything is imported or run
        return torch.load(file, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except _RefusedGlobal as refused:
        asked = {refused.qualified_name}
        file.seek(0)
        try:  # name every global the file asks for: a static read of its opcodes, nothing is built
            asked |= set(torch.serialization.get_unsafe_globals_in_checkpoint(file)) - METADATA_GLOBALS
        except Exception:  # opcodes the static reader does not know: name the first
            pass
        raise UnsafeCheckpointError(
            f"Refused to load {path!r}: it asks to build or call {sorted(asked)}, which are not tensors nor "
            "plain metadata, and nothing it asks for was run. lightningkd loads only tensors and plain "
            f"metadata (numbers, strings, lists, dicts, mmengine logs), so that reading a file never runs "
            f"code. {_CONVERT_HINT}"
        ) from None
    except Exception as err:  # a malformed pickle: name the file, not the opcode
        raise CheckpointError(
            f"Checkpoint {path!r} is damaged or holds data lightningkd cannot read ({type(err).__name__}: "
            f"{_first_line(err)}). lightningkd loads tensors and plain metadata only. {_CONVERT_HINT}"
        ) from None


def _first_line(err: Any) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_lightning_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a Lightning checkpoint (a training run's state, not bare weights).

    Example:
        >>> is_lightning_checkpoint({"state_dict": {}, "loops": {}, "epoch": 3})
        True
        >>> is_lightning_checkpoint({"fc.weight": None})
        False
    """
    if not isinstance(obj, Mapping):
        return False
    if "pytorch-lightning_version" in obj:
        return True
    return "state_dict" in obj and ("loops" in obj or "optimizer_states" in obj)


def _leading_parts(key: str, parts: tuple[str, ...]) -> list[str]:
    """The run of ``parts`` that ``key`` starts with: ``module.student.fc.w`` -> ``["module.", "student."]``."""
    found = []
    rest = key
    while (part := next((p for p in parts if rest.startswith(p)), None)) is not None:
        found.append(part)
        rest = rest[len(part) :]
    return found


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if torch.is_tensor(value) else None


def best_key_prefix(
    file_keys: Iterable[str] | Mapping[str, Any],
    model_keys: Iterable[str] | Mapping[str, Any],
    parts: tuple[str, ...] = KNOWN_PREFIXES,
) -> tuple[str, int]:
    """The prefix to strip from a file's keys so that most of them are keys of the model.

    Candidates are ``""`` and every run of ``parts`` a file key starts with (``module.student.``,
    ``student._orig_mod.`` ...). When both arguments are state_dicts (mappings to tensors), a key counts
    only if its shape agrees too, so a student and a teacher saved in one file under names of the same
    family (mmrazor's ``architecture.`` and ``teacher.``) are told apart. Ties go to the shorter run,
    then to the earlier part in ``parts`` (``student.`` before ``teacher.``: pass an explicit prefix to
    take the teacher of a checkpoint holding two copies of one architecture).

    Args:
        file_keys: the file's keys, or its state_dict.
        model_keys: the model's keys, or its state_dict.
        parts: the prefixes that may wrap keys (each ending with a dot).

    Returns:
        The prefix and how many file keys, stripped of it, are model keys (``("", 0)`` when none match).

    Example:
        >>> best_key_prefix(["module.student.fc.weight", "module.student.fc.bias"], ["fc.weight", "fc.bias"])
        ('module.student.', 2)
        >>> best_key_prefix(["student.fc.weight", "teacher.fc.weight"], ["fc.weight"])
        ('student.', 1)
        >>> import torch
        >>> file = {"student.fc.weight": torch.ones(2, 4), "teacher.fc.weight": torch.ones(2, 8)}
        >>> best_key_prefix(file, {"fc.weight": torch.zeros(2, 8)})
        ('teacher.', 1)
    """
    with_shapes = isinstance(file_keys, Mapping) and isinstance(model_keys, Mapping)
    wanted = (
        {key: _shape(value) for key, value in model_keys.items()}
        if with_shapes
        else dict.fromkeys(model_keys)
    )
    matches: Counter[str] = Counter()
    for key in file_keys:
        shape = _shape(file_keys[key]) if with_shapes else None
        prefix = ""
        for part in ["", *_leading_parts(key, parts)]:
            prefix += part
            stripped = key[len(prefix) :]
            if stripped in wanted and wanted[stripped] == shape:
                matches[prefix] += 1
    if not matches:
        return "", 0

    def rank(prefix: str) -> tuple[int, int, list[int]]:
        chain = _leading_parts(prefix, parts)
        return -matches[prefix], len(chain), [parts.index(p) for p in chain]

    best = min(matches, key=rank)
    return best, matches[best]


def _module_path(key: str) -> str:
    return key.rpartition(".")[0]


def _common_module(keys: list[str]) -> str:
    """The deepest module path shared by ``keys`` (dot-separated components)."""
    paths = [_module_path(k).split(".") for k in keys]
    shared = []
    for components in zip(*paths, strict=False):
        if len(set(components)) != 1:
            break
        shared.append(components[0])
    return ".".join(shared)


def _group_lines(keys: list[str], kind: str, max_groups: int) -> list[str]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".", 1)[0] if "." in key else "", []).append(key)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    lines = []
    for top, members in ordered[:max_groups]:
        name = _common_module(members) or top or "(top level)"
        lines.append(f"  {name}: {len(members)} {kind}, e.g. {members[0]}")
    if len(ordered) > max_groups:
        rest = sum(len(m) for _, m in ordered[max_groups:])
        lines.append(f"  ... and {rest} more {kind} keys in {len(ordered) - max_groups} other modules")
    return lines


def describe_key_mismatch(missing: Iterable[str], unexpected: Iterable[str], max_groups: int = 8) -> str:
    """Summarise missing and unexpected ``state_dict`` keys, grouped by the module they belong to.

    Keys are grouped by their top-level module and each group is named by the deepest module all its keys
    share, so a whole missing head reads ``auxiliary_head: 24 missing`` and a stage the model lacks
    ``backbone.layer4: 12 unexpected``.

    Args:
        missing: keys the model has and the file lacks.
        unexpected: keys the file has and the model lacks.
        max_groups: groups listed per kind; the others are counted.

    Returns:
        A multi-line summary (empty when both are empty).

    Example:
        >>> print(describe_key_mismatch(["aux.conv.weight", "aux.conv.bias"], ["backbone.layer4.0.weight"]))
        2 missing keys (in the model, not in the file):
          aux.conv: 2 missing, e.g. aux.conv.weight
        1 unexpected keys (in the file, not in the model):
          backbone.layer4.0: 1 unexpected, e.g. backbone.layer4.0.weight
    """
    missing, unexpected = list(missing), list(unexpected)
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing keys (in the model, not in the file):")
        lines += _group_lines(missing, "missing", max_groups)
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected keys (in the file, not in the model):")
        lines += _group_lines(unexpected, "unexpected", max_groups)
    return "\n".join(lines)
