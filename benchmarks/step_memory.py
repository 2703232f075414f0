"""Peak memory of a lightningkd distillation step against a hand-written PyTorch step.

Both arms train the same student from the same frozen teacher on the same in-memory batches with SGD and
``0.1 * CE + 0.9 * KD(T = 4)`` (``--distiller kd``) or that plus a FitNet hint on an intermediate layer
(``--distiller fitnet``: a 1x1 conv regressor on the student's map, MSE to the teacher's map):

- ``plain``: a hand-written loop (teacher under ``torch.no_grad``; for FitNet, forward hooks that keep the
  two maps of the current step);
- ``lightningkd``: ``ClassificationDistillationModule`` with the same distillers, run by ``Trainer.fit``.

On the CPU each arm runs in its own process and the figure is the growth of the process's peak resident
size during training (``ru_maxrss`` at the end minus the resident size once models and data are built),
which leaves out the interpreter and the imports. On a GPU (``--device cuda``) it is the peak of
``torch.cuda.max_memory_allocated`` during training above what was allocated before the first step. The
ratio lightningkd / plain is the figure of merit (goal: at most 1.1).

    python benchmarks/step_memory.py                                   # CPU, ResNet-18 -> ShuffleNetV2
    python benchmarks/step_memory.py --distiller fitnet
    python benchmarks/step_memory.py --device cuda --teacher resnet50 --student resnet18 --size 224 --batch 64
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightningkd.distillers import KD, FitNet
from lightningkd.functional import kd_loss
from lightningkd.models import classifier
from lightningkd.modules import ClassificationDistillationModule

# the intermediate layers FitNet reads, and their channels, per torchvision model
HINT_LAYERS = {
    "resnet18": ("layer3", 256),
    "resnet50": ("layer3", 1024),
    "shufflenet_v2_x0_5": ("stage3", 96),
    "mobilenet_v3_large": ("features.12", 112),
}


def rss_bytes() -> int:
    """The current resident size of this process (Linux ``/proc``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = classifier(args.student, num_classes=args.classes)
    teacher = classifier(args.teacher, num_classes=args.classes).requires_grad_(False).eval()
    return student, teacher


def loader(args: argparse.Namespace) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.steps * args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, args.classes, (args.steps * args.batch,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=args.batch)


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def plain(args: argparse.Namespace, data: DataLoader, device: torch.device) -> None:
    student, teacher = models(args)
    student.to(device).train()
    teacher.to(device)
    params = list(student.parameters())
    features: dict[str, torch.Tensor] = {}
    regressor = None
    if args.distiller == "fitnet":
        (s_layer, s_ch), (t_layer, t_ch) = HINT_LAYERS[args.student], HINT_LAYERS[args.teacher]
        _module(student, s_layer).register_forward_hook(lambda m, i, o: features.__setitem__("s", o))
        _module(teacher, t_layer).register_forward_hook(lambda m, i, o: features.__setitem__("t", o))
        regressor = nn.Conv2d(s_ch, t_ch, 1, bias=False).to(device)
        params += list(regressor.parameters())
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    for x, y in data:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kd_loss(s_logits, t_logits, 4.0)
            if regressor is not None:
                loss = loss + F.mse_loss(regressor(features["s"]).float(), features["t"].float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        features.clear()  # the next step's hooks fill it again


def lightningkd(args: argparse.Namespace, data: DataLoader, device: torch.device) -> None:
    student, teacher = models(args)
    distillers = [KD(temperature=4.0, weight=0.9)]
    if args.distiller == "fitnet":
        (s_layer, s_ch), (t_layer, t_ch) = HINT_LAYERS[args.student], HINT_LAYERS[args.teacher]
        distillers.append(
            FitNet(student_layer=s_layer, teacher_layer=t_layer, student_channels=s_ch, teacher_channels=t_ch)
        )
    module = ClassificationDistillationModule(
        student,
        teacher,
        distillers,
        num_classes=args.classes,
        task_weight=0.1,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    )
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=1,
        precision="bf16-mixed" if args.bf16 else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data)


ARMS = {"plain": plain, "lightningkd": lightningkd}


def measure(arm: str, args: argparse.Namespace) -> int:
    """Bytes the training of ``arm`` adds at its peak (see the module docstring)."""
    device = torch.device(args.device)
    data = loader(args)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        ARMS[arm](args, data, device)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = rss_bytes()
    ARMS[arm](args, data, device)
    return peak_rss_bytes() - before


def child(arm: str, argv: list[str]) -> int:
    """Run ``arm`` in a fresh process (CPU: its own peak resident size) and return its figure."""
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--child", arm], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["bytes"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--student", default="shufflenet_v2_x0_5")
    p.add_argument("--distiller", choices=["kd", "fitnet"], default="kd")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (bf16-mixed in Lightning)")
    p.add_argument("--repeats", type=int, default=3, help="processes per arm (CPU), interleaved")
    p.add_argument("--json", action="store_true", help="print one JSON line with the figures")
    p.add_argument("--child", choices=list(ARMS), help=argparse.SUPPRESS)
    return p


def run(argv: list[str]) -> dict[str, float]:
    """Both arms' figures (median over repeats on the CPU) and their ratio."""
    args = parser().parse_args(argv)
    figures: dict[str, list[int]] = {arm: [] for arm in ARMS}
    for _ in range(args.repeats if args.device == "cpu" else 1):
        for arm in ARMS:  # interleaved
            figures[arm].append(child(arm, argv) if args.device == "cpu" else measure(arm, args))
    medians = {arm: statistics.median(v) for arm, v in figures.items()}
    return {
        "plain_mib": medians["plain"] / 2**20,
        "lightningkd_mib": medians["lightningkd"] / 2**20,
        "ratio": medians["lightningkd"] / medians["plain"],
    }


def main() -> None:
    args = parser().parse_args()
    argv = [a for a in sys.argv[1:] if a != "--json"]
    if args.child:
        torch.set_num_threads(2)
        print(json.dumps({"bytes": measure(args.child, args)}))
        return
    result = run(argv)
    if args.json:
        print(json.dumps(result))
        return
    where = "peak RSS growth per process" if args.device == "cpu" else "peak allocated on the GPU"
    print(
        f"{args.teacher} -> {args.student}, {args.distiller}, {args.size}px, batch {args.batch}, "
        f"{args.steps} steps, {args.device}{' bf16' if args.bf16 else ''} ({where})"
    )
    print(f"  plain        {result['plain_mib']:8.1f} MiB")
    print(f"  lightningkd  {result['lightningkd_mib']:8.1f} MiB")
    print(f"  lightningkd / plain: {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
