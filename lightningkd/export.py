"""Student-only export: weights that load with ``strict=True`` into the bare student, or an ONNX file."""

from __future__ import annotations

import contextlib
import os
import secrets
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torchvision.models import detection

from lightningkd.checkpoint_io import (
    CheckpointError,
    is_deepspeed_checkpoint,
    is_lightning_checkpoint,
    load_checkpoint_file,
    load_deepspeed_checkpoint,
)
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
        checkpoint: the Lightning checkpoint of a lightningkd run: a file (single device, DDP, FSDP with
            full state dicts), or the folder Lightning's DeepSpeedStrategy writes (ZeRO stage 1/2, read
            with :func:`lightningkd.checkpoint_io.load_deepspeed_checkpoint`: the fp32 master weights).
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
    _check_output(output, overwrite, source=checkpoint)
    if is_deepspeed_checkpoint(checkpoint):  # a folder: Lightning's DeepSpeedStrategy, ZeRO stage 1/2
        loaded = load_deepspeed_checkpoint(checkpoint)
    else:
        loaded = load_checkpoint_file(checkpoint)
    state = extract_state_dict(loaded, prefix=prefix)
    _save_atomically(state, output)
    return len(state)


def _check_output(
    output: str, overwrite: bool, source: str | None = None, example: str = "student.pt"
) -> None:
    """Refuse outputs that would destroy something: the input, a training checkpoint, any file unasked."""
    if os.path.isdir(output) or output.endswith(("/", os.sep)):
        raise IsADirectoryError(
            f"The export output {output!r} is a folder: pass a file path, e.g. "
            f"{os.path.join(output, example)!r}."
        )
    if not os.path.exists(output):
        return
    if source is not None and os.path.samefile(source, output):
        raise FileExistsError(
            f"Refusing to export {source!r} over itself ({output!r} is the same file): pick another "
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


@contextlib.contextmanager
def _written_beside(output: str, suffix: str = ".tmp") -> Iterator[str]:
    """A temporary path in ``output``'s folder, renamed to ``output`` when the block succeeds, else removed."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(output)}.{secrets.token_hex(6)}{suffix}")
    try:
        yield temporary
        os.replace(temporary, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def _save_atomically(obj: Any, output: str) -> None:
    """``torch.save`` to a temporary file in the output's folder, then rename it to ``output``."""
    with _written_beside(output) as temporary:
        # O_EXCL: never reuse an existing file; mode 0o666 minus the umask, as a plain open() would give
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())


OnnxOutputs = list[np.ndarray]
# torchvision detectors: they take a list of images and return a list of dicts
_DETECTORS = (
    detection.generalized_rcnn.GeneralizedRCNN,
    detection.RetinaNet,
    detection.FCOS,
    detection.ssd.SSD,
)


def export_onnx(
    model: torch.nn.Module,
    output: str | os.PathLike,
    example: torch.Tensor,
    overwrite: bool = False,
    check: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    opset_version: int = 17,
) -> float | None:
    """Write ``model`` (a bare student: classifier, segmenter or torchvision detector) as an ONNX file.

    The model is exported in eval mode with torch's TorchScript-based exporter (``dynamo=False``): it is
    the one of torch's two exporters that handles torchvision's detectors, whose number of output boxes
    depends on the data. Batch size, height and width are dynamic axes of the input (a detector takes
    one image ``(3, H, W)``, as a torchvision detector in eval mode does, and returns ``boxes``,
    ``labels``, ``scores``). The file is written next to its final name and renamed into place, so a
    failed export leaves no partial file.

    With ``check`` (default), onnxruntime runs the file on ``example`` and every output must match the
    PyTorch model's within ``atol + rtol * |expected|``; otherwise the file is removed and the error
    names the output and its largest difference.

    Args:
        model: the student, as built for training (its weights loaded).
        output: the ``.onnx`` file to write.
        example: an input batch ``(N, C, H, W)`` of the size the model will see (a detector: ``N = 1``).
        overwrite: replace an existing ``output``.
        check: compare onnxruntime's outputs with PyTorch's on ``example`` (needs ``onnxruntime``).
        rtol, atol: the tolerance of the check.
        opset_version: the ONNX opset.

    Returns:
        The largest absolute difference found by the check (``None`` without ``check``).

    Raises:
        IsADirectoryError: ``output`` is a folder.
        FileExistsError: ``output`` is a Lightning checkpoint, or exists and ``overwrite`` is false.
        ValueError: the example is not a 4-D batch, or a detector example holds more than one image.
        AssertionError: onnxruntime's outputs differ from PyTorch's beyond the tolerance.
    """
    output = os.fspath(output)
    _check_output(output, overwrite, example="student.onnx")
    if example.dim() != 4:
        raise ValueError(f"example must be a batch (N, C, H, W); got shape {tuple(example.shape)}.")
    detector = _is_torchvision_detector(model)
    if detector and example.shape[0] != 1:
        raise ValueError(
            f"A detector exports with one image: example shape (1, C, H, W), got {tuple(example.shape)}."
        )
    model = model.eval()
    args = ([example[0]],) if detector else (example,)
    names = ["boxes", "labels", "scores"] if detector else ["output"]
    axes = (
        {"images": {1: "height", 2: "width"}}
        if detector
        else {"images": {0: "batch", 2: "height", 3: "width"}}
    )
    with _written_beside(output, suffix=".tmp.onnx") as temporary:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript tracer warnings on torchvision's detection code
            torch.onnx.export(
                model,
                args,
                temporary,
                dynamo=False,
                input_names=["images"],
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset_version,
            )
        difference = _check_onnx(model, args, temporary, names, rtol, atol) if check else None
    return difference


def run_onnx(path: str | os.PathLike, images: np.ndarray) -> OnnxOutputs:
    """Run an exported file with onnxruntime on the CPU; ``images`` as the model's input."""
    import onnxruntime  # optional dependency (pip install 'lightningkd[onnx]')

    session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})


def _check_onnx(
    model: torch.nn.Module, args: tuple, path: str, names: list[str], rtol: float, atol: float
) -> float:
    with torch.no_grad():
        expected = model(*args)
    if isinstance(expected, list):  # a torchvision detector: one dict per image
        expected = [expected[0][name] for name in names]
    elif isinstance(expected, torch.Tensor):
        expected = [expected]
    else:
        raise TypeError(
            f"The model returns {type(expected).__name__}; export expects a tensor or a detector's list of dicts."
        )
    got = run_onnx(path, args[0][0].numpy() if isinstance(args[0], list) else args[0].numpy())
    worst = 0.0
    for name, want, have in zip(names, expected, got):
        want = want.numpy()
        if want.shape != have.shape:
            raise AssertionError(f"ONNX output {name!r} has shape {have.shape}, PyTorch's {want.shape}.")
        difference = float(np.abs(have.astype(np.float64) - want).max()) if want.size else 0.0
        if not np.allclose(have, want, rtol=rtol, atol=atol):
            raise AssertionError(
                f"ONNX output {name!r} differs from PyTorch's by up to {difference:.3g} (tolerance atol {atol} "
                f"+ rtol {rtol}); the file was not written."
            )
        worst = max(worst, difference)
    return worst


def _is_torchvision_detector(model: torch.nn.Module) -> bool:
    return isinstance(model, _DETECTORS)
