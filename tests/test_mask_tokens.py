"""MasKD's mask-learning stage: tokens trained on a frozen teacher, written to the token file."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamodules import SyntheticDetectionDataModule, SyntheticSegmentationDataModule
from lightningkd.distillers import MasKD, PerLevel
from lightningkd.distillers.maskd import TOKEN_FILE_FORMAT, load_mask_tokens
from lightningkd.functional.maskd import dice_diversity, token_masks
from lightningkd.models import detector
from lightningkd.modules import DetectionMaskTokens, SegmentationDistillationModule, SegmentationMaskTokens

CLASSES = 3


class TinySegmenter(nn.Module):
    """conv-BN-ReLU at half resolution, then a 1x1 classifier: logits (N, 3, H/2, W/2)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, CLASSES, 1)

    def forward(self, x):
        return self.head(F.avg_pool2d(self.body(x), 2))


def teacher() -> TinySegmenter:
    torch.manual_seed(0)
    model = TinySegmenter()
    bn = model.body[1]
    with torch.no_grad():  # non-default statistics, so a change would show
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return L.Trainer(**{**defaults, "enable_model_summary": False, **kwargs})


def adam(params):
    return torch.optim.Adam(params, lr=0.05)


def segmentation_data() -> SyntheticSegmentationDataModule:
    return SyntheticSegmentationDataModule(
        num_classes=CLASSES, image_size=16, train_size=4, val_size=2, batch_size=2
    )


# ---- segmentation ------------------------------------------------------------------------------------
def test_segmentation_tokens_train_and_are_written(tmp_path, capsys) -> None:
    model = teacher()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "out" / "tokens.pt"
    module = SegmentationMaskTokens(model, str(path), num_tokens=4, num_classes=CLASSES, optimizer=adam)
    initial = module.tokens["output"].tokens.detach().clone()
    assert not path.exists()
    assert module.trainable_parameters() == [module.tokens["output"].tokens]
    assert not any(p.requires_grad for p in model.parameters())
    assert module.training and not model.body[1].training  # BatchNorm in eval mode from the start
    trainer(max_steps=3, limit_val_batches=1, num_sanity_val_steps=0).fit(module, segmentation_data())

    assert f"MasKD tokens written to {path}" in capsys.readouterr().out
    content = torch.load(path, weights_only=True)
    assert content["format"] == TOKEN_FILE_FORMAT and set(content["layers"]) == {"output"}
    entry = content["layers"]["output"]
    assert (entry["channels"], entry["num_tokens"], entry["weighted"]) == (CLASSES, 4, False)
    assert set(entry["state"]) == {"tokens"} and entry["state"]["tokens"].shape == (4, CLASSES)
    assert not torch.equal(entry["state"]["tokens"], initial)  # the tokens trained
    assert torch.equal(entry["state"]["tokens"], module.tokens["output"].tokens.detach())
    # the teacher: weights and BatchNorm statistics (and its step count) unchanged
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    # validation scores the masked teacher and keeps none of its masks (they are for the training loss)
    metrics = trainer().validate(module, segmentation_data(), verbose=False)[0]
    assert "val/mIoU" in metrics and module._masks == []

    # the file feeds MasKD's distillation stage
    maskd = MasKD(
        tokens=str(path), student_layer="output", teacher_layer="output", channels=CLASSES, eps=1e-5
    )
    assert torch.equal(maskd.masker.tokens, module.tokens["output"].tokens.detach())
    logits = torch.randn(2, CLASSES, 4, 4)
    assert torch.isfinite(maskd({"output": logits}, {"output": logits + 1}))


def test_segmentation_masked_output_and_loss(tmp_path) -> None:
    """The hook replaces the logits by sum_t F m_t; the loss is the cross-entropy of that plus the Dice."""
    model = teacher()
    raw = copy.deepcopy(model).eval()
    module = SegmentationMaskTokens(
        model, str(tmp_path / "unused.pt"), num_tokens=3, num_classes=CLASSES, dice_weight=0.5, optimizer=adam
    )
    with torch.no_grad():
        module.tokens["output"].tokens.normal_(0, 0.5)
    module.train()
    assert module.tokens.training and module.student.training
    assert not module.student.body[1].training  # the teacher's BatchNorm stays in eval mode
    images, target = torch.randn(2, 3, 8, 8), torch.randint(0, CLASSES, (2, 8, 8))
    plain = raw(images)
    masks = token_masks(plain, module.tokens["output"].tokens)
    masked = plain * masks.sum(1, keepdim=True)
    features = module.student_features(images)
    torch.testing.assert_close(features["output"], masked)
    batch = {"image": images, "target": target}
    task = SegmentationDistillationModule.task_loss_from_features(module, features, batch)
    got = module.task_loss_from_features(features, batch)
    assert got.item() == pytest.approx((task + 0.5 * dice_diversity(masks)).item(), rel=1e-6)
    got.backward()
    assert module.tokens["output"].tokens.grad.abs().sum() > 0
    # an intermediate layer: its output is masked, with the channels given
    inner = SegmentationMaskTokens(
        teacher(), str(tmp_path / "unused.pt"), layers=["body"], channels=8, num_classes=CLASSES
    )
    out = inner.student_features(images)["output"]
    body = raw.body(images)
    expected = raw.head(
        F.avg_pool2d(body * token_masks(body, inner.tokens["body"].tokens).sum(1, keepdim=True), 2)
    )
    torch.testing.assert_close(out, expected)


def test_segmentation_refuses_an_existing_file_and_unknown_layers(tmp_path) -> None:
    path = tmp_path / "tokens.pt"
    path.write_bytes(b"kept")
    kept = SegmentationMaskTokens(teacher(), str(path), num_classes=CLASSES)  # builds (e.g. for `layers`)
    with pytest.raises(FileExistsError, match=r"tokens\.pt exists.*overwrite"):
        trainer(max_steps=1, limit_val_batches=0).fit(kept, segmentation_data())  # refused before a step
    assert kept.global_step == 0 and path.read_bytes() == b"kept"
    module = SegmentationMaskTokens(teacher(), str(path), num_tokens=2, num_classes=CLASSES, overwrite=True)
    trainer(max_steps=1, limit_val_batches=0).fit(module, segmentation_data())
    assert load_mask_tokens(path, "output").num_tokens == 2
    with pytest.raises(ValueError, match=r"Unknown layer 'nope'.*'output'.*'body\.0'.*'head'"):
        SegmentationMaskTokens(teacher(), str(tmp_path / "new.pt"), layers=["nope"], num_classes=CLASSES)
    with pytest.raises(ValueError, match="non-empty list"):
        SegmentationMaskTokens(teacher(), str(tmp_path / "new.pt"), layers="output", num_classes=CLASSES)
    with pytest.raises(ValueError, match="dice_weight"):
        SegmentationMaskTokens(teacher(), str(tmp_path / "new.pt"), dice_weight=-1.0, num_classes=CLASSES)


# ---- detection ---------------------------------------------------------------------------------------
LEVELS = ("0", "p6")


def test_detection_tokens_per_level(tmp_path) -> None:
    torch.manual_seed(0)
    model = detector("retinanet_resnet18_fpn", num_classes=2, min_size=64, max_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "det_tokens.pt"
    module = DetectionMaskTokens(model, str(path), levels=LEVELS, num_tokens=3, num_classes=2, optimizer=adam)
    initial = {k: v.detach().clone() for k, v in module.tokens.state_dict().items()}
    assert len(module.trainable_parameters()) == len(LEVELS) * 5  # tokens + head (2 convs with bias)
    data = SyntheticDetectionDataModule(num_classes=2, image_size=64, train_size=2, val_size=2, batch_size=2)
    trainer(max_steps=2, limit_val_batches=0).fit(module, datamodule=data)

    content = torch.load(path, weights_only=True)
    assert list(content["layers"]) == [f"backbone:{level}" for level in LEVELS]
    for level in LEVELS:
        entry = content["layers"][f"backbone:{level}"]
        assert (entry["channels"], entry["num_tokens"], entry["weighted"]) == (256, 3, True)
        state = entry["state"]
        assert state["tokens"].shape == (3, 256)
        assert state["weight_head.0.weight"].shape == (256, 256, 3, 3)
        assert state["weight_head.2.weight"].shape == (3, 256, 1, 1)
        assert not torch.equal(state["tokens"], initial[f"backbone__{level}.tokens"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    # PerLevel gives each level's MasKD its own tokens from the file
    per_level = PerLevel(
        distiller=MasKD(tokens=str(path), channels=256, align=True, custom_mask=True), levels=list(LEVELS)
    )
    for level in LEVELS:
        saved = content["layers"][f"backbone:{level}"]["state"]
        for key, value in per_level.level(level).masker.state_dict().items():
            assert torch.equal(value, saved[key]), (level, key)


def test_detection_refuses_an_existing_file_and_unknown_layers(tmp_path) -> None:
    path = tmp_path / "tokens.pt"
    path.touch()
    torch.manual_seed(0)
    model = detector("retinanet_resnet18_fpn", num_classes=2, min_size=64, max_size=64)
    module = DetectionMaskTokens(model, str(path), num_classes=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        module.setup("fit")
    assert path.exists()
    with pytest.raises(ValueError, match=r"Unknown layer 'neck:0'.*'backbone'"):
        DetectionMaskTokens(model, str(tmp_path / "new.pt"), layer="neck", num_classes=2)
    with pytest.raises(ValueError, match="non-empty list of FPN level keys"):
        DetectionMaskTokens(model, str(tmp_path / "new.pt"), levels=[], num_classes=2)
