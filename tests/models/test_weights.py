"""Loading weight files into models: wrapper prefixes, refusals and messages that fit the mismatch."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from lightningkd.models import TorchvisionSegmenter, extract_state_dict, load_backbone_weights, load_weights
from tests.test_checkpoint_io import save_mmengine_checkpoint
from tests.toys import toy_classifier


class TinySegmenter(nn.Module):
    """backbone (layer3, layer4) -> decode_head, plus an auxiliary_head, named as in mmseg."""

    def __init__(self, layer4: bool = True, aux: bool = True, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        stages = OrderedDict(layer3=nn.Conv2d(3, 4, 1))
        if layer4:
            stages["layer4"] = nn.Conv2d(4, 4, 1)
        self.backbone = nn.Sequential(stages)
        self.decode_head = nn.Conv2d(4, 2, 1)
        # 9 keys: conv (weight, bias), BN (weight, bias, running_mean, running_var, num_batches_tracked),
        # conv (weight, bias). A file without this head reports 8 missing: BatchNorm fills in its
        # num_batches_tracked itself when the file records no version for it (torch's rule for old files).
        self.auxiliary_head = (
            nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)) if aux else None
        )


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


PREFIXES = [
    "student.",
    "teacher.",
    "architecture.",
    "module.",
    "model.",
    "_orig_mod.",
    "module.student.",
    "student._orig_mod.",
    "module._orig_mod.",
]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_each_known_prefix_and_combination_is_stripped(prefix, tmp_path) -> None:
    source = toy_classifier(width=4, seed=1)
    torch.save({"state_dict": {prefix + k: v for k, v in source.state_dict().items()}}, tmp_path / "w.ckpt")
    loaded = load_weights(toy_classifier(width=4, seed=2), tmp_path / "w.ckpt")
    assert_same_weights(loaded, source)


def test_lightningkd_run_takes_the_student_and_skips_adapters(tmp_path) -> None:
    student, teacher = toy_classifier(width=4, seed=1), toy_classifier(width=4, seed=3)
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state |= {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    state["distillers.0.regressor.weight"] = torch.ones(4, 4)
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6.0"}, tmp_path / "run.ckpt")
    # same architecture under both prefixes: the student wins the tie, an explicit prefix wins over it
    assert_same_weights(load_weights(toy_classifier(width=4), tmp_path / "run.ckpt"), student)
    assert_same_weights(
        load_weights(toy_classifier(width=4), tmp_path / "run.ckpt", prefix="teacher."), teacher
    )


def test_the_prefix_matching_the_model_wins(tmp_path) -> None:
    student, teacher = toy_classifier(width=4, seed=1), toy_classifier(width=8, seed=3)
    state = {f"architecture.{k}": v for k, v in student.state_dict().items()}
    state |= {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "mmrazor.pth")
    # both prefixes carry every key name of the model; only teacher.* has its shapes
    assert_same_weights(load_weights(toy_classifier(width=8), tmp_path / "mmrazor.pth"), teacher)
    assert_same_weights(load_weights(toy_classifier(width=4), tmp_path / "mmrazor.pth"), student)


def test_explicit_prefix_that_no_key_carries_lists_the_file_prefixes(tmp_path) -> None:
    torch.save({f"module.{k}": v for k, v in toy_classifier(width=4).state_dict().items()}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"No weights start with the prefix 'student\.'.*\['module\.'\]"):
        load_weights(toy_classifier(width=4), tmp_path / "w.pt", prefix="student.")


@pytest.mark.parametrize("strict", [True, False])
def test_a_file_matching_no_key_is_refused_even_when_not_strict(strict, tmp_path) -> None:
    torch.save({f"net.{k}": v for k, v in toy_classifier(width=4).state_dict().items()}, tmp_path / "w.pt")
    model = toy_classifier(width=4, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as caught:
        load_weights(model, tmp_path / "w.pt", strict=strict)
    message = str(caught.value)
    assert "None of the 11 weights" in message and "refused even with strict=False" in message
    assert "net.block.0.bias" in message  # a few of the file's keys (sorted) ...
    assert "stem.0.weight" in message  # ... and of the model's
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_aux_head_gets_the_aux_hint_grouped(tmp_path) -> None:
    torch.save(TinySegmenter(aux=False).state_dict(), tmp_path / "no_aux.pt")
    with pytest.raises(RuntimeError) as caught:
        load_weights(TinySegmenter(), tmp_path / "no_aux.pt")
    message = str(caught.value)
    assert "auxiliary_head: 8 missing" in message
    assert "The file has no auxiliary head: build the model with aux_head=False." in message
    loaded = load_weights(TinySegmenter(seed=1), tmp_path / "no_aux.pt", strict=False)
    assert torch.equal(loaded.decode_head.weight, TinySegmenter(aux=False).decode_head.weight)


def test_prefixed_file_without_aux_head_gets_the_aux_hint(tmp_path) -> None:
    state = {f"module.{k}": v for k, v in TinySegmenter(aux=False).state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "ddp_no_aux.pt")
    with pytest.raises(RuntimeError, match=r"(?s)auxiliary_head: 8 missing.*aux_head=False"):
        load_weights(TinySegmenter(), tmp_path / "ddp_no_aux.pt")


def test_aux_hint_only_when_the_aux_head_is_all_that_differs(tmp_path) -> None:
    torch.save(TinySegmenter(layer4=False, aux=False).state_dict(), tmp_path / "small.pt")
    with pytest.raises(RuntimeError) as caught:
        load_weights(TinySegmenter(), tmp_path / "small.pt")
    message = str(caught.value)
    assert "backbone.layer4: 2 missing" in message and "auxiliary_head: 8 missing" in message
    assert "aux_head" not in message
    assert "Check that the file holds this architecture" in message

    torch.save(TinySegmenter().state_dict(), tmp_path / "big.pt")
    with pytest.raises(RuntimeError) as caught:
        load_weights(TinySegmenter(layer4=False), tmp_path / "big.pt")
    message = str(caught.value)
    assert "backbone.layer4: 2 unexpected" in message and "aux_head" not in message

    with pytest.raises(
        RuntimeError, match="has an auxiliary head the model lacks: build the model with aux_head=True"
    ):
        load_weights(TinySegmenter(aux=False), tmp_path / "big.pt")


def test_mmengine_checkpoint_loads_through_load_weights(tmp_path) -> None:
    source = toy_classifier(width=4, seed=1)
    save_mmengine_checkpoint(tmp_path / "iter_3.pth", source, hub_name="test_weights")
    assert_same_weights(load_weights(toy_classifier(width=4, seed=2), tmp_path / "iter_3.pth"), source)


def test_extract_state_dict_without_model_keys_takes_the_student() -> None:
    state = {"student.fc.weight": torch.ones(1), "distillers.0.w": torch.zeros(1)}
    assert list(extract_state_dict({"state_dict": state})) == ["fc.weight"]
    assert list(extract_state_dict(state, prefix="")) == ["student.fc.weight", "distillers.0.w"]
    with pytest.raises(ValueError, match=r"does not hold a state_dict.*found \['epoch', 'meta'\]"):
        extract_state_dict({"epoch": 3, "meta": {}})


def test_backbone_weights_from_a_ddp_classifier_file(tmp_path) -> None:
    imagenet = torchvision.models.mobilenet_v3_large(num_classes=3)
    torch.save({"model": {f"module.{k}": v for k, v in imagenet.state_dict().items()}}, tmp_path / "ddp.pth")
    net = TorchvisionSegmenter("lraspp_mobilenet_v3_large", num_classes=2)
    load_backbone_weights(net.backbone, tmp_path / "ddp.pth")
    torch.testing.assert_close(net.backbone["16"][0].weight, imagenet.features[16][0].weight, rtol=0, atol=0)

    partial = {k: v for k, v in imagenet.state_dict().items() if not k.startswith("features.16.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match=r"(?s)lack 6 of the backbone's .* keys.*  16: 6 missing"):
        load_backbone_weights(net.backbone, tmp_path / "partial.pth")
