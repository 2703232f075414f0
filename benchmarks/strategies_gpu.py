"""Strategies with a frozen teacher on GPUs: FSDP (teacher replicated, teacher sharded) and DeepSpeed ZeRO-2.

One distillation run (a ResNet-18 student from a frozen ResNet-50 teacher, KD + FitNet on ``layer4``,
random 64x64 images, SGD) trains the same few steps under each strategy, one after the other in the
same processes:

- ``ddp``: the reference;
- ``fsdp_replicate``: :class:`lightningkd.strategies.DistillationFSDPStrategy` with ``teacher="replicate"``;
- ``fsdp_shard``: the same with ``teacher="shard"``;
- ``deepspeed_zero2``: Lightning's ``DeepSpeedStrategy(stage=2, exclude_frozen_parameters=True)`` (skipped,
  with the reason, when ``deepspeed`` does not import).

For each it checks that the teacher is bit-identical after training (gathered from its shards under
``teacher="shard"``), holds no gradient and stays out of the optimizer, that the checkpoint holds no teacher
weights, and that ``lightningkd export`` writes a bare student that loads with ``strict=True``. The exported
students of all strategies must have the same keys and shapes, and their weights must agree with DDP's
within the precision's tolerance (bf16 autocast: the reductions differ in order). It prints one JSON
line per strategy with the peak GPU memory of rank 0 and the seconds per step (after one warm-up step).

    python benchmarks/strategies_gpu.py --devices 1 --out strategies_gpu.json        # on a GPU machine
    python benchmarks/strategies_gpu.py --reduced --out strategies_cpu.json          # CPU: 2 gloo processes

``--reduced`` runs tiny models in float32 on 2 CPU processes, FSDP and DDP only (Lightning's
DeepSpeedStrategy refuses CPUs). Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightningkd import ClassificationDistillationModule
from lightningkd.checkpoint_io import load_deepspeed_checkpoint
from lightningkd.distillers import KD, FitNet
from lightningkd.strategies import DistillationFSDPStrategy, full_teacher_state


def models(reduced: bool) -> tuple[nn.Module, nn.Module, str, int, int]:
    """(student, teacher, tapped layer, student channels, teacher channels) with fixed initial weights."""
    if reduced:

        def cnn(width: int, seed: int) -> nn.Module:
            torch.manual_seed(seed)
            return nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1, stride=2),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(width, 10),
            )

        return cnn(8, 1), cnn(16, 2), "3", 8, 16
    from torchvision.models import resnet18, resnet50

    torch.manual_seed(1)
    student = resnet18(num_classes=10)
    torch.manual_seed(2)
    teacher = resnet50(num_classes=10)
    return student, teacher, "layer4", 512, 2048


def build(reduced: bool) -> ClassificationDistillationModule:
    student, teacher, layer, s_channels, t_channels = models(reduced)
    torch.manual_seed(3)
    return ClassificationDistillationModule(
        student,
        teacher,
        [
            KD(temperature=4.0),
            FitNet(
                student_layer=layer,
                teacher_layer=layer,
                student_channels=s_channels,
                teacher_channels=t_channels,
            ),
        ],
        num_classes=10,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    )


def strategy(name: str) -> Any:
    if name == "ddp":
        return "ddp"
    if name.startswith("fsdp_"):
        return DistillationFSDPStrategy(teacher=name.removeprefix("fsdp_"))
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=2, exclude_frozen_parameters=True)


class StepTimer(L.Callback):
    """Seconds per training step after the first (warm-up) one."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        steps = self.times[1:]
        return (steps[-1] - steps[0]) / max(len(steps) - 1, 1) if len(steps) > 1 else float("nan")


def run(name: str, args: argparse.Namespace, folder: str) -> dict[str, Any]:
    module = build(args.reduced)
    teacher = module.teacher
    before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu" if args.reduced else "gpu",
        devices=2 if args.reduced else args.devices,
        strategy=strategy(name),
        precision="32-true" if args.reduced else "bf16-mixed",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    g = torch.Generator().manual_seed(0)
    size = 16 if args.reduced else 64
    n = args.batch_size * args.steps * trainer.world_size
    data = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
    if torch.cuda.is_available() and not args.reduced:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, DataLoader(data, batch_size=args.batch_size))
    if name == "fsdp_shard":
        after = full_teacher_state(trainer.strategy)
    elif name == "deepspeed_zero2":
        # DeepSpeed casts the whole module (teacher included) to bf16: compare in the teacher's dtype now
        after = teacher.state_dict()
        before = {k: v.to(device=after[k].device, dtype=after[k].dtype) for k, v in before.items()}
    else:
        after = teacher.state_dict()
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    checkpoint = os.path.join(folder, f"{name}.ckpt")
    trainer.save_checkpoint(checkpoint)
    report = {
        "strategy": name,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "teacher_unchanged": all(torch.equal(before[k].cpu(), after[k].cpu()) for k in before),
        "teacher_grads": sum(p.grad is not None for p in teacher.parameters()),
        "teacher_requires_grad": sum(p.requires_grad for p in teacher.parameters()),
        "teacher_in_optimizer": sum(id(p) in in_optimizer for p in teacher.parameters()),
        "seconds_per_step": timer.seconds_per_step(),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    return report


def export_and_compare(names: list[str], folder: str, reduced: bool) -> list[str]:
    """Export every checkpoint with the command line; compare keys, shapes and weights with DDP's."""
    problems = []
    students = {}
    teacher_parameters = {k for k, _ in models(reduced)[1].named_parameters()}
    for name in names:
        target = os.path.join(folder, f"{name}_student.pt")
        done = subprocess.run(
            [sys.executable, "-m", "lightningkd", "export", os.path.join(folder, f"{name}.ckpt"), target],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            problems.append(f"{name}: export failed: {done.stderr[-500:]}")
            continue
        students[name] = torch.load(target, weights_only=True)
        saved = os.path.join(folder, f"{name}.ckpt")
        if os.path.isdir(saved):  # DeepSpeed: a folder; its model file also keeps the teacher's buffers
            state = load_deepspeed_checkpoint(saved)["state_dict"]
        else:
            state = torch.load(saved, weights_only=True)["state_dict"]
        leaked = [
            k for k in state if k.removeprefix("teacher.") in teacher_parameters and k.startswith("teacher.")
        ]
        if leaked:
            problems.append(f"{name}: the checkpoint holds {len(leaked)} teacher weights, e.g. {leaked[:3]}")
    fresh = models(reduced)[0]
    parameters = {k for k, _ in fresh.named_parameters()}
    tolerance = 1e-5 if reduced else 2e-2  # bf16 autocast: the reductions run in another order
    for name, student in students.items():
        try:
            fresh.load_state_dict(student, strict=True)
        except RuntimeError as err:
            problems.append(f"{name}: the export does not load into the bare student: {err}")
        if name == "ddp" or "ddp" not in students:
            continue
        reference = students["ddp"]
        if sorted(student) != sorted(reference) or any(
            student[k].shape != reference[k].shape for k in reference
        ):
            problems.append(f"{name}: keys or shapes differ from DDP's export")
            continue
        worst = max((student[k].float() - reference[k].float()).abs().max().item() for k in parameters)
        print(json.dumps({"strategy": name, "largest_weight_difference_to_ddp": worst}))
        if worst > tolerance:
            problems.append(f"{name}: weights differ from DDP's by {worst:.3g} (> {tolerance})")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true", help="tiny models on 2 CPU processes (gloo)")
    parser.add_argument("--devices", type=int, default=-1, help="GPUs (default: every visible one)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--out", default=None, help="also write the reports to this JSON file")
    parser.add_argument("--folder", default=None, help="checkpoint folder shared by the processes")
    args = parser.parse_args()
    names = ["ddp", "fsdp_replicate", "fsdp_shard"]
    skipped = {}
    if not args.reduced:
        try:
            import deepspeed  # noqa: F401

            names.append("deepspeed_zero2")
        except Exception as err:  # not installed, or it fails to import with this torch
            skipped["deepspeed_zero2"] = f"{type(err).__name__}: {err}"
    # Lightning re-runs this script for the other ranks with the same arguments: the folder is fixed here
    folder = args.folder or os.environ.setdefault("LIGHTNINGKD_STRATEGIES_FOLDER", tempfile.mkdtemp())
    reports = [run(name, args, folder) for name in names]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if torch.distributed.is_initialized():
        # every rank has saved; tearing gloo/nccl down here keeps its threads from aborting at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    for report in reports:
        print(json.dumps(report))
    problems = [
        f"{r['strategy']}: {check}"
        for r in reports
        for check, bad in (
            ("teacher changed", not r["teacher_unchanged"]),
            ("teacher has gradients", r["teacher_grads"] or r["teacher_requires_grad"]),
            ("teacher in the optimizer", r["teacher_in_optimizer"]),
            ("wrong step count", r["global_step"] != args.steps),
        )
        if bad
    ]
    problems += export_and_compare(names, folder, args.reduced)
    summary = {"skipped": skipped, "problems": problems, "reports": reports}
    if args.out:
        with open(args.out, "w") as file:
            json.dump(summary, file, indent=1)
    print(json.dumps({"skipped": skipped, "problems": problems}))
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
