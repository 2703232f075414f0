"""compile_student / compile_teacher: the compiled training step equals the eager one, the taps still work,
and checkpoints, exports and evaluation are those of the plain models.

Most tests swap the default inductor backend for ``aot_eager`` (dynamo + AOT autograd, no C++ build), which
exercises what the library adds (hooks traced into the graph, the forward/backward split, laziness,
pickling) in a second instead of a minute of C++ compilation on a CPU; one slow test runs the default
backend, as a user gets it.
"""

from __future__ import annotations

import copy
import functools
import pickle

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from torch import Tensor, nn

from lightningkd import ClassificationDistillationModule
from lightningkd.distillers import KD, FitNet
from lightningkd.export import export_onnx, export_student
from lightningkd.modules.base import DistillationModule
from lightningkd.taps import FeatureTap, ModelCompileError
from tests.toys import toy_classifier, toy_loader

FAST_BACKEND = "aot_eager"


@torch.library.custom_op("lightningkd_tests::no_fake_kernel", mutates_args=())
def no_fake_kernel(x: Tensor) -> Tensor:
    """An op with an eager kernel only: dynamo cannot trace it (no fake kernel), as a custom CUDA op without
    a registered meta/fake implementation."""
    return x.clone()


class NoFakeKernelNet(nn.Module):
    """A classifier that runs eagerly but cannot be compiled."""

    def __init__(self) -> None:
        super().__init__()
        self.body = toy_classifier(width=6, seed=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(no_fake_kernel(x))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # compiled graphs and recompile counters are process-wide: start and leave each test clean
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_module(
    compile_student: bool = False, compile_teacher: bool = False
) -> ClassificationDistillationModule:
    """FitNet on an intermediate layer (the first conv of the second block) + KD, on two toy CNNs."""
    torch.manual_seed(3)  # the FitNet regressor's initial weights
    fitnet = FitNet(
        student_layer="block.0", teacher_layer="block.0", student_channels=6, teacher_channels=10, weight=5.0
    )
    return ClassificationDistillationModule(
        toy_classifier(width=6, seed=1),
        toy_classifier(width=10, seed=2),
        [fitnet, KD(temperature=2.0)],
        num_classes=4,
        task_weight=0.5,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        compile_student=compile_student,
        compile_teacher=compile_teacher,
    )


def fast_backend(module: ClassificationDistillationModule) -> ClassificationDistillationModule:
    """The module's taps recompiled lazily with ``aot_eager`` instead of inductor."""
    module.student_tap.compile("the student", backend=FAST_BACKEND)
    module.teacher_tap.compile("the teacher", backend=FAST_BACKEND)
    return module


def step(module: ClassificationDistillationModule, batch) -> tuple[Tensor, dict[str, Tensor]]:
    """One training step's loss and the gradients of every trainable parameter."""
    module.train()
    module.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def reference_loss(module: ClassificationDistillationModule, images: Tensor, target: Tensor) -> Tensor:
    """The step's loss written out by hand on the plain models, outside the taps and the module."""
    fitnet, kd = module.distillers
    s_mid, t_mid = {}, {}
    hooks = [
        module.student.block[0].register_forward_hook(lambda m, i, o: s_mid.setdefault("f", o)),
        module.teacher.block[0].register_forward_hook(lambda m, i, o: t_mid.setdefault("f", o)),
    ]
    s_logits = module.student(images)
    with torch.no_grad():
        t_logits = module.teacher(images)
    for hook in hooks:
        hook.remove()
    hint = torch.mean((fitnet.regressor(s_mid["f"]) - t_mid["f"]) ** 2)
    t = 2.0  # KD: T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(s_logits / t, 1),
        torch.log_softmax(t_logits / t, 1),
        reduction="batchmean",
        log_target=True,
    )
    return 0.5 * torch.nn.functional.cross_entropy(s_logits, target) + 5.0 * hint + t * t * kl


def assert_step_matches_eager(backend_swap: bool, rtol: float, atol: float) -> None:
    images, target = next(iter(toy_loader()))
    eager = make_module()
    compiled = make_module(compile_student=True, compile_teacher=True)
    if backend_swap:
        fast_backend(compiled)
    compiled.load_state_dict(eager.state_dict())
    # the hand-written loss on the untouched eager module: the eager step itself is right
    expected = reference_loss(copy.deepcopy(eager), images, target).detach()
    eager_loss, eager_grads = step(eager, (images, target))
    torch.testing.assert_close(eager_loss, expected, rtol=1e-5, atol=1e-6)
    for _ in range(2):  # the first call compiles; the second runs the cached graph
        compiled_loss, compiled_grads = step(compiled, (images, target))
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=rtol, atol=atol)
        assert compiled_grads.keys() == eager_grads.keys()
        for name in eager_grads:  # student, FitNet regressor (through the tapped feature) and nothing else
            torch.testing.assert_close(
                compiled_grads[name], eager_grads[name], rtol=rtol, atol=atol, msg=name
            )
    assert any(n.startswith("distillers.0.") for n in eager_grads)
    assert compiled.student_tap.compiled and compiled.teacher_tap.compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # student and teacher really compiled


def test_compiled_step_equals_eager_loss_and_gradients() -> None:
    # aot_eager runs the same ops in the same order: equal up to float rounding
    assert_step_matches_eager(backend_swap=True, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # inductor builds C++ kernels: about a minute on a 2-core CPU
def test_compiled_step_equals_eager_with_default_backend() -> None:
    # inductor fuses and reorders reductions: float32 differences of ~1e-6 relative are expected
    assert_step_matches_eager(backend_swap=False, rtol=1e-4, atol=1e-5)


def test_keys_checkpoint_export_and_evaluation_of_a_compiled_run(tmp_path) -> None:
    module = fast_backend(make_module(compile_student=True, compile_teacher=True))
    keys = list(module.state_dict())
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, toy_loader(), toy_loader())  # validation runs the student and teacher eagerly
    assert list(module.state_dict()) == keys == list(make_module().state_dict())
    assert not any("_orig_mod" in k for k in keys)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert "val/acc1" in trainer.callback_metrics and "val/teacher_acc1" in trainer.callback_metrics

    ckpt = trainer.checkpoint_callback.best_model_path
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    trained = {k: v for k, v in module.state_dict().items() if not k.startswith("teacher.")}
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in state)

    # the student-only export loads strictly into the bare model, which then equals the trained student
    export_student(ckpt, tmp_path / "student.pt")
    bare = toy_classifier(width=6, seed=0)
    bare.load_state_dict(torch.load(tmp_path / "student.pt", weights_only=True), strict=True)
    images = next(iter(toy_loader()))[0]
    module.eval()
    torch.testing.assert_close(bare.eval()(images), module.student(images))
    # torch.onnx.export traces the module, which it refuses for a dynamo-compiled one: the student is plain
    assert export_onnx(module.student, tmp_path / "student.onnx", images) < 1e-4

    # resume into a fresh compiled module: keys match, training continues compiled
    resumed = fast_backend(make_module(compile_student=True, compile_teacher=True))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(resumed, toy_loader(), ckpt_path=ckpt)
    assert trainer.global_step == 3


def test_compiled_module_pickles_and_copies_and_compiles_again() -> None:
    images, target = next(iter(toy_loader()))
    module = fast_backend(make_module(compile_student=True))
    loss, _ = step(module, (images, target))
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):  # ddp_spawn pickles the module
        assert clone.student_tap.compiled and clone.student_tap._compiled is None
        torch.testing.assert_close(step(clone, (images, target))[0], step(module, (images, target))[0])
        assert clone.student_tap._compiled is not None


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_compile_failure_names_the_model_and_suggests_eager(who: str) -> None:
    failing, plain = NoFakeKernelNet(), toy_classifier(width=6, seed=2)
    student, teacher = (failing, plain) if who == "student" else (plain, failing)

    def module(compiled: bool) -> ClassificationDistillationModule:
        return ClassificationDistillationModule(
            copy.deepcopy(student),
            copy.deepcopy(teacher),
            [KD()],
            num_classes=4,
            **{f"compile_{who}": compiled},
        )

    batch = next(iter(toy_loader()))
    with pytest.raises(ModelCompileError) as error:
        module(compiled=True).training_step(batch, 0)
    message = str(error.value)
    assert f"the {who} (NoFakeKernelNet)" in message
    assert f"compile_{who}: false" in message and "no_fake_kernel" in message
    assert isinstance(error.value.__cause__, torch._dynamo.exc.TorchDynamoException)
    assert torch.isfinite(module(compiled=False).training_step(batch, 0))  # eagerly the same model runs


def test_model_errors_under_compile_are_not_called_compile_failures() -> None:
    # a tap naming a key the layer does not return fails with the tap's own KeyError, compiled or not
    net = nn.Sequential(nn.Linear(3, 3), nn.Identity())
    tap = FeatureTap(net, ["0:missing"])
    tap.compile("the student", backend=FAST_BACKEND)
    with pytest.raises(KeyError, match="returns a Tensor"):
        tap(torch.ones(1, 3))


def test_compile_teacher_needs_a_teacher() -> None:
    with pytest.raises(ValueError, match="compile_teacher was set but there is no teacher"):
        ClassificationDistillationModule(toy_classifier(), num_classes=4, compile_teacher=True)


def test_recipe_switches_build_compiled_taps() -> None:
    # LightningCLI reads model.init_args from the type hints: the switches need no CLI code of their own
    spec = yaml.safe_load(
        """
        class_path: lightningkd.ClassificationDistillationModule
        init_args:
          student: {class_path: torch.nn.Linear, init_args: {in_features: 4, out_features: 3}}
          teacher: {class_path: torch.nn.Linear, init_args: {in_features: 4, out_features: 3}}
          distillers: [{class_path: lightningkd.distillers.KD}]
          num_classes: 3
          compile_student: true
        """
    )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=DistillationModule)
    module = parser.instantiate_classes(parser.parse_object({"model": spec})).model
    assert module.compile_student and module.student_tap.compiled
    assert not module.compile_teacher and not module.teacher_tap.compiled
    spec["init_args"]["compile_studnet"] = spec["init_args"].pop("compile_student")
    with pytest.raises(ArgumentError, match="compile_studnet"):
        parser.parse_object({"model": spec})
