"""A few real distillation steps on CamVid (../shared/data/camvid) with torchvision and mmseg models."""

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import CamVidDataModule
from lightningkd.distillers import BPKD, ChannelWiseDivergence
from lightningkd.models import MMSegSegmenter, TorchvisionSegmenter
from lightningkd.modules import SegmentationDistillationModule

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
pytestmark = pytest.mark.skipif(
    not CAMVID.is_dir(), reason=f"the real CamVid set is not at {CAMVID} (only CI and the team have it)"
)


def fit_a_few_steps(student, teacher, distillers, aux_layer=None) -> tuple[L.Trainer, dict]:
    torch.manual_seed(0)
    data = CamVidDataModule(CAMVID, crop_size=(96, 128), scale_range=(0.25, 0.5), batch_size=2, num_workers=0)
    module = SegmentationDistillationModule(
        student, teacher, distillers, num_classes=11, ignore_index=11, aux_layer=aux_layer, eval_scale=0.25
    )
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    changed = {
        k for k, v in student.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])
    }
    return trainer, {"changed": changed, "module": module}


def check_run(trainer: L.Trainer, info: dict, distiller_names: list[str]) -> None:
    metrics = trainer.callback_metrics
    assert trainer.global_step == 3
    assert info["changed"], "the student's weights did not move"
    for name in distiller_names:
        assert torch.isfinite(metrics[f"train/kd/{name}"])
    assert 0.0 <= float(metrics["val/mIoU"]) <= 1.0
    assert 0.0 <= float(metrics["val/teacher_mIoU"]) <= 1.0
    assert "val/iou/Road" in metrics  # CamVid class names come from the datamodule


def test_torchvision_models_fit_with_bpkd_on_camvid() -> None:
    student = TorchvisionSegmenter("lraspp_mobilenet_v3_large", 11)
    teacher = TorchvisionSegmenter("deeplabv3_mobilenet_v3_large", 11, aux_head=True)
    trainer, info = fit_a_few_steps(student, teacher, [BPKD(num_classes=11, ignore_index=11)])
    check_run(trainer, info, ["bpkd"])


def test_mmseg_models_fit_with_cwd_on_camvid() -> None:
    config = "pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024"
    student, teacher = MMSegSegmenter(config, num_classes=11), MMSegSegmenter(config, num_classes=11)
    trainer, info = fit_a_few_steps(
        student, teacher, [ChannelWiseDivergence(temperature=4.0, weight=3.0)], aux_layer="auxiliary_head"
    )
    check_run(trainer, info, ["channelwisedivergence"])
    assert any(k.startswith("auxiliary_head.") for k in info["changed"]), "the auxiliary loss did not train"
