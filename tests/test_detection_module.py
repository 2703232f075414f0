"""DetectionDistillationModule: one padded batch for both models, aligned boxes and levels, mAP, predict."""

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from datamodules import SyntheticDetectionDataModule, VOCDetectionDataModule
from lightningkd.distillers import FitNet
from lightningkd.models import detector
from lightningkd.modules import DetectionDistillationModule
from lightningkd.modules.detection import inherit_weights, pad_batch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def small(name: str = "retinanet_resnet18_fpn", classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return detector(name, num_classes=classes, min_size=64, max_size=64)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return L.Trainer(**{**defaults, "enable_model_summary": False, **kwargs})


class Recorder(FitNet):
    """FitNet on FPN level 0 that also keeps what the module gave it."""

    def forward(self, student, teacher, batch=None):
        self.seen = {"student": student, "teacher": teacher, "batch": batch}
        return super().forward(student, teacher, batch)


def recorder(level: str = "0") -> Recorder:
    layer = f"backbone:{level}"
    return Recorder(student_layer=layer, teacher_layer=layer, student_channels=256, teacher_channels=256)


def batch_of(sizes, boxes_per_image=2):
    images = [torch.randn(3, h, w) for h, w in sizes]
    targets = []
    for h, w in sizes:
        boxes = torch.tensor([[2.0, 3.0, w / 2, h / 2], [w / 3, h / 4, w - 1.0, h - 2.0]])[:boxes_per_image]
        targets.append(
            {
                "boxes": boxes,
                "labels": torch.tensor([1, 3])[:boxes_per_image],
                "orig_size": torch.tensor([2 * h, 2 * w]),
                "size": torch.tensor([h, w]),
            }
        )
    return images, targets


def test_pad_batch_pads_bottom_right_to_the_multiple() -> None:
    a, b = torch.ones(3, 5, 7), 2 * torch.ones(3, 6, 4)
    batch = pad_batch([a, b], size_divisible=4)
    assert batch.shape == (2, 3, 8, 8)
    assert torch.equal(batch[0, :, :5, :7], a) and batch[0, :, 5:].abs().sum() == 0
    assert batch[0, :, :, 7:].abs().sum() == 0
    assert torch.equal(batch[1, :, :6, :4], b) and batch[1, :, :, 4:].abs().sum() == 0


def test_teacher_and_student_see_bit_identical_batches_and_levels() -> None:
    student, teacher = small(seed=1), small(seed=2)
    seen = {}
    student.backbone.register_forward_hook(lambda m, i, o: seen.update(student=(i[0], o)) and None)
    teacher.backbone.register_forward_hook(lambda m, i, o: seen.update(teacher=(i[0], o)) and None)
    dist = recorder()
    module = DetectionDistillationModule(student, teacher, [dist], num_classes=3)
    module.training_step(batch_of([(50, 70), (64, 40)]), 0)
    assert torch.equal(seen["student"][0], seen["teacher"][0])
    assert seen["student"][0].shape == (2, 3, 64, 96)  # padded to multiples of 32, not resized
    assert {k: v.shape for k, v in seen["student"][1].items()} == {
        k: v.shape for k, v in seen["teacher"][1].items()
    }
    assert list(seen["student"][1]) == ["0", "1", "2", "p6", "p7"]
    assert (
        dist.seen["student"]["backbone:0"].shape
        == dist.seen["teacher"]["backbone:0"].shape
        == (2, 256, 8, 12)
    )
    assert not dist.seen["teacher"]["backbone:0"].requires_grad


def test_distillers_get_boxes_in_the_pixels_of_the_features() -> None:
    dist = recorder()
    module = DetectionDistillationModule(small(seed=1), small(seed=2), [dist], num_classes=3)
    images, targets = batch_of([(50, 70), (64, 40)])
    module.training_step((images, targets), 0)
    batch = dist.seen["batch"]
    assert batch["image_sizes"] == [(50, 70), (64, 40)]
    assert batch["padded_size"] == (64, 96)
    for given, expected in zip(batch["target"], targets):
        assert torch.equal(given["boxes"], expected["boxes"])  # no resize inside the module
        assert torch.equal(given["labels"], expected["labels"])


def test_the_detectors_own_transform_is_restored_after_each_call() -> None:
    student = small()
    own = student.transform
    module = DetectionDistillationModule(student, num_classes=3)
    module.training_step(batch_of([(64, 64)]), 0)
    module.detect([torch.zeros(3, 64, 64)])
    assert module.student.transform is own


def test_teacher_runs_its_backbone_only_when_distillers_read_only_the_backbone() -> None:
    teacher = small(seed=2)
    calls = []
    teacher.head.register_forward_hook(lambda *a: calls.append("head"))
    module = DetectionDistillationModule(small(seed=1), teacher, [recorder()], num_classes=3)
    assert module.teacher_backbone_only
    module.training_step(batch_of([(64, 64)]), 0)
    assert calls == []
    head_reader = FitNet(
        student_layer="head.classification_head.conv",
        teacher_layer="head.classification_head.conv",
        student_channels=256,
        teacher_channels=256,
    )
    module = DetectionDistillationModule(small(seed=1), teacher, [head_reader], num_classes=3)
    assert not module.teacher_backbone_only
    assert module.training_step(batch_of([(64, 64), (64, 64)]), 0).isfinite()
    assert calls  # the whole teacher ran (in eval mode)


def test_images_without_boxes_train() -> None:
    module = DetectionDistillationModule(small(seed=1), small(seed=2), [recorder()], num_classes=3)
    images, targets = batch_of([(64, 64), (48, 64)], boxes_per_image=0)
    assert targets[0]["boxes"].shape == (0, 4)
    loss = module.training_step((images, targets), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())


def test_refuses_a_detector_whose_preprocessing_it_cannot_take_over() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = small()

        def forward(self, images, targets=None):
            return self.model(images, targets)

    with pytest.raises(TypeError, match="GeneralizedRCNNTransform.*same pixels"):
        DetectionDistillationModule(Wrapped(), num_classes=3)


def test_refuses_heads_with_other_classes() -> None:
    with pytest.raises(ValueError, match="predicts 6 classes.*num_classes is 3"):
        DetectionDistillationModule(small(classes=5), num_classes=3)


def test_unknown_fpn_level_lists_the_levels() -> None:
    with pytest.raises(ValueError, match=r"no FPN level \['pool'\].*backbone:p7"):
        DetectionDistillationModule(small(seed=1), small(seed=2), [recorder("pool")], num_classes=3)


def test_labels_outside_the_classes_are_named() -> None:
    module = DetectionDistillationModule(small(), num_classes=3)
    images, targets = batch_of([(64, 64)])
    targets[0]["labels"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"1\.\.3 \(0 is background\), got values \[0, 3\]"):
        module.training_step((images, targets), 0)


def _gt_as_predictions(targets):
    return [
        {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"]))} for t in targets
    ]


def test_ground_truth_fed_back_scores_map_one_through_the_module_metric() -> None:
    module = DetectionDistillationModule(small(), num_classes=3)
    images, targets = batch_of([(64, 64), (48, 80)])
    module.update_map("val_student_map", _gt_as_predictions(targets), targets)
    scores = module.compute_map("val_student_map")
    assert scores["map"].item() == pytest.approx(1.0)
    assert scores["map_50"].item() == pytest.approx(1.0)
    assert scores["classes"].tolist() == [1, 3]
    assert scores["map_per_class"].tolist() == pytest.approx([1.0, 1.0])
    # one box shifted by half its width: IoU 1/3 < 0.5, so that class's AP drops to 0 at every threshold
    shifted = _gt_as_predictions(targets)
    for pred in shifted:
        box = pred["boxes"][0].clone()
        width = box[2] - box[0]
        pred["boxes"] = torch.cat(
            [(box + torch.stack([width / 2, 0 * width, width / 2, 0 * width]))[None], pred["boxes"][1:]]
        )
    module.update_map("val_student_map", shifted, targets)
    scores = module.compute_map("val_student_map")
    assert scores["map_per_class"].tolist() == pytest.approx([0.0, 1.0])


def test_validation_logs_map_per_class_and_the_teacher_once() -> None:
    dm = SyntheticDetectionDataModule(num_classes=3, image_size=64, train_size=4, val_size=4, batch_size=2)
    module = DetectionDistillationModule(small(seed=1), small(seed=2), [recorder()], num_classes=3)
    t = trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, log_every_n_steps=1)
    t.fit(module, datamodule=dm)
    metrics = t.callback_metrics
    for key in (
        "mAP",
        "mAP50",
        "mAP75",
        "mAP_small",
        "mAP_medium",
        "mAP_large",
        "teacher_mAP",
        "teacher_mAP50",
    ):
        assert f"val/{key}" in metrics, key
    assert any(k.startswith("val/ap/class") for k in metrics)
    assert "train/task/classification" in metrics and "train/task/bbox_regression" in metrics
    assert "train/kd/recorder" in metrics
    assert module.class_names == ["class1", "class2", "class3"]


def test_teacher_stays_frozen_through_fit() -> None:
    teacher = small(seed=2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    dm = SyntheticDetectionDataModule(num_classes=3, image_size=64, train_size=4, val_size=2, batch_size=2)
    module = DetectionDistillationModule(small(seed=1), teacher, [recorder()], num_classes=3)
    trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=dm)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())


def test_predict_returns_boxes_in_original_coordinates() -> None:
    module = DetectionDistillationModule(small(), num_classes=3)
    images, targets = batch_of([(64, 64)])  # orig_size is twice the size
    plain = module.detect(images)
    mapped = module.predict_step((images, targets), 0)
    assert torch.allclose(mapped[0]["boxes"], plain[0]["boxes"] * 2)
    assert torch.equal(mapped[0]["scores"], plain[0]["scores"])
    assert module.predict_step(images, 0)[0]["boxes"].shape == plain[0]["boxes"].shape


def test_inherit_weights_copies_matching_neck_and_head() -> None:
    student, teacher = small("retinanet_resnet18_fpn", seed=1), small("retinanet_resnet50_fpn", seed=2)
    module = DetectionDistillationModule(
        student, teacher, [recorder()], num_classes=3, inherit_from_teacher=["backbone.fpn", "head"]
    )
    assert torch.equal(
        student.head.classification_head.cls_logits.weight, teacher.head.classification_head.cls_logits.weight
    )
    # 3x3 output convs match (256 -> 256); the lateral 1x1 convs differ in input channels and stay
    assert torch.equal(
        student.backbone.fpn.layer_blocks[0][0].weight, teacher.backbone.fpn.layer_blocks[0][0].weight
    )
    assert not any(k.startswith("backbone.fpn.inner_blocks") for k in module.inherited)  # weights nor biases
    assert "backbone.fpn.layer_blocks.0.0.bias" in module.inherited
    with pytest.raises(ValueError, match="no weights under 'neck'.*'backbone'"):
        inherit_weights(student, teacher, ["neck"])


@pytest.mark.slow
@pytest.mark.parametrize("where", ["bccd", "coco-mini"])
def test_real_sets_train_and_validate(where) -> None:
    root = SHARED / where
    if not root.is_dir():
        pytest.skip(f"{root} is absent: the real-data checks need the shared data folder beside the clone")
    if where == "bccd":
        dm = VOCDetectionDataModule(
            root, classes=["RBC", "WBC", "Platelets"], batch_size=2, num_workers=0, max_size=128
        )
    else:
        from datamodules import COCODetectionDataModule

        dm = COCODetectionDataModule(root, batch_size=2, num_workers=0, max_size=128)
    dm.setup("fit")
    classes = dm.num_classes
    module = DetectionDistillationModule(
        small("fcos_resnet18_fpn", classes, seed=1),
        small("fcos_resnet18_fpn", classes, seed=2),
        [recorder()],
        num_classes=classes,
    )
    t = trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0, log_every_n_steps=1
    )
    t.fit(module, datamodule=dm)
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert 0.0 <= float(t.callback_metrics["val/mAP"]) <= 1.0
    assert "val/teacher_mAP" in t.callback_metrics
