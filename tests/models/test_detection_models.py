"""torchvision detectors built by name: structure, training step, weights, FPN level names."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import detection as tv_detection
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from lightningkd.models import classifier, detector, detector_names, fpn_levels
from lightningkd.models.detection import IMAGENET_MEAN, IMAGENET_STD

ARCHS = ("retinanet", "fcos", "fasterrcnn")
SMALL = {"min_size": 64, "max_size": 96, "fpn_channels": 64}  # fast: no resize of the test images
LOSS_KEYS = {
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "fasterrcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
}
LEVELS = {
    # (arch, backbone family): FPN level names, stride of each level, channels entering the FPN
    ("retinanet", "resnet18"): (["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128], [128, 256, 512]),
    ("fcos", "resnet18"): (["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128], [128, 256, 512]),
    ("fasterrcnn", "resnet18"): (["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64], [64, 128, 256, 512]),
    ("retinanet", "resnet50"): (["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128], [512, 1024, 2048]),
    ("fasterrcnn", "resnet50"): (["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64], [256, 512, 1024, 2048]),
    ("retinanet", "mobilenet_v3_large"): (["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128], [40, 112, 960]),
    ("fcos", "mobilenet_v3_large"): (["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128], [40, 112, 960]),
    ("fasterrcnn", "mobilenet_v3_large"): (["0", "1", "pool"], [32, 32, 64], [160, 960]),
}


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0], [50.0, 5.0, 90.0, 30.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.tensor([[20.0, 20.0, 60.0, 60.0]]), "labels": torch.tensor([2])},
    ]


def _cls_outputs(model: nn.Module) -> int:
    """Classes of the classification head (background included), read from its layer sizes."""
    if hasattr(model, "roi_heads"):
        return model.roi_heads.box_predictor.cls_score.out_features
    head = model.head.classification_head
    return head.cls_logits.out_channels // head.num_anchors


def _save(obj: object, path) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_trains_one_step_and_detects(arch: str, backbone: str) -> None:
    torch.manual_seed(0)
    model = detector(f"{arch}_{backbone}_fpn", num_classes=3, **SMALL)
    assert type(model) is {"retinanet": tv_detection.RetinaNet, "fcos": tv_detection.FCOS}.get(
        arch, tv_detection.FasterRCNN
    )
    images = [torch.rand(3, 64, 96), torch.rand(3, 64, 96)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model(images, _targets())
    assert set(losses) == LOSS_KEYS[arch]
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "backbone.fpn.layer_blocks.0.0.weight" in changed
    assert any(n.startswith("backbone.body.") for n in changed)  # from scratch: the backbone trains

    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 96)])
    assert len(out) == 1 and sorted(out[0]) == ["boxes", "labels", "scores"]
    boxes, labels, scores = out[0]["boxes"], out[0]["labels"], out[0]["scores"]
    assert boxes.shape == (len(scores), 4) and labels.shape == scores.shape
    assert labels.dtype == torch.int64 and ((labels >= 1) & (labels <= 3)).all()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()


@pytest.mark.parametrize(("arch", "backbone"), list(LEVELS))
def test_fpn_levels_names_strides_and_channels(arch: str, backbone: str) -> None:
    names, strides, in_channels = LEVELS[(arch, backbone)]
    model = detector(f"{arch}_{backbone}_fpn", num_classes=2, fpn_channels=32).eval()
    assert fpn_levels(model) == names
    assert [block[0].in_channels for block in model.backbone.fpn.inner_blocks] == in_channels
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, 128, 256))
    assert list(features) == names  # fpn_levels names what the backbone really returns, in order
    assert [tuple(f.shape) for f in features.values()] == [
        (1, 32, -(-128 // s), -(-256 // s)) for s in strides
    ]
    # anchor generators: exactly one tuple of sizes per level
    generator = model.rpn.anchor_generator if arch == "fasterrcnn" else model.anchor_generator
    assert len(generator.sizes) == len(names)


def test_anchor_sizes_per_architecture() -> None:
    retina = detector("retinanet_mobilenet_v3_large_fpn", num_classes=2, fpn_channels=32)
    assert retina.anchor_generator.sizes[0] == (32, 40, 50)  # 32 * 2**(0, 1/3, 2/3)
    assert retina.anchor_generator.sizes[4] == (512, 645, 812)
    assert retina.anchor_generator.aspect_ratios[2] == (0.5, 1.0, 2.0)
    fcos = detector("fcos_mobilenet_v3_large_fpn", num_classes=2, fpn_channels=32)
    assert fcos.anchor_generator.sizes == ((8,), (16,), (32,), (64,), (128,))
    assert fcos.anchor_generator.num_anchors_per_location() == [1] * 5
    frcnn = detector("fasterrcnn_mobilenet_v3_large_fpn", num_classes=2, fpn_channels=32)
    assert frcnn.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),) * 3
    assert frcnn.rpn.score_thresh == 0.05  # as torchvision's fasterrcnn_mobilenet_v3_large_fpn


@pytest.mark.parametrize(
    ("name", "builder"),
    [
        ("retinanet_resnet50_fpn", tv_detection.retinanet_resnet50_fpn),
        ("fcos_resnet50_fpn", tv_detection.fcos_resnet50_fpn),
        ("fasterrcnn_resnet50_fpn", tv_detection.fasterrcnn_resnet50_fpn),
        ("fasterrcnn_mobilenet_v3_large_fpn", tv_detection.fasterrcnn_mobilenet_v3_large_fpn),
    ],
)
def test_same_structure_as_torchvision_builders(name: str, builder) -> None:
    ours = detector(name, num_classes=4)
    theirs = builder(weights=None, weights_backbone=None, num_classes=5)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    generators = [m.rpn.anchor_generator if hasattr(m, "rpn") else m.anchor_generator for m in (ours, theirs)]
    assert generators[0].sizes == generators[1].sizes
    assert generators[0].aspect_ratios == generators[1].aspect_ratios


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_have_num_classes_plus_background(arch: str) -> None:
    model = detector(f"{arch}_resnet18_fpn", num_classes=7, fpn_channels=32)
    assert _cls_outputs(model) == 8
    if arch == "retinanet":
        assert model.head.classification_head.cls_logits.out_channels == 9 * 8
    elif arch == "fcos":
        assert model.head.classification_head.cls_logits.out_channels == 8
    else:
        assert model.roi_heads.box_predictor.bbox_pred.out_features == 4 * 8


def test_transform_settings_default_to_imagenet_statistics() -> None:
    model = detector("fcos_resnet18_fpn", num_classes=2, fpn_channels=32)
    assert model.transform.image_mean == list(IMAGENET_MEAN) == [0.485, 0.456, 0.406]
    assert model.transform.image_std == list(IMAGENET_STD) == [0.229, 0.224, 0.225]
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333
    custom = detector(
        "fcos_resnet18_fpn",
        num_classes=2,
        fpn_channels=32,
        min_size=320,
        max_size=512,
        image_mean=(0.5, 0.5, 0.5),
    )
    assert custom.transform.min_size == (320,) and custom.transform.max_size == 512
    assert custom.transform.image_mean == [0.5, 0.5, 0.5]


def test_from_scratch_batch_norm_trains_everywhere() -> None:
    model = detector("retinanet_resnet18_fpn", num_classes=2, fpn_channels=32)
    body = model.backbone.body
    assert isinstance(body.bn1, nn.BatchNorm2d) and not any(
        isinstance(m, FrozenBatchNorm2d) for m in model.modules()
    )
    assert all(p.requires_grad for p in model.parameters())


def test_checkpoint_round_trip_plain_and_lightning(tmp_path) -> None:
    torch.manual_seed(0)
    source = detector("fasterrcnn_resnet18_fpn", num_classes=3, fpn_channels=32)
    with torch.no_grad():  # not the initial statistics, so a skipped buffer would show
        source.backbone.body.bn1.running_mean.uniform_()
    plain = _save(source.state_dict(), tmp_path / "plain.pth")
    lightning = {"state_dict": {f"student.{k}": v for k, v in source.state_dict().items()}}
    lightning["state_dict"]["teacher.backbone.body.conv1.weight"] = torch.ones(64, 3, 7, 7)
    ckpt = _save(lightning, tmp_path / "run.ckpt")
    for path in (plain, ckpt):
        torch.manual_seed(1)
        loaded = detector("fasterrcnn_resnet18_fpn", num_classes=3, fpn_channels=32, checkpoint=path)
        state = loaded.state_dict()
        assert state.keys() == source.state_dict().keys()
        assert all(torch.equal(v, state[k]) for k, v in source.state_dict().items())
    with pytest.raises(RuntimeError, match=r"fasterrcnn_resnet18_fpn with num_classes=5"):
        detector("fasterrcnn_resnet18_fpn", num_classes=5, fpn_channels=32, checkpoint=plain)


def test_torchvision_detector_state_dict_loads_as_checkpoint(tmp_path) -> None:
    theirs = tv_detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    path = _save(theirs.state_dict(), tmp_path / "tv.pth")
    ours = detector("retinanet_resnet50_fpn", num_classes=3, checkpoint=path)
    assert torch.equal(
        ours.head.classification_head.cls_logits.weight, theirs.head.classification_head.cls_logits.weight
    )
    assert torch.equal(ours.backbone.body.layer3[2].conv2.weight, theirs.backbone.body.layer3[2].conv2.weight)


def test_frozen_batch_norm_checkpoint_loads_into_a_detector_built_from_scratch(tmp_path) -> None:
    imagenet = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        imagenet.bn1.running_var.uniform_(0.5, 2.0)
    backbone = _save(imagenet.state_dict(), tmp_path / "r18.pth")
    trained = detector("fcos_resnet18_fpn", num_classes=2, fpn_channels=32, backbone_checkpoint=backbone)
    run = _save(
        {"state_dict": {f"student.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "r.ckpt"
    )
    teacher = detector("fcos_resnet18_fpn", num_classes=2, fpn_channels=32, checkpoint=run)
    assert isinstance(teacher.backbone.body.bn1, nn.BatchNorm2d)
    assert torch.equal(teacher.backbone.body.bn1.running_var, imagenet.bn1.running_var)


def test_backbone_checkpoint_from_a_torchvision_classifier(tmp_path) -> None:
    imagenet = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for bn in (imagenet.bn1, imagenet.layer4[1].bn2):
            bn.running_mean.uniform_()
            bn.weight.uniform_()
    path = _save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    model = detector("retinanet_resnet18_fpn", num_classes=2, fpn_channels=32, backbone_checkpoint=path)
    body = model.backbone.body
    reference = imagenet.state_dict()
    body_state = body.state_dict()
    assert set(body_state) == {
        k for k in reference if not k.startswith("fc.") and "num_batches_tracked" not in k
    }
    assert all(torch.equal(v, reference[k]) for k, v in body_state.items())
    # frozen BN everywhere in the backbone body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert isinstance(body.layer4[1].bn2, FrozenBatchNorm2d)
    # default: the last 3 stages (layer2-layer4) train, the stem and layer1 do not
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"} and frozen == {"conv1", "layer1"}
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_backbone_checkpoint_from_a_lightningkd_classifier_run(tmp_path) -> None:
    net = classifier("mobilenet_v3_large", num_classes=4)
    run = {"state_dict": {f"student.{k}": v for k, v in net.state_dict().items()}}
    path = _save(run, tmp_path / "mnv3.ckpt")
    model = detector("fcos_mobilenet_v3_large_fpn", num_classes=2, fpn_channels=32, backbone_checkpoint=path)
    body = model.backbone.body
    assert torch.equal(body["0"][0].weight, net.features[0][0].weight)
    assert torch.equal(body["16"][1].running_mean, net.features[16][1].running_mean)
    assert isinstance(body["16"][1], FrozenBatchNorm2d)


@pytest.mark.parametrize("trainable", [0, 1, 3, 5])
def test_trainable_resnet_layers_match_torchvision(tmp_path, trainable: int) -> None:
    path = _save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    ours = detector(
        "fasterrcnn_resnet18_fpn",
        num_classes=2,
        fpn_channels=32,
        backbone_checkpoint=path,
        trainable_backbone_layers=trainable,
    )
    reference = _resnet_fpn_extractor(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d), trainable)
    flags = {n: p.requires_grad for n, p in ours.backbone.body.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in reference.body.named_parameters()}
    assert sum(flags.values()) == {0: 0, 1: 5, 3: 15, 5: 20}[trainable]  # conv weights (BN frozen)


@pytest.mark.parametrize("trainable", [0, 3, 6])
def test_trainable_mobilenet_layers_match_torchvision(tmp_path, trainable: int) -> None:
    path = _save(torchvision.models.mobilenet_v3_large().state_dict(), tmp_path / "mnv3.pth")
    ours = detector(
        "fasterrcnn_mobilenet_v3_large_fpn",
        num_classes=2,
        fpn_channels=32,
        backbone_checkpoint=path,
        trainable_backbone_layers=trainable,
    )
    mnv3 = torchvision.models.mobilenet_v3_large(norm_layer=FrozenBatchNorm2d)
    reference = _mobilenet_extractor(mnv3, True, trainable)
    flags = {n: p.requires_grad for n, p in ours.backbone.body.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in reference.body.named_parameters()}
    first_trainable = {0: None, 3: "7.", 6: "0."}[trainable]
    names = [n for n, on in flags.items() if on]
    assert names[0].startswith(first_trainable) if names else first_trainable is None


def test_missing_backbone_keys_are_named(tmp_path) -> None:
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    del state["layer4.1.conv2.weight"], state["layer3.0.downsample.1.running_var"]
    path = _save(state, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError) as err:
        detector("retinanet_resnet18_fpn", num_classes=2, backbone_checkpoint=path)
    message = str(err.value)
    assert "lack 2 of the backbone's" in message
    assert "layer4.1.conv2.weight" in message and "layer3.0.downsample.1.running_var" in message
    assert "backbone_checkpoint" in message  # the fix


def test_unknown_name_lists_valid_names_and_close_matches() -> None:
    with pytest.raises(ValueError) as err:
        detector("retinanet_resnet18", num_classes=2)
    message = str(err.value)
    assert "Close matches: ['retinanet_resnet18_fpn'" in message
    assert all(name in message for name in detector_names())
    assert len(detector_names()) == 15 and "fcos_mobilenet_v3_large_fpn" in detector_names()


def test_invalid_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="needs backbone_checkpoint"):
        detector("retinanet_resnet18_fpn", num_classes=2, trainable_backbone_layers=3)
    assert detector("retinanet_resnet18_fpn", num_classes=2, fpn_channels=32, trainable_backbone_layers=5)
    path = _save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"in \[0, 5\] for resnet18, got 6"):
        detector(
            "retinanet_resnet18_fpn", num_classes=2, backbone_checkpoint=path, trainable_backbone_layers=6
        )
    with pytest.raises(ValueError, match="multiple of 32 for FCOS"):
        detector("fcos_resnet18_fpn", num_classes=2, fpn_channels=48)
    with pytest.raises(ValueError, match="foreground classes"):
        detector("fcos_resnet18_fpn", num_classes=0)
    with pytest.raises(ValueError, match="image_mean needs one value per RGB channel"):
        detector("fcos_resnet18_fpn", num_classes=2, image_mean=(0.5,))


def test_fpn_levels_refuses_models_without_an_fpn_backbone() -> None:
    with pytest.raises(TypeError, match="ResNet is not a torchvision detector.*it has no backbone module"):
        fpn_levels(torchvision.models.resnet18())
    with_plain_backbone = nn.Module()
    with_plain_backbone.backbone = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match=r"its backbone is a Sequential with children \['0'\]"):
        fpn_levels(with_plain_backbone)
