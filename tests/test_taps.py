import copy
import pickle

import pytest
import torch

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


def test_features_are_cleared_between_calls() -> None:
    model = toy_classifier()
    tap = FeatureTap(model, ["block"])
    tap(torch.ones(1, 3, 8, 8))
    assert tap.features == {}  # nothing kept after a call
    model(torch.ones(1, 3, 8, 8))  # a plain forward outside the tap is recorded...
    feats = tap(torch.zeros(1, 3, 8, 8))  # ...but dropped at the next tapped call
    torch.testing.assert_close(feats["block"], model.block(model.stem(torch.zeros(1, 3, 8, 8))))


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
