"""fp16 mixed-precision training with a GradScaler, end to end on the CPU.

Lightning turns ``Trainer(accelerator="cpu", precision="16-mixed")`` into bf16-mixed (no GradScaler): fp16
AMP on the CPU needs the plugin to be given explicitly, ``plugins=[MixedPrecision("16-mixed", "cpu",
torch.amp.GradScaler("cpu"))]``. On a GPU, ``precision="16-mixed"`` alone builds the same plugin with a
CUDA GradScaler.

The per-distiller precision checks (bf16 and fp16 values against float32) are in
``tests/distiller_tester.py``.
"""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightningkd import ClassificationDistillationModule
from lightningkd.distillers import KD, FitNet
from tests.toys import toy_classifier, toy_loader

STUDENT_WIDTH, TEACHER_WIDTH = 6, 10


def make_module() -> ClassificationDistillationModule:
    """A tiny classification pair with a logit distiller (KD) and a feature distiller with an adapter."""
    fitnet = FitNet(
        student_layer="block",
        teacher_layer="block",
        student_channels=STUDENT_WIDTH,
        teacher_channels=TEACHER_WIDTH,
    )
    return ClassificationDistillationModule(
        toy_classifier(width=STUDENT_WIDTH, seed=1),
        toy_classifier(width=TEACHER_WIDTH, seed=2),
        num_classes=4,
        distillers=[KD(temperature=2.0), fitnet],
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    )


def fp16_trainer(tmp_path, callbacks: list[L.Callback], max_steps: int) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
        max_steps=max_steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def trainable(module: ClassificationDistillationModule) -> dict[str, torch.Tensor]:
    """Copies of the student's and the adapters' parameters (what the optimizer updates)."""
    return {
        name: p.detach().clone()
        for name, p in module.named_parameters()
        if p.requires_grad and not name.startswith("teacher.")
    }


class StepRecorder(L.Callback):
    """Per step: the loss, the scaler's scale and the trainable weights before and after the step; on
    ``inf_step`` one student gradient is overwritten with inf after the backward pass."""

    def __init__(self, inf_step: int | None = None) -> None:
        self.inf_step = inf_step
        self.steps: list[dict] = []
        self.activation_dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.student.block.register_forward_hook(
            lambda module, args, out: self.activation_dtypes.add(out.dtype)
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append({"weights_before": trainable(pl_module), "scale_before": self._scale(trainer)})

    def on_after_backward(self, trainer, pl_module) -> None:
        if len(self.steps) - 1 == self.inf_step:
            pl_module.student.fc.weight.grad.fill_(math.inf)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self.steps[-1]
        step["loss"] = outputs["loss"].item()
        step["weights_after"] = trainable(pl_module)
        step["scale_after"] = self._scale(trainer)

    @staticmethod
    def _scale(trainer: L.Trainer) -> float | None:
        scaler = trainer.precision_plugin.scaler
        return None if scaler._scale is None else scaler.get_scale()  # None: not yet initialised


def changed(step: dict) -> list[str]:
    return [k for k, v in step["weights_before"].items() if not torch.equal(v, step["weights_after"][k])]


def test_lightning_16_mixed_on_cpu_falls_back_to_bf16_without_a_scaler(tmp_path) -> None:
    # why the fp16 tests below pass the MixedPrecision plugin explicitly
    with pytest.warns(UserWarning, match="not supported on CPU"):
        trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", precision="16-mixed", logger=False)
    assert trainer.precision_plugin.precision == "bf16-mixed"
    assert trainer.precision_plugin.scaler is None


def test_fp16_training_with_a_grad_scaler(tmp_path) -> None:
    module = make_module()
    recorder = StepRecorder()
    trainer = fp16_trainer(tmp_path, [recorder], max_steps=3)
    trainer.fit(module, toy_loader())
    plugin = trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision) and plugin.precision == "16-mixed"
    assert isinstance(plugin.scaler, torch.amp.GradScaler) and plugin.scaler.is_enabled()
    assert recorder.activation_dtypes == {torch.float16}  # the student really ran in fp16
    assert len(recorder.steps) == 3
    for step in recorder.steps:
        assert math.isfinite(step["loss"])
        moved = changed(step)
        assert any(k.startswith("student.") for k in moved), "the student did not change"
        assert any(k.startswith("distillers.1.") for k in moved), "FitNet's regressor did not change"
        # no overflow on these tiny models: the scale stays at its initial 2^16 (growth after 2000 steps)
        assert step["scale_after"] == 2.0**16
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_fp16_overflow_step_is_skipped_by_the_scaler(tmp_path) -> None:
    module = make_module()
    recorder = StepRecorder(inf_step=1)
    trainer = fp16_trainer(tmp_path, [recorder], max_steps=3)
    trainer.fit(module, toy_loader(n=24))  # three batches of 8
    first, overflow, after = recorder.steps
    assert changed(first)
    # the inf gradient: no parameter moves (momentum included) and the scale halves (backoff factor 0.5)
    assert changed(overflow) == []
    assert overflow["scale_after"] == overflow["scale_before"] / 2
    # training goes on at the lower scale, with finite weights
    assert any(k.startswith("student.") for k in changed(after))
    assert after["scale_after"] == overflow["scale_after"]
    assert math.isfinite(after["loss"])
    assert all(torch.isfinite(p).all() for p in module.parameters())
