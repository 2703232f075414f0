import copy
import pickle

import pytest
import torch
from torch import nn

from lightningkd import FeatureTap, list_layers
from lightningkd.taps import describe_layers
from tests.toys import toy_classifier


def test_list_layers_names_every_submodule() -> None:
    names = list_layers(toy_classifier())
    assert names[:2] == ["stem", "stem.0"] and "fc" in names and "" not in names


def test_tap_returns_named_features_and_output() -> None:
    model = toy_classifier(num_classes=3, width=5)
    tap = FeatureTap(model, ["stem", "block"])
    feats = tap(torch.zeros(2, 3, 8, 8))
    assert tuple(feats["stem"].shape) == (2, 5, 8, 8)
    assert tuple(feats["block"].shape) == (2, 5, 4, 4)
    assert tuple(feats["output"].shape) == (2, 3)
    torch.testing.assert_close(feats["output"], model(torch.zeros(2, 3, 8, 8)))


class SometimesSide(nn.Module):
    """``main``, then ``side`` only while :attr:`use_side` is set: a layer that runs on some calls only."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(2, 2)
        self.side = nn.Linear(2, 2)
        self.use_side = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.main(x)
        return self.side(x) if self.use_side else x


def test_features_are_cleared_between_calls() -> None:
    model = SometimesSide()
    tap = FeatureTap(model, ["main", "side"])
    assert set(tap(torch.ones(1, 2))) == {"main", "side", "output"}
    assert tap.features == {}  # nothing kept after a call
    model.use_side = False
    feats = tap(torch.ones(1, 2))
    assert set(feats) == {"main", "output"}  # no stale "side" from the previous call


def test_features_of_an_untapped_forward_are_dropped() -> None:
    model = SometimesSide()
    tap = FeatureTap(model, ["main", "side"])
    model(torch.ones(1, 2))  # a plain forward outside the tap is recorded by the hooks...
    model.use_side = False
    feats = tap(torch.zeros(1, 2))  # ...but dropped when the next tapped call starts
    assert set(feats) == {"main", "output"}
    torch.testing.assert_close(feats["main"], model.main(torch.zeros(1, 2)))


def test_unknown_layer_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"Unknown layer name\(s\) \['layer9'\].*'stem.0'"):
        FeatureTap(toy_classifier(), ["layer9"])


def test_remove_detaches_hooks() -> None:
    model = toy_classifier()
    with FeatureTap(model, ["stem"]) as tap:
        assert len(model.stem._forward_hooks) == 1
    assert len(model.stem._forward_hooks) == 0 and tap.layers == ("stem",)


def test_tapped_model_can_be_pickled_and_deep_copied() -> None:
    model = toy_classifier()
    tap = FeatureTap(model, ["stem"])
    clone = pickle.loads(pickle.dumps(tap))
    assert "stem" in clone(torch.zeros(1, 3, 8, 8))
    copy.deepcopy(model)


def test_describe_layers_prints_shapes() -> None:
    text = describe_layers(toy_classifier(width=6), torch.zeros(1, 3, 8, 8))
    line = next(row for row in text.splitlines() if row.startswith("block "))
    assert line.split() == ["block", "Sequential", "(1,", "6,", "4,", "4)"]


class DictOut(nn.Module):
    """Returns a dict of two maps, like a detector's FPN backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.body(x)
        return {"0": y, "pool": y[..., ::2, ::2]}


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = DictOut()

    def forward(self, x):
        return self.backbone(x)["0"].sum()


def test_colon_names_tap_one_entry_of_a_dict_output() -> None:
    tap = FeatureTap(Holder(), ["backbone:pool", "backbone:0", "backbone"])
    features = tap(torch.zeros(1, 3, 4, 6))
    assert features["backbone:pool"].shape == (1, 4, 2, 3)
    assert features["backbone:0"].shape == (1, 4, 4, 6)
    assert set(features["backbone"]) == {"0", "pool"}


def test_colon_name_of_a_missing_entry_lists_the_entries() -> None:
    tap = FeatureTap(Holder(), ["backbone:p7"])
    with pytest.raises(KeyError, match=r"returns the keys \['0', 'pool'\].*backbone:0"):
        tap(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="Unknown layer name"):
        FeatureTap(Holder(), ["neck:0"])


def test_run_calls_a_part_of_the_model_and_keeps_what_it_tapped() -> None:
    model = Holder()
    tap = FeatureTap(model, ["backbone.body", "backbone:0"])
    features = tap.run(model.backbone, torch.zeros(1, 3, 2, 2))
    assert set(features) == {"backbone.body", "backbone:0", "output"}
    assert set(features["output"]) == {"0", "pool"}
    assert tap.features == {}


class SequenceOut(nn.Module):
    """Returns a list of two maps (as an mmseg backbone) or ``(tokens, hw_shape)`` (as mmseg's PatchEmbed)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.body(x)
        if self.kind == "list":
            return [y, y[..., ::2, ::2]]
        return y.flatten(2).transpose(1, 2), tuple(y.shape[-2:])


class SequenceHolder(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.backbone = SequenceOut(kind)

    def forward(self, x):
        return self.backbone(x)[0].sum()


def test_colon_index_taps_one_entry_of_a_list_or_tuple_output() -> None:
    tap = FeatureTap(SequenceHolder("list"), ["backbone:1", "backbone:0", "backbone"])
    features = tap(torch.zeros(1, 3, 4, 6))
    assert features["backbone:0"].shape == (1, 4, 4, 6)
    assert features["backbone:1"].shape == (1, 4, 2, 3)
    assert isinstance(features["backbone"], list) and len(features["backbone"]) == 2
    assert features["backbone:1"] is features["backbone"][1]
    tap = FeatureTap(SequenceHolder("tuple"), ["backbone:0", "backbone:1"])
    features = tap(torch.zeros(2, 3, 4, 6))
    assert features["backbone:0"].shape == (2, 24, 4)  # tokens of a 4x6 grid
    assert features["backbone:1"] == (4, 6)


def test_colon_index_out_of_range_or_not_an_integer_names_the_length() -> None:
    for kind, length in (("list", 2), ("tuple", 2)):
        tap = FeatureTap(SequenceHolder(kind), ["backbone:2"])
        with pytest.raises(
            KeyError, match=rf"index 2 is out of range.*a {kind} of length {length} \(indices 0 to 1\)"
        ):
            tap(torch.zeros(1, 3, 4, 4))
    tap = FeatureTap(SequenceHolder("list"), ["backbone:p6"])
    with pytest.raises(KeyError, match=r"a list of length 2.*non-negative integer.*backbone:0.*'p6'"):
        tap(torch.zeros(1, 3, 4, 4))
    tap = FeatureTap(SequenceHolder("list"), ["backbone:-1"])
    with pytest.raises(KeyError, match="non-negative integer"):
        tap(torch.zeros(1, 3, 4, 4))


def test_colon_name_of_a_tensor_output_says_to_tap_the_whole_layer() -> None:
    tap = FeatureTap(Holder(), ["backbone.body:0"])
    with pytest.raises(
        KeyError, match=r"returns a Tensor, not a dict, list or tuple; tap it as 'backbone.body'"
    ):
        tap(torch.zeros(1, 3, 4, 4))


def test_a_direct_call_of_the_model_stores_nothing() -> None:
    """Evaluation (or ScaleKD running teacher stages) calls the model outside the tap: nothing is kept."""
    model = SometimesSide()
    tap = FeatureTap(model, ["main", "side"])
    model(torch.ones(1, 2, requires_grad=True))
    assert tap.features == {}
    assert set(tap(torch.ones(1, 2))) == {"main", "side", "output"}
