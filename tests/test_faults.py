"""Faults stop a run where they appear and name their cause; signals leave a resumable checkpoint."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightningkd.callbacks import InterruptCheckpoint, NoOverwrite
from lightningkd.distillers import DKD, KD
from lightningkd.modules import ClassificationDistillationModule, SegmentationDistillationModule
from lightningkd.modules.base import LabelRangeError, NonFiniteError
from tests.test_module import make_module, trainer
from tests.toys import toy_classifier, toy_loader


# ---------------------------------------------------------------------------------------------- divergence
def test_divergence_stops_at_the_step_it_appears_and_names_the_terms(tmp_path) -> None:
    module = make_module(optimizer=lambda p: torch.optim.SGD(p, lr=1e20))
    t = trainer(tmp_path, max_steps=20)
    with pytest.raises(NonFiniteError) as info:
        t.fit(module, toy_loader(n=64))
    message = str(info.value)
    step = t.global_step
    assert f"at step {step} " in message and step >= 1  # the first step is finite, the update explodes
    assert "task loss = nan" in message and "distiller 'kd' = nan" in message
    assert "student's outputs are non-finite" in message
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was saved with the diverged weights


def test_skip_mode_skips_non_finite_steps_and_keeps_weights_finite(tmp_path) -> None:
    class NaNOnce(nn.Module):  # the teacher returns NaN on the second batch only
        def __init__(self) -> None:
            super().__init__()
            self.net, self.calls = toy_classifier(width=10, seed=2), 0

        def forward(self, x):
            self.calls += 1
            out = self.net(x)
            return out * float("nan") if self.calls == 2 else out

    module = ClassificationDistillationModule(
        toy_classifier(width=6, seed=1), NaNOnce(), [KD()], num_classes=4, on_nonfinite="skip"
    )
    t = trainer(tmp_path, max_steps=3, enable_checkpointing=False, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"distiller 'kd' = nan.*teacher is the cause.*Skipping"):
        t.fit(module, toy_loader(n=32))
    assert module.skipped_steps == 1 and t.global_step == 3  # 4 batches, one skipped
    assert all(torch.isfinite(p).all() for p in module.student.parameters())


def test_teacher_with_nan_weights_is_named_before_training(tmp_path) -> None:
    module = make_module()
    with torch.no_grad():
        module.teacher.fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"The teacher .*fc.weight.*checkpoint is broken"):
        trainer(tmp_path).fit(module, toy_loader())


def test_teacher_with_non_finite_outputs_is_named_at_its_first_validation(tmp_path) -> None:
    class Overflow(nn.Module):  # finite weights, infinite outputs
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            return self.fc(x.flatten(1)) * 1e39

    module = ClassificationDistillationModule(toy_classifier(), Overflow(), num_classes=4)
    with pytest.raises(NonFiniteError, match="The teacher .* the teacher is the cause"):
        trainer(tmp_path, num_sanity_val_steps=0).validate(module, toy_loader(), verbose=False)


def test_no_checkpoint_is_written_with_non_finite_weights() -> None:
    module = make_module()
    with torch.no_grad():
        module.student.fc.bias[0] = float("inf")
    state = {"state_dict": module.state_dict()}
    with pytest.raises(NonFiniteError, match=r"Refusing to write a checkpoint.*student.fc.bias"):
        module.on_save_checkpoint(state)


# --------------------------------------------------------------------------------------------- labels
def test_labels_beyond_num_classes_are_named(tmp_path) -> None:
    module = make_module()  # 4 classes
    images, labels = torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 2, 3, 9, 1, 7, 0])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8)
    with pytest.raises(
        LabelRangeError, match=r"outside 0\.\.3, the largest 9.*values \[7, 9\].*num_classes is 4"
    ):
        trainer(tmp_path, enable_checkpointing=False).fit(module, loader)


def test_segmentation_label_out_of_range_names_largest_label_and_ignore_index() -> None:
    module = SegmentationDistillationModule(nn.Conv2d(3, 11, 1), num_classes=11, ignore_index=11)
    target = torch.full((1, 4, 4), 11)  # ignored pixels are fine
    target[0, 0, :2] = torch.tensor([3, 50])
    with pytest.raises(LabelRangeError, match=r"largest 50.*num_classes is 11 and ignore_index is 11"):
        module.training_step({"image": torch.randn(1, 3, 4, 4), "target": target}, 0)
    target[0, 0, 1] = 10
    assert torch.isfinite(module.training_step({"image": torch.randn(1, 3, 4, 4), "target": target}, 0))


def test_datamodule_with_more_classes_than_the_module_is_refused(tmp_path) -> None:
    from datamodules import SyntheticClassificationDataModule

    module = ClassificationDistillationModule(toy_classifier(num_classes=5), num_classes=5)
    data = SyntheticClassificationDataModule(
        num_classes=10, image_size=8, train_size=16, val_size=8, batch_size=8
    )
    with pytest.raises(LabelRangeError, match=r"has 10 classes .* num_classes is 5.*to 10"):
        trainer(tmp_path).fit(module, data)


# -------------------------------------------------------------------------------------------- signals
class SendSignal(L.Callback):
    def __init__(self, signum: int, at_step: int) -> None:
        self.signum, self.at_step = signum, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


class CountSteps(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_resumable_checkpoint_and_exits_non_zero(tmp_path, signum, status) -> None:
    # as in an interactive shell (a background job starts with SIGINT ignored, and keeps ignoring it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_and_resume(tmp_path, signum, status)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_and_resume(tmp_path, signum: int, status: int) -> None:
    module = make_module()
    saver = InterruptCheckpoint(dirpath=str(tmp_path / "ckpt"))
    t = trainer(tmp_path, max_steps=8, callbacks=[SendSignal(signum, at_step=3), saver], limit_val_batches=0)
    with pytest.raises(SystemExit) as info:
        t.fit(module, toy_loader(n=48))  # 6 batches per epoch: the signal arrives mid-epoch
    assert info.value.code == status
    assert saver.saved == str(tmp_path / "ckpt" / "interrupted-step4.ckpt")  # the batch of step 3 finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    state = torch.load(saver.saved, weights_only=True)
    assert state["global_step"] == 4 and "optimizer_states" in state

    counter = CountSteps()
    resumed = make_module()
    t2 = trainer(tmp_path, max_steps=8, callbacks=[counter], limit_val_batches=0)
    t2.fit(resumed, toy_loader(n=48), ckpt_path=saver.saved)
    assert counter.steps == [5, 6, 7, 8] and t2.global_step == 8  # continues at the next step
    # the resumed weights are the interrupted run's weights plus four steps: step 5 starts from them
    assert not torch.equal(resumed.student.fc.weight, make_module().student.fc.weight)


def test_ignored_sigint_stays_ignored(tmp_path) -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under nohup
    try:
        seen = []

        class Probe(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                seen.append(signal.getsignal(signal.SIGINT))

        t = trainer(
            tmp_path, max_steps=2, callbacks=[InterruptCheckpoint(), Probe()], enable_checkpointing=False
        )
        t.fit(make_module(), toy_loader())
        assert seen == [signal.SIG_IGN, signal.SIG_IGN]
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------------------ overwrite
def test_a_run_does_not_replace_an_earlier_runs_checkpoint(tmp_path) -> None:
    def run(steps: int = 1, **kwargs) -> None:
        checkpoint = ModelCheckpoint(
            dirpath=tmp_path / "runs", filename="teacher", enable_version_counter=False
        )
        t = trainer(
            tmp_path, max_steps=steps, callbacks=[checkpoint, NoOverwrite(**kwargs)], limit_val_batches=0
        )
        t.fit(make_module(), toy_loader())

    run()
    first = (tmp_path / "runs" / "teacher.ckpt").read_bytes()
    with pytest.raises(FileExistsError, match=r"teacher\.ckpt exists.*--overwrite true"):
        run()
    assert (tmp_path / "runs" / "teacher.ckpt").read_bytes() == first
    run(steps=2, overwrite=True)  # another run, so other bytes
    assert (tmp_path / "runs" / "teacher.ckpt").read_bytes() != first


def test_kd_sub_terms_are_logged_at_the_logging_interval(tmp_path) -> None:
    module = make_module(distillers=[DKD(alpha=1.0, beta=8.0, temperature=4.0)])
    logged = []
    original = module.log
    module.log = lambda name, *a, **k: logged.append(name) or original(name, *a, **k)
    trainer(tmp_path, max_steps=4, log_every_n_steps=2, enable_checkpointing=False, limit_val_batches=0).fit(
        module, toy_loader(n=32)
    )
    names = {
        "train/task_loss",
        "train/kd/dkd",
        "train/kd/dkd_weighted",
        "train/kd/dkd/tckd",
        "train/kd/dkd/nckd",
    }
    assert set(logged) == names | {"train/loss"}
    assert all(logged.count(n) == 2 for n in names)  # steps 2 and 4 of 4
