"""SegFormer (MiT-B0/B1/B2) through MMSegSegmenter: builds without a download, trains at square and
non-square sizes, and exposes the stage maps and patch embeddings under the names the docs give."""

import math

import pytest
import torch
from torch import nn

pytest.importorskip("mmseg")
pytest.importorskip("mmcv")

from lightningkd.models import MMSegSegmenter  # noqa: E402
from lightningkd.taps import FeatureTap  # noqa: E402

CONFIGS = {
    "b0": "segformer/segformer_mit-b0_8xb1-160k_cityscapes-1024x1024",
    "b1": "segformer/segformer_mit-b1_8xb1-160k_cityscapes-1024x1024",
    "b2": "segformer/segformer_mit-b2_8xb1-160k_cityscapes-1024x1024",
}
# Stage widths and blocks per stage of the MiT encoders (Xie et al., NeurIPS 2021, arXiv 2105.15203, Table 6)
WIDTHS = {"b0": (32, 64, 160, 256), "b1": (64, 128, 320, 512), "b2": (64, 128, 320, 512)}
DEPTHS = {"b0": (2, 2, 2, 2), "b1": (2, 2, 2, 2), "b2": (3, 4, 6, 3)}


def _refuse(*args, **kwargs):
    raise AssertionError("a pretrained-weight download was attempted")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    from mmengine.runner.checkpoint import CheckpointLoader

    monkeypatch.setattr(CheckpointLoader, "load_checkpoint", classmethod(_refuse))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)


def _stage_sides(side: int) -> list[int]:
    """Stage sides of MiT by hand: a 7x7/4 patch embedding (padding 3), then 3x3/2 ones (padding 1)."""
    sides = [(side + 2 * 3 - 7) // 4 + 1]
    for _ in range(3):
        sides.append((sides[-1] + 2 * 1 - 3) // 2 + 1)
    return sides


@pytest.mark.parametrize("num_classes", [11, 19])
@pytest.mark.parametrize("variant", ["b0", "b1", "b2"])
def test_segformer_trains_at_square_and_non_square_sizes(variant, num_classes) -> None:
    torch.manual_seed(0)
    model = MMSegSegmenter(CONFIGS[variant], num_classes=num_classes).train()
    assert model.num_classes == num_classes and model.auxiliary_head is None
    assert len(model.backbone.layers) == 4
    assert [len(stage[1]) for stage in model.backbone.layers] == list(DEPTHS[variant])
    for height, width in ((64, 64), (64, 80)):
        model.zero_grad()
        logits = model(torch.randn(1, 3, height, width))  # batch 1: the head's BatchNorms see >= 4 values
        assert tuple(logits.shape) == (1, num_classes, height // 4, width // 4)  # SegFormer: 1/4 resolution
        labels = torch.randint(0, num_classes, (1, height // 4, width // 4))
        nn.functional.cross_entropy(logits, labels).backward()
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name


def test_stage_maps_and_patch_embeddings_are_tappable() -> None:
    model = MMSegSegmenter(CONFIGS["b0"], num_classes=19).eval()
    height, width = 64, 80
    hs, ws = _stage_sides(height), _stage_sides(width)
    assert (hs, ws) == ([16, 8, 4, 2], [20, 10, 5, 3])
    names = [f"backbone:{i}" for i in range(4)]
    names += [f"backbone.layers.{i}.0:0" for i in range(4)]  # PatchEmbed returns (tokens, (H, W))
    names += [f"backbone.layers.{i}.2" for i in range(4)]  # the stage's closing LayerNorm: tokens
    names += [f"decode_head.convs.{i}" for i in range(4)] + ["decode_head.fusion_conv"]
    with FeatureTap(model, names) as tap, torch.no_grad():
        feats = tap(torch.randn(1, 3, height, width))
    for i, (h, w, c) in enumerate(zip(hs, ws, WIDTHS["b0"])):
        assert tuple(feats[f"backbone:{i}"].shape) == (1, c, h, w)
        assert tuple(feats[f"backbone.layers.{i}.0:0"].shape) == (1, h * w, c)
        tokens = feats[f"backbone.layers.{i}.2"]
        assert tuple(tokens.shape) == (1, h * w, c)
        # the stage map is the LayerNorm's tokens laid out row-major on the (H, W) grid, no prefix token
        torch.testing.assert_close(feats[f"backbone:{i}"], tokens.transpose(1, 2).reshape(1, c, h, w))
        assert tuple(feats[f"decode_head.convs.{i}"].shape) == (1, 256, h, w)  # projected before resizing
    assert tuple(feats["decode_head.fusion_conv"].shape) == (1, 256, 16, 20)
    assert math.prod(feats["output"].shape) == 19 * 16 * 20
