"""Classifiers by name: timm transformers built for 32x32 images (small_input) and model_kwargs."""

import socket

import pytest
import torch
from torch import nn

from lightningkd.models import classifier
from lightningkd.taps import FeatureTap


def _refuse(*args, **kwargs):
    raise AssertionError("a download was attempted")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any network connection or timm/torch.hub weight fetch fails while these tests run."""
    import timm.models._builder

    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", _refuse)
    monkeypatch.setattr(timm.models._builder, "load_custom_pretrained", _refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)


def _train_step(model: nn.Module, classes: int) -> None:
    """One forward + backward at 32x32 in train mode; every trainable parameter gets a finite gradient."""
    model.train()
    logits = model(torch.randn(2, 3, 32, 32))
    assert torch.is_tensor(logits) and tuple(logits.shape) == (2, classes)
    nn.functional.cross_entropy(logits, torch.tensor([0, classes - 1])).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name


# Expected grids by hand: 32 / patch 4 = 8 (ViT, DeiT); Swin 32 / 2 = 16, then halved per stage
@pytest.mark.parametrize(
    ("name", "prefix", "width"),
    [
        ("vit_tiny_patch16_224", 1, 192),
        ("deit_tiny_patch16_224", 1, 192),
        ("deit_tiny_distilled_patch16_224", 2, 192),
    ],
)
def test_vit_and_deit_get_4_pixel_patches_at_32x32(name, prefix, width) -> None:
    model = classifier(name, num_classes=10, small_input=True, library="timm")
    assert model.patch_embed.grid_size == (8, 8) and model.patch_embed.proj.stride == (4, 4)
    assert model.num_prefix_tokens == prefix
    model.eval()
    with FeatureTap(model, ["patch_embed", "blocks.0", "blocks.11"]) as tap, torch.no_grad():
        feats = tap(torch.randn(2, 3, 32, 32))
    assert tuple(feats["patch_embed"].shape) == (2, 64, width)
    assert tuple(feats["blocks.0"].shape) == tuple(feats["blocks.11"].shape) == (2, 64 + prefix, width)
    _train_step(model, 10)  # the distilled DeiT averages its two heads: one (N, classes) tensor


def test_swin_gets_2_pixel_patches_and_windows_that_tile_its_stages() -> None:
    # swin_tiny's 4 stages and window logic, at a quarter of its width and 8 of its 12 blocks (test speed)
    narrow = {"depths": (2, 2, 2, 2), "embed_dim": 24, "num_heads": (1, 2, 4, 8)}
    model = classifier("swin_tiny_patch4_window7_224", num_classes=7, small_input=True, model_kwargs=narrow)
    assert model.patch_embed.grid_size == (16, 16) and model.patch_embed.proj.stride == (2, 2)
    model.eval()
    stages = [f"layers.{i}" for i in range(4)]
    with FeatureTap(model, stages) as tap, torch.no_grad():
        feats = tap(torch.randn(2, 3, 32, 32))
    expected = [(2, 16, 16, 24), (2, 8, 8, 48), (2, 4, 4, 96), (2, 2, 2, 192)]  # NHWC
    assert [tuple(feats[s].shape) for s in stages] == expected
    blocks = [m for m in model.modules() if type(m).__name__ == "SwinTransformerBlock"]
    assert len(blocks) == 8
    for block in blocks:
        grid, window = block.input_resolution, block.window_size
        assert grid[0] % window[0] == 0 and grid[1] % window[1] == 0, (grid, window)
        assert window == ((4, 4) if grid[0] >= 4 else (2, 2))  # timm shrinks the window on the 2x2 stage
    assert blocks[1].shift_size == (2, 2)  # the 16x16 stage still alternates shifted windows
    _train_step(model, 7)


def test_swin_tiny_small_input_runs_at_32x32() -> None:
    model = classifier("swin_tiny_patch4_window7_224", num_classes=7, small_input=True).eval()
    with torch.no_grad():
        assert tuple(model(torch.zeros(1, 3, 32, 32)).shape) == (1, 7)
    assert model.layers[0].blocks[0].window_size == (4, 4)


@pytest.mark.parametrize("name", ["convnext_atto", "convnext_atto_ols"])  # patch stem, overlap stem
def test_convnext_gets_a_stride_one_stem(name) -> None:
    model = classifier(name, num_classes=10, small_input=True)
    assert all(m.stride == (1, 1) for m in model.stem.modules() if isinstance(m, nn.Conv2d))
    model.eval()
    stages = [f"stages.{i}" for i in range(4)]
    with FeatureTap(model, stages) as tap, torch.no_grad():
        feats = tap(torch.randn(2, 3, 32, 32))
    # the grids of a CIFAR ResNet's layer1 ... layer4; convnext_atto's widths are 40, 80, 160, 320
    expected = [(2, 40, 32, 32), (2, 80, 16, 16), (2, 160, 8, 8), (2, 320, 4, 4)]
    assert [tuple(feats[s].shape) for s in stages] == expected
    _train_step(model, 10)


def test_model_kwargs_override_the_small_input_settings() -> None:
    model = classifier(
        "vit_tiny_patch16_224",
        num_classes=4,
        small_input=True,
        model_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2},
    )
    assert model.patch_embed.grid_size == (4, 4) and len(model.blocks) == 2 and model.embed_dim == 48
    _train_step(model, 4)
    convnext = classifier(
        "convnext_atto_ols", num_classes=4, small_input=True, model_kwargs={"patch_size": 2}
    )
    assert convnext.stem[0].stride == (2, 2)  # the user named a stem setting: the stem is left as built


def test_model_kwargs_without_small_input() -> None:
    model = classifier(
        "deit_tiny_distilled_patch16_224",
        num_classes=3,
        model_kwargs={"img_size": 48, "patch_size": 8, "depth": 1},
    )
    assert model.patch_embed.grid_size == (6, 6) and len(model.blocks) == 1
    assert tuple(model.eval()(torch.zeros(1, 3, 48, 48)).shape) == (1, 3)


def test_model_kwargs_for_a_torchvision_model_fail_clearly() -> None:
    with pytest.raises(
        ValueError, match=r"model_kwargs \['depth'\] go to timm.create_model.*'resnet18'.*torchvision"
    ):
        classifier("resnet18", num_classes=3, model_kwargs={"depth": 2})
    with pytest.raises(ValueError, match=r"'convnext_tiny' is built by torchvision.*library='timm'"):
        classifier("convnext_tiny", num_classes=3, model_kwargs={"depths": [1, 1, 1, 1]})


def test_model_kwargs_that_the_model_does_not_take_fail_clearly() -> None:
    with pytest.raises(TypeError, match=r"'vit_tiny_patch16_224' does not take .*'nope'"):
        classifier("vit_tiny_patch16_224", num_classes=3, model_kwargs={"nope": 1})
    with pytest.raises(ValueError, match=r"may not set \['num_classes', 'pretrained'\]"):
        classifier("vit_tiny_patch16_224", model_kwargs={"pretrained": True, "num_classes": 3})


def test_small_input_refuses_transformers_it_cannot_adapt() -> None:
    with pytest.raises(ValueError, match=r"cannot adapt torchvision's VisionTransformer .*library='timm'"):
        classifier("vit_b_16", num_classes=3, small_input=True)
    with pytest.raises(ValueError, match=r"'pvt_v2_b0' .*another transformer.*model_kwargs"):
        classifier("pvt_v2_b0", num_classes=3, small_input=True)


def test_small_input_vit_checkpoint_round_trip(tmp_path) -> None:
    kwargs = {
        "name": "vit_tiny_patch16_224",
        "num_classes": 3,
        "small_input": True,
        "model_kwargs": {"depth": 1},
    }
    net = classifier(**kwargs)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    again = classifier(**kwargs, checkpoint=str(tmp_path / "w.pt"))
    torch.testing.assert_close(again.pos_embed, net.pos_embed, rtol=0, atol=0)
    assert tuple(again.pos_embed.shape) == (1, 65, 192)  # class token + 8x8 patches
    with pytest.raises(RuntimeError, match="small_input and model_kwargs"):
        classifier(
            "vit_tiny_patch16_224",
            num_classes=3,
            model_kwargs={"depth": 1},
            checkpoint=str(tmp_path / "w.pt"),
        )
