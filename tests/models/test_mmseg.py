import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("mmseg")
pytest.importorskip("mmcv")

from lightningkd.checkpoint_io import UnsafeCheckpointError  # noqa: E402
from lightningkd.models.mmcv_ops import MMCVOpsMissingError, install_mmcv_ops_stand_in  # noqa: E402
from lightningkd.models.mmseg import (  # noqa: E402
    MMSegSegmenter,
    list_mmseg_configs,
    mmseg_config_dir,
    resolve_mmseg_config,
)
from lightningkd.taps import FeatureTap, list_layers  # noqa: E402
from tests.test_checkpoint_io import ShellPayload, save_mmengine_checkpoint  # noqa: E402

PSPNET = "pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024"
SEGFORMER = "segformer/segformer_mit-b0_8xb1-160k_cityscapes-1024x1024"


def _no_download(*args, **kwargs):
    raise AssertionError("a pretrained-weight download was attempted")


@pytest.fixture(scope="module")
def no_downloads():
    """Any attempt to fetch weights (mmengine's checkpoint loader, torch.hub) fails while building."""
    from mmengine.runner.checkpoint import CheckpointLoader

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CheckpointLoader, "load_checkpoint", classmethod(_no_download))
        mp.setattr(torch.hub, "load_state_dict_from_url", _no_download)
        yield


@pytest.fixture(scope="module")
def pspnet(no_downloads) -> MMSegSegmenter:
    torch.manual_seed(0)
    return MMSegSegmenter(PSPNET, num_classes=11)


@pytest.fixture(scope="module")
def zoo_files(pspnet, tmp_path_factory) -> dict[str, Path]:
    """The PSPNet weights as an mmseg model-zoo file and as a lightningkd (Lightning) checkpoint."""
    folder = tmp_path_factory.mktemp("mmseg_ckpt")
    state = pspnet.state_dict()
    names = ("zoo.pth", "run.ckpt", "no_aux.pth", "ddp.pth", "mmrazor.pth", "iter_80000.pth", "unknown.pth")
    files = dict(zip(("zoo", "lightningkd", "no_aux", "ddp", "mmrazor", "mmengine", "unknown"), names))
    files = {kind: folder / name for kind, name in files.items()}
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": state}, files["zoo"])
    torch.save(
        {"epoch": 3, "state_dict": {"student." + k: v for k, v in state.items()}}, files["lightningkd"]
    )
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, files["ddp"])
    mmrazor = {"architecture." + k: v for k, v in state.items()}
    mmrazor["distiller.connectors.loss_s4_sfeat.weight"] = torch.ones(3)
    torch.save({"meta": {}, "state_dict": mmrazor}, files["mmrazor"])
    save_mmengine_checkpoint(files["mmengine"], pspnet, hub_name="test_mmseg")  # with mmengine metadata
    torch.save({"state_dict": {"segmentor." + k: v for k, v in state.items()}}, files["unknown"])
    no_aux = {k: v for k, v in state.items() if not k.startswith("auxiliary_head.")}
    torch.save({"state_dict": no_aux}, files["no_aux"])
    return files


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_pspnet_r18_logits_at_one_eighth(pspnet) -> None:
    assert pspnet.num_classes == 11
    pspnet.eval()
    with torch.no_grad():
        assert tuple(pspnet(torch.zeros(1, 3, 64, 64)).shape) == (1, 11, 8, 8)
    pspnet.train()  # training needs batch >= 2: the pyramid pooling's BatchNorm sees 1x1 maps
    assert tuple(pspnet(torch.randn(2, 3, 64, 64)).shape) == (2, 11, 8, 8)


def test_segformer_b0_logits_at_one_quarter(no_downloads) -> None:
    model = MMSegSegmenter(SEGFORMER, num_classes=11).eval()
    with torch.no_grad():
        assert tuple(model(torch.zeros(1, 3, 64, 64)).shape) == (1, 11, 16, 16)
    assert model.auxiliary_head is None and model.neck is None


def test_aux_head_runs_in_training_only(pspnet) -> None:
    outputs = []
    handle = pspnet.auxiliary_head.register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        pspnet.train()
        pspnet(torch.randn(2, 3, 64, 64))
        assert len(outputs) == 1 and tuple(outputs[0].shape) == (2, 11, 8, 8)
        pspnet.eval()
        with torch.no_grad():
            pspnet(torch.randn(1, 3, 64, 64))
        assert len(outputs) == 1
    finally:
        handle.remove()


def test_several_aux_heads_all_run_in_training(no_downloads) -> None:
    model = MMSegSegmenter("bisenetv2/bisenetv2_fcn_4xb4-160k_cityscapes-1024x1024", num_classes=3).train()
    assert isinstance(model.auxiliary_head, nn.ModuleList) and len(model.auxiliary_head) == 4
    with FeatureTap(model, [f"auxiliary_head.{i}" for i in range(4)]) as tap:
        feats = tap(torch.randn(2, 3, 64, 64))
    assert all(feats[f"auxiliary_head.{i}"].shape[1] == 3 for i in range(4))
    assert tuple(feats["output"].shape) == (2, 3, 8, 8)


def test_cascade_segmentor_chains_its_heads(no_downloads) -> None:
    model = MMSegSegmenter("ocrnet/ocrnet_hr18s_4xb2-80k_cityscapes-512x1024", num_classes=4).eval()
    assert isinstance(model.decode_head, nn.ModuleList)
    with torch.no_grad():
        assert tuple(model(torch.zeros(1, 3, 64, 64)).shape) == (1, 4, 16, 16)


def test_layers_are_named_like_mmseg_and_tappable(pspnet) -> None:
    names = list_layers(pspnet)
    for name in ("backbone.stem", "backbone.layer4", "decode_head.bottleneck", "decode_head.conv_seg"):
        assert name in names
    assert "auxiliary_head.conv_seg" in names
    assert not any(n.startswith("data_preprocessor") for n in names)
    pspnet.eval()
    with FeatureTap(pspnet, ["decode_head.conv_seg", "backbone.layer4"]) as tap, torch.no_grad():
        feats = tap(torch.randn(1, 3, 64, 64))
    assert tuple(feats["backbone.layer4"].shape) == (1, 512, 8, 8)
    torch.testing.assert_close(feats["decode_head.conv_seg"], feats["output"])


def test_sync_bn_becomes_bn_unless_asked(pspnet, no_downloads) -> None:
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in pspnet.modules())
    assert any(type(m) is nn.BatchNorm2d for m in pspnet.modules())
    kept = MMSegSegmenter(PSPNET, aux_head=False, sync_bn=True)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in kept.modules())


def test_no_pretrained_init_remains(pspnet) -> None:
    from mmengine.runner.checkpoint import CheckpointLoader

    with pytest.raises(AssertionError, match="download was attempted"):  # the fixture's guard is live
        CheckpointLoader.load_checkpoint("open-mmlab://resnet18_v1c")
    for module in pspnet.modules():
        init = getattr(module, "init_cfg", None)
        inits = init if isinstance(init, list) else [init]
        assert not any(isinstance(i, dict) and i.get("type") == "Pretrained" for i in inits)
    # the configured random init ran: mmseg heads draw conv_seg from Normal(0, 0.01)
    assert 0.005 < pspnet.decode_head.conv_seg.weight.std().item() < 0.02


@pytest.mark.parametrize("kind", ["zoo", "lightningkd", "ddp", "mmrazor", "mmengine"])
def test_checkpoint_round_trip(pspnet, zoo_files, kind) -> None:
    loaded = MMSegSegmenter(PSPNET, num_classes=11, checkpoint=str(zoo_files[kind]))
    _assert_same_weights(pspnet, loaded)


def test_aux_head_false_loads_a_file_with_aux_keys(pspnet, zoo_files) -> None:
    loaded = MMSegSegmenter(PSPNET, num_classes=11, checkpoint=str(zoo_files["zoo"]), aux_head=False)
    assert loaded.auxiliary_head is None
    torch.testing.assert_close(loaded.decode_head.conv_seg.weight, pspnet.decode_head.conv_seg.weight)
    torch.testing.assert_close(loaded.backbone.stem[0].weight, pspnet.backbone.stem[0].weight)


def test_missing_keys_fail_clearly_unless_not_strict(pspnet, zoo_files) -> None:
    with pytest.raises(
        RuntimeError, match=r"(?s)auxiliary_head: 7 missing.*no auxiliary head.*aux_head=False"
    ):
        MMSegSegmenter(PSPNET, num_classes=11, checkpoint=str(zoo_files["no_aux"]))
    loaded = MMSegSegmenter(PSPNET, num_classes=11, checkpoint=str(zoo_files["no_aux"]), strict=False)
    torch.testing.assert_close(loaded.decode_head.conv_seg.weight, pspnet.decode_head.conv_seg.weight)


def test_a_file_matching_no_key_is_refused_even_when_not_strict(zoo_files) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)None of the .* weights.*segmentor\.auxiliary_head"):
        MMSegSegmenter(PSPNET, num_classes=11, checkpoint=str(zoo_files["unknown"]), strict=False)


def test_unsafe_checkpoint_is_refused_before_anything_runs(tmp_path) -> None:
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"x": torch.ones(1)}, "meta": ShellPayload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*posix\.system"):
        MMSegSegmenter(PSPNET, num_classes=11, checkpoint=str(tmp_path / "evil.pth"), aux_head=False)
    assert not marker.exists()


def test_wrong_num_classes_fails_clearly(zoo_files) -> None:
    with pytest.raises(
        RuntimeError, match=r"(?s)do not fit MMSegSegmenter.*decode_head.conv_seg.*num_classes"
    ):
        MMSegSegmenter(PSPNET, num_classes=5, checkpoint=str(zoo_files["zoo"]))


def test_config_options_and_config_files(no_downloads, tmp_path) -> None:
    narrow = MMSegSegmenter(PSPNET, aux_head=False, config_options={"model.decode_head.channels": 32})
    assert narrow.decode_head.conv_seg.in_channels == 32 and narrow.num_classes == 19
    config = tmp_path / "my_pspnet.py"
    base = resolve_mmseg_config(PSPNET)
    config.write_text(f"_base_ = {str(base)!r}\nmodel = dict(decode_head=dict(num_classes=7))\n")
    assert MMSegSegmenter(str(config), aux_head=False).num_classes == 7


def test_config_names_resolve_with_or_without_folder_and_suffix() -> None:
    expected = mmseg_config_dir() / f"{PSPNET}.py"
    assert resolve_mmseg_config(PSPNET) == expected
    assert resolve_mmseg_config(PSPNET + ".py") == expected
    assert resolve_mmseg_config(PSPNET.split("/")[1]) == expected
    assert PSPNET in list_mmseg_configs() and not any(n.startswith("_base_") for n in list_mmseg_configs())


def test_unknown_config_lists_close_matches() -> None:
    with pytest.raises(
        FileNotFoundError, match=r"Unknown mmseg config .*configs.*pspnet_r18-d8_4xb2-80k_city"
    ):
        MMSegSegmenter("pspnet/pspnet_r18-d8_cityscapes-512x1024")


def test_heads_without_pixel_logits_are_refused() -> None:
    with pytest.raises(ValueError, match="Mask2FormerHead .* not a per-pixel logits head"):
        MMSegSegmenter("mask2former/mask2former_r50_8xb2-90k_cityscapes-512x1024")


def test_missing_compiled_op_raises_a_clear_error() -> None:
    if not install_mmcv_ops_stand_in():
        pytest.skip("real compiled mmcv ops are installed")
    from mmcv.ops import PSAMask
    from mmengine.utils.dl_utils import mmcv_full_available

    assert not mmcv_full_available()  # mmengine still sees mmcv-lite (it would use mmcv's SyncBN otherwise)
    with pytest.raises(MMCVOpsMissingError, match="compiled mmcv ops are not installed.*work on mmcv-lite"):
        PSAMask("collect", (3, 3))(torch.zeros(1, 9, 4, 4))


def test_ops_error_is_exported_by_the_models_package() -> None:
    import lightningkd.models

    assert lightningkd.models.MMCVOpsMissingError is MMCVOpsMissingError
    assert issubclass(MMCVOpsMissingError, RuntimeError)


def test_stand_in_leaves_a_real_extension_alone(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mmcv._ext", types.ModuleType("mmcv._ext"))
    assert install_mmcv_ops_stand_in() is False


def test_num_classes_leaves_heads_of_other_classes_alone(no_downloads) -> None:
    model = MMSegSegmenter("stdc/stdc1_4xb12-80k_cityscapes-512x1024", num_classes=5)
    assert [head.out_channels for head in model.auxiliary_head] == [5, 5, 2]  # STDCHead: 2-class boundaries
    assert model.num_classes == 5


def test_backbone_checkpoint_loads_imagenet_weights_of_the_backbone(tmp_path) -> None:
    reference = MMSegSegmenter("pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024", num_classes=3)
    state = {f"backbone.{k}": v for k, v in reference.backbone.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "resnet18_v1c.pth")
    model = MMSegSegmenter(
        "pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024",
        num_classes=3,
        backbone_checkpoint=str(tmp_path / "resnet18_v1c.pth"),
    )
    torch.testing.assert_close(model.backbone.stem[0].weight, reference.backbone.stem[0].weight)
    assert not torch.equal(model.decode_head.conv_seg.weight, reference.decode_head.conv_seg.weight)
