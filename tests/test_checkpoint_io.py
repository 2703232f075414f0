"""The safe checkpoint reader: real mmengine checkpoints load, malicious and broken files are refused."""

import builtins
import os
import pickle
import pickletools
import time
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from lightningkd import checkpoint_io
from lightningkd.checkpoint_io import (
    CheckpointError,
    PickledStandIn,
    UnsafeCheckpointError,
    best_key_prefix,
    describe_key_mismatch,
    is_lightning_checkpoint,
    load_checkpoint_file,
)
from tests.toys import toy_classifier

HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"


def save_mmengine_checkpoint(path: Path, model: nn.Module, hub_name: str, step: Tensor | None = None) -> None:
    """Write ``model`` as mmengine's ``Runner.save_checkpoint`` does (mmengine 0.10).

    The dict holds ``meta``, ``state_dict`` (``weights_to_cpu``), ``message_hub`` (the hub's
    ``state_dict()`` with tensors moved to the CPU) and ``optimizer`` (the ``OptimWrapper``'s state), and
    is written by ``mmengine.runner.checkpoint.save_checkpoint``. With ``step`` (an input batch), one SGD
    step is taken first (it changes ``model``), so the optimizer state holds momentum buffers.
    """
    mmengine = pytest.importorskip("mmengine")
    from mmengine.logging import MessageHub
    from mmengine.optim import OptimWrapper
    from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu
    from mmengine.utils import apply_to

    optim_wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    if step is not None:
        model(step).sum().backward()
        optim_wrapper.step()
    hub = MessageHub.get_instance(hub_name)
    for step in range(3):
        hub.update_scalar("train/loss", 1.0 / (step + 1))
        hub.update_scalar("train/lr", np.float64(0.01))
    hub.update_info("iter", 3)
    hub.update_info("epoch", 1)
    meta = {
        "epoch": 1,
        "iter": 3,
        "cfg": "model = dict(type='EncoderDecoder')",
        "seed": 0,
        "experiment_name": "toy",
        "time": time.strftime("%Y%m%d_%H%M%S", time.localtime()),
        "mmengine_version": mmengine.__version__,
        "dataset_meta": {"classes": ("road", "car"), "palette": [[128, 64, 128], [0, 0, 142]]},
    }
    checkpoint = {
        "meta": meta,
        "state_dict": weights_to_cpu(model.state_dict()),
        "message_hub": apply_to(hub.state_dict(), lambda x: hasattr(x, "cpu"), lambda x: x.cpu()),
        "optimizer": apply_to(optim_wrapper.state_dict(), lambda x: hasattr(x, "cpu"), lambda x: x.cpu()),
    }
    with warnings.catch_warnings():  # mmengine's FileClient deprecation notices
        warnings.simplefilter("ignore")
        save_checkpoint(checkpoint, str(path))


def pickle_globals(path: Path) -> set[str]:
    """``module.name`` of every GLOBAL opcode in a torch zip checkpoint, read with pickletools."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    return {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.fixture(scope="module")
def mmengine_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    path = tmp_path_factory.mktemp("mmengine") / "iter_3.pth"
    model = toy_classifier(width=4, seed=0)
    save_mmengine_checkpoint(path, model, hub_name="test_checkpoint_io", step=torch.randn(2, 3, 8, 8))
    return path, model


def test_mmengine_checkpoint_really_holds_metadata_globals(mmengine_file) -> None:
    path, _ = mmengine_file
    names = pickle_globals(path)
    assert "__builtin__.getattr" in names  # protocol 2 spells builtins the Python 2 way
    assert HISTORY_BUFFER in names
    assert any(n.endswith("multiarray._reconstruct") for n in names)
    with pytest.raises(pickle.UnpicklingError):  # torch's weights-only reader alone refuses this file
        torch.load(path, weights_only=True)


def test_mmengine_checkpoint_loads_exact_weights_and_inert_metadata(mmengine_file) -> None:
    path, model = mmengine_file
    loaded = load_checkpoint_file(path)
    assert set(loaded) == {"meta", "state_dict", "message_hub", "optimizer"}
    expected = model.state_dict()
    assert list(loaded["state_dict"]) == list(expected)
    for key, value in expected.items():
        assert torch.equal(loaded["state_dict"][key], value), key
        assert loaded["state_dict"][key].dtype == value.dtype
    momentum = loaded["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, model.stem[0].weight.grad)  # first SGD step: buffer = gradient
    assert loaded["meta"]["dataset_meta"]["classes"] == ("road", "car")
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, PickledStandIn) and buffer.pickled_global == HISTORY_BUFFER
    minimum = buffer.state["statistics_methods"]["min"]
    assert minimum.pickled_global == "builtins.getattr" and minimum.args[1] == "min"
    assert minimum.args[0].pickled_global == HISTORY_BUFFER  # the class stand-in, not mmengine's class
    assert loaded["message_hub"]["runtime_info"] == OrderedDict(iter=3, epoch=1)


def test_every_global_goes_through_the_restricted_find_class(mmengine_file, monkeypatch) -> None:
    path, _ = mmengine_file
    asked = []
    original = checkpoint_io._RestrictedUnpickler.find_class

    def spy(self, module, name):
        asked.append(f"{module}.{name}")
        return original(self, module, name)

    monkeypatch.setattr(checkpoint_io._RestrictedUnpickler, "find_class", spy)
    load_checkpoint_file(path)
    # torch resolves storage types ("torch.FloatStorage") itself, to dtype markers, before find_class
    expected = {n for n in pickle_globals(path) if "Storage" not in n}
    assert set(asked) == expected


class ShellPayload:
    """Pickles as ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecPayload:
    """Pickles as ``builtins.exec("open(<marker>, 'w').close()")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _valid_state() -> OrderedDict:
    return OrderedDict(toy_classifier(width=4).state_dict())


MALICIOUS = {
    "os.system": (lambda m: {"state_dict": _valid_state(), "callback": ShellPayload(m)}, 2, "posix.system"),
    "builtins.exec": (lambda m: ExecPayload(m), 2, "builtins.exec"),
    "nested in a state dict": (
        lambda m: {"state_dict": OrderedDict(_valid_state(), **{"fc.extra": ShellPayload(m)})},
        2,
        "posix.system",
    ),
    "protocol 4": (lambda m: {"state_dict": _valid_state(), "hook": ExecPayload(m)}, 4, "builtins.exec"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_files_are_refused_and_nothing_runs(case, tmp_path) -> None:
    build, protocol, expected_global = MALICIOUS[case]
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save(build(marker), path, pickle_protocol=protocol)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_checkpoint_file(path)
    message = str(caught.value)
    assert str(path) in message and expected_global in message
    assert "only tensors and plain metadata" in message and "state_dict" in message  # the way out
    assert not marker.exists()


def test_every_global_of_a_refused_file_is_named(tmp_path) -> None:
    marker = tmp_path / "marker"
    torch.save({"a": ShellPayload(marker), "b": ExecPayload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"\['builtins.exec', 'posix.system'\]"):
        load_checkpoint_file(tmp_path / "evil.pth")
    assert not marker.exists()


class _Deferred:
    """Pickles as ``func(*args)``; ``func`` may itself be a _Deferred (a call of a call's result)."""

    def __init__(self, func, args) -> None:
        self.func, self.args = func, args

    def __call__(self):  # pickle requires reduce functions to be callable
        raise AssertionError("never called while pickling")

    def __reduce__(self):
        return self.func, self.args


def test_getattr_is_never_really_called(tmp_path) -> None:
    # getattr(OrderedDict, "fromkeys")(["a"]) would build {"a": None} if getattr ran for real
    payload = _Deferred(_Deferred(getattr, (OrderedDict, "fromkeys")), (["a"],))
    torch.save({"state_dict": _valid_state(), "x": payload}, tmp_path / "getattr.pth")
    with pytest.raises(CheckpointError, match="getattr.pth"):
        load_checkpoint_file(tmp_path / "getattr.pth")
    torch.save({"x": _Deferred(getattr, (OrderedDict, "fromkeys"))}, tmp_path / "plain_getattr.pth")
    stand_in = load_checkpoint_file(tmp_path / "plain_getattr.pth")["x"]
    assert isinstance(stand_in, PickledStandIn) and stand_in.args == (OrderedDict, "fromkeys")


def test_truncated_empty_text_and_folder_paths_get_clear_messages(mmengine_file, tmp_path) -> None:
    torch.save({"fc.weight": torch.ones(64, 64)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.pt.*incomplete"):
        load_checkpoint_file(tmp_path / "half.pt")
    mm_data = mmengine_file[0].read_bytes()
    (tmp_path / "half_mm.pth").write_bytes(mm_data[: len(mm_data) // 2])
    with pytest.raises(CheckpointError, match=r"half_mm\.pth.*incomplete"):
        load_checkpoint_file(tmp_path / "half_mm.pth")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt.*empty \(0 bytes\)"):
        load_checkpoint_file(tmp_path / "empty.pt")
    (tmp_path / "recipe.yaml").write_text("model:\n  class_path: x\n")
    with pytest.raises(CheckpointError, match=r"recipe\.yaml.*is a text file.*not a PyTorch checkpoint"):
        load_checkpoint_file(tmp_path / "recipe.yaml")
    (tmp_path / "random.bin").write_bytes(bytes([0, 255, 3, 7]) * 10)
    with pytest.raises(CheckpointError, match=r"random\.bin.*not a PyTorch checkpoint"):
        load_checkpoint_file(tmp_path / "random.bin")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_checkpoint_file(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope\.pt.*does not exist"):
        load_checkpoint_file(tmp_path / "nope.pt")


def test_legacy_format_loads_weights_and_refuses_code(tmp_path) -> None:
    state = {"fc.weight": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "legacy.pt")
    assert torch.equal(load_checkpoint_file(tmp_path / "legacy.pt")["fc.weight"], state["fc.weight"])
    marker = tmp_path / "marker"
    torch.save({"x": ShellPayload(marker)}, tmp_path / "legacy_evil.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match=r"legacy_evil\.pt.*posix\.system"):
        load_checkpoint_file(tmp_path / "legacy_evil.pt")
    assert not marker.exists()


def test_torchscript_archives_are_refused(tmp_path) -> None:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError, match=r"scripted\.pt.*TorchScript"):
        load_checkpoint_file(tmp_path / "scripted.pt")


def test_safetensors_files_load(tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    weights = {"fc.weight": torch.arange(4.0)}
    safetensors_torch.save_file(weights, tmp_path / "w.safetensors")
    assert torch.equal(load_checkpoint_file(tmp_path / "w.safetensors")["fc.weight"], weights["fc.weight"])


def test_is_lightning_checkpoint() -> None:
    assert is_lightning_checkpoint({"pytorch-lightning_version": "2.6.0"})
    assert is_lightning_checkpoint({"state_dict": {}, "optimizer_states": []})
    assert not is_lightning_checkpoint({"state_dict": {}, "meta": {}})  # an mmseg model-zoo file
    assert not is_lightning_checkpoint(OrderedDict(weight=torch.ones(1)))


def test_best_key_prefix_picks_the_run_matching_most_keys() -> None:
    model = ["fc.weight", "fc.bias"]
    assert best_key_prefix(["fc.weight", "fc.bias"], model) == ("", 2)
    assert best_key_prefix(["module._orig_mod.fc.weight", "module._orig_mod.fc.bias"], model) == (
        "module._orig_mod.",
        2,
    )
    # a student with one matching key, a teacher with both: the teacher matches more
    assert best_key_prefix(["student.fc.weight", "teacher.fc.weight", "teacher.fc.bias"], model) == (
        "teacher.",
        2,
    )
    assert best_key_prefix(["teacher.fc.weight", "architecture.fc.weight"], model) == ("architecture.", 1)
    assert best_key_prefix(["net.fc.weight"], model) == ("", 0)
    # a model whose own keys start with a known part: the exact keys win
    assert best_key_prefix(["model.fc.weight"], ["model.fc.weight", "fc.weight"]) == ("", 1)


def test_describe_key_mismatch_groups_by_module() -> None:
    missing = [f"auxiliary_head.convs.0.{p}" for p in ("weight", "bias")] + ["auxiliary_head.conv_seg.weight"]
    unexpected = ["backbone.layer4.0.conv1.weight", "backbone.layer4.1.conv1.weight", "weight"]
    assert describe_key_mismatch(missing, unexpected) == (
        "3 missing keys (in the model, not in the file):\n"
        "  auxiliary_head: 3 missing, e.g. auxiliary_head.convs.0.weight\n"
        "3 unexpected keys (in the file, not in the model):\n"
        "  backbone.layer4: 2 unexpected, e.g. backbone.layer4.0.conv1.weight\n"
        "  (top level): 1 unexpected, e.g. weight"
    )
    assert describe_key_mismatch([], []) == ""
    many = [f"head{i}.w" for i in range(5)]
    assert describe_key_mismatch(many, [], max_groups=2).splitlines()[-1] == (
        "  ... and 3 more missing keys in 3 other modules"
    )
