import functools
import math

import lightning as L
import pytest
import torch
from torch import nn

from lightningkd import ClassificationDistillationModule, Renormalize
from lightningkd.callbacks import KDWeightWarmup
from lightningkd.distillers import KD
from lightningkd.export import export_student
from lightningkd.models import load_weights
from tests.toys import toy_classifier, toy_loader


def make_module(**kwargs) -> ClassificationDistillationModule:
    kwargs.setdefault("distillers", [KD(temperature=2.0)])
    kwargs.setdefault("optimizer", functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    return ClassificationDistillationModule(
        toy_classifier(width=6, seed=1), toy_classifier(width=10, seed=2), num_classes=4, **kwargs
    )


def trainer(tmp_path, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_steps", 3)
    kwargs.setdefault("limit_val_batches", 1)
    return L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_teacher_is_frozen_and_untouched_by_fit(tmp_path) -> None:
    module = make_module()
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer(tmp_path, enable_checkpointing=False).fit(module, toy_loader(), toy_loader())
    after = module.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert any(not torch.equal(student_before[k], v) for k, v in module.student.state_dict().items())
    assert all(p.grad is None for p in module.teacher.parameters())
    assert not any(p.requires_grad for p in module.teacher.parameters())


def test_teacher_stays_in_eval_mode() -> None:
    module = make_module()
    module.train()
    assert module.student.training and not module.teacher.training
    assert not any(m.training for m in module.teacher.modules())


def test_optimizer_gets_student_and_adapters_only() -> None:
    module = make_module()
    params = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert params == {id(p) for p in module.student.parameters()}
    assert not params & {id(p) for p in module.teacher.parameters()}


def test_every_term_is_logged_raw_and_weighted(tmp_path) -> None:
    module = make_module(distillers=[KD(temperature=2.0, weight=0.5), KD(temperature=4.0)], task_weight=0.1)
    t = trainer(tmp_path, max_steps=1, enable_checkpointing=False, log_every_n_steps=1)
    t.fit(module, toy_loader())
    m = t.callback_metrics
    assert {"train/task_loss", "train/kd/kd", "train/kd/kd_1", "train/kd/kd_weighted", "train/loss"} <= set(m)
    torch.testing.assert_close(m["train/kd/kd_weighted"], 0.5 * m["train/kd/kd"])
    expected = 0.1 * m["train/task_loss"] + m["train/kd/kd_weighted"] + m["train/kd/kd_1_weighted"]
    torch.testing.assert_close(m["train/loss"], expected)


def test_teacher_metric_logged_once(tmp_path) -> None:
    module = make_module()
    t = trainer(tmp_path, max_epochs=2, max_steps=-1, enable_checkpointing=False)
    calls = []
    original = module.teacher_logits
    module.teacher_logits = lambda x, **kw: calls.append(module.training) or original(x, **kw)
    t.fit(module, toy_loader(n=8), toy_loader(n=8))
    assert calls == [False]  # one validation batch in the first epoch only
    assert "val/teacher_acc1" in t.callback_metrics and "val/acc1" in t.callback_metrics


def test_checkpoint_excludes_teacher_and_resume_continues(tmp_path) -> None:
    module = make_module()
    trainer(tmp_path, max_steps=2).fit(module, toy_loader(), toy_loader())
    ckpt_path = next((tmp_path / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("student.") for k in state)

    resumed = make_module()  # teacher rebuilt from its "recipe"
    teacher_before = {k: v.clone() for k, v in resumed.teacher.state_dict().items()}
    t = trainer(tmp_path, max_steps=4)
    t.fit(resumed, toy_loader(), toy_loader(), ckpt_path=ckpt_path)
    assert t.global_step == 4
    for k, v in resumed.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])


def test_resume_with_wrong_student_fails_loudly(tmp_path) -> None:
    module = make_module()
    trainer(tmp_path, max_steps=1).fit(module, toy_loader())
    ckpt_path = next((tmp_path / "checkpoints").glob("*.ckpt"))
    other = ClassificationDistillationModule(
        toy_classifier(width=7), toy_classifier(width=10), [KD()], num_classes=4
    )
    with pytest.raises(
        RuntimeError, match=r"(?s)the student architecture changed \(student\).*shape differs"
    ):
        trainer(tmp_path, max_steps=2).fit(other, toy_loader(), ckpt_path=ckpt_path)


def test_resume_with_added_adapters_names_the_distillers(tmp_path) -> None:
    from lightningkd.distillers import FitNet

    trainer(tmp_path, max_steps=1).fit(make_module(), toy_loader())
    ckpt_path = next((tmp_path / "checkpoints").glob("*.ckpt"))
    fitnet = FitNet(student_layer="block", teacher_layer="block", student_channels=6, teacher_channels=10)
    other = make_module(distillers=[KD(temperature=2.0), fitnet])
    with pytest.raises(RuntimeError) as info:
        trainer(tmp_path, max_steps=2).fit(other, toy_loader(), ckpt_path=ckpt_path)
    message = str(info.value)
    assert "the distillers changed (distillers):" in message and "missing" in message
    assert "fitnet.regressor: 6 missing" in message and "student architecture" not in message
    assert "Resume with the recipe that wrote it" in message


def test_export_loads_strictly_into_bare_student(tmp_path) -> None:
    module = make_module()
    trainer(tmp_path, max_steps=1).fit(module, toy_loader())
    ckpt_path = next((tmp_path / "checkpoints").glob("*.ckpt"))
    count = export_student(ckpt_path, tmp_path / "student.pt")
    bare = toy_classifier(width=6, seed=99)
    bare.load_state_dict(torch.load(tmp_path / "student.pt"), strict=True)
    assert count == len(bare.state_dict())
    for k, v in module.student.state_dict().items():
        assert torch.equal(bare.state_dict()[k], v)
    # the same checkpoint also serves as a teacher for the next run
    again = load_weights(toy_classifier(width=6, seed=5), ckpt_path)
    assert torch.equal(again.fc.weight, module.student.fc.weight)


def test_load_weights_plain_state_dict_and_mismatch(tmp_path) -> None:
    net = toy_classifier(width=6)
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    loaded = load_weights(toy_classifier(width=6, seed=3), tmp_path / "plain.pt")
    assert torch.equal(loaded.fc.weight, net.fc.weight)
    with pytest.raises(RuntimeError, match="do not fit"):
        load_weights(toy_classifier(width=6, num_classes=5), tmp_path / "plain.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights(net, tmp_path / "missing.pt")


def test_kd_weight_warmup_scales_distillers(tmp_path) -> None:
    module = make_module(distillers=[KD(), KD(name="other")])
    warm = KDWeightWarmup(epochs=4, distillers=["kd"])
    t = trainer(tmp_path, max_epochs=2, max_steps=-1, enable_checkpointing=False, callbacks=[warm])
    t.fit(module, toy_loader(n=8))
    assert module.distillers[0].scale == pytest.approx(2 / 4)  # second epoch (0-based 1): (1 + 1) / 4
    assert module.distillers[1].scale == 1.0
    assert [KDWeightWarmup(steps=10).factor(0, s) for s in (0, 4, 9, 20)] == [0.1, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="exactly one"):
        KDWeightWarmup(epochs=2, steps=3)
    with pytest.raises(ValueError, match="unknown distiller names"):
        trainer(tmp_path, max_steps=1, callbacks=[KDWeightWarmup(epochs=1, distillers=["dkd"])]).fit(
            make_module(), toy_loader()
        )


def test_renormalize_maps_student_stats_to_teacher_stats() -> None:
    r = Renormalize([0.5, 0.4, 0.3], [0.2, 0.2, 0.2], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], size=4)
    raw = torch.rand(2, 3, 8, 8)
    student_view = (raw - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    out = r(student_view)
    assert out.shape == (2, 3, 4, 4)
    expected = torch.nn.functional.interpolate(raw, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected)


def test_teacher_input_is_applied(tmp_path) -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.shape)
            return x[..., :4, :4]

    module = make_module(teacher_input=Probe())
    trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, toy_loader())
    assert seen == [torch.Size([8, 3, 8, 8])]


def test_bad_arguments_are_rejected() -> None:
    net = toy_classifier()
    with pytest.raises(ValueError, match="no teacher"):
        ClassificationDistillationModule(net, None, [KD()], num_classes=4)
    with pytest.raises(ValueError, match="same module object"):
        ClassificationDistillationModule(net, net, [KD()], num_classes=4)
    with pytest.raises(TypeError, match="Distiller instances"):
        ClassificationDistillationModule(net, toy_classifier(), [nn.MSELoss()], num_classes=4)
    with pytest.raises(ValueError, match="Unknown layer"):
        from lightningkd.distillers import KD as _KD

        ClassificationDistillationModule(net, toy_classifier(), [_KD(student_layer="nope")], num_classes=4)
    module = make_module()
    with pytest.raises(ValueError, match=r"expected \(N, 4\)"):
        module.task_loss(torch.zeros(2, 5), {"target": torch.zeros(2, dtype=torch.long)})


def test_training_without_teacher_is_a_plain_run(tmp_path) -> None:
    module = ClassificationDistillationModule(toy_classifier(), None, num_classes=4)
    t = trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    t.fit(module, toy_loader(), toy_loader())
    assert "val/acc1" in t.callback_metrics and "val/teacher_acc1" not in t.callback_metrics


def test_label_smoothing_matches_the_definition() -> None:
    module = ClassificationDistillationModule(toy_classifier(), None, num_classes=3, label_smoothing=0.3)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    target = torch.tensor([0, 1])
    log_p = logits.log_softmax(dim=1)
    soft = torch.full((2, 3), 0.3 / 3) + 0.7 * torch.nn.functional.one_hot(target, 3)  # (1 - e) y + e / K
    expected = -(soft * log_p).sum(dim=1).mean()
    torch.testing.assert_close(module.task_loss(logits, {"target": target}), expected)
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationDistillationModule(toy_classifier(), None, num_classes=3, label_smoothing=1.0)


def test_validation_loss_is_the_cross_entropy_of_the_student(tmp_path) -> None:
    module = make_module()
    loader = toy_loader(n=12, batch_size=8)  # batches of 8 and 4: the logged value is the sample mean
    metrics = trainer(tmp_path, limit_val_batches=1.0).validate(module, loader, verbose=False)[0]
    module.student.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for images, labels in loader:
            for logits, label in zip(module.student(images).tolist(), labels.tolist()):
                top = max(logits)  # -log softmax at the label, in plain Python
                total += top + math.log(sum(math.exp(v - top) for v in logits)) - logits[label]
                count += 1
    assert metrics["val/loss"] == pytest.approx(total / count, rel=1e-5)
