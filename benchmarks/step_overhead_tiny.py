"""Per-step framework cost of a distillation step: a tiny CNN pair, where the framework dominates.

Three loops train the same tiny student from the same frozen tiny teacher on the same in-memory batches
(batch 16, 32x32, 10 classes) with ``0.1 * CE + 0.9 * KD(T = 4)`` and SGD:

- ``plain``: a hand-written PyTorch loop;
- ``minimal``: the smallest Lightning KD module one would write by hand (teacher and student as
  attributes, no taps, one ``self.log`` per step), run by ``Trainer.fit``;
- ``lightningkd``: ``ClassificationDistillationModule`` + ``KD`` run by ``Trainer.fit`` (every term logged
  at the logging interval, non-finite check and label check on).

The Trainers run with the logger, progress bar and checkpointing off and ``log_every_n_steps=50``. Time is
CPU time of the process (``time.process_time``) with one intra-op thread, so another job on the machine
changes the result little; the loops run in interleaved rounds and the median of the per-round ratios is
reported. Small models on a GPU see the same per-step framework cost as this CPU case.

    python benchmarks/step_overhead_tiny.py --rounds 7 --steps 300
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightningkd.distillers import KD
from lightningkd.functional import kd_loss
from lightningkd.modules import ClassificationDistillationModule

WARMUP = 5  # steps before the clock starts


def tiny_cnn(width: int, num_classes: int = 10) -> nn.Module:
    """Two conv-BN-ReLU blocks, global pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return tiny_cnn(8), tiny_cnn(16).requires_grad_(False).eval()


def plain(loader: DataLoader) -> float:
    student, teacher = pair()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    student.train()
    start = 0.0
    for i, (x, y) in enumerate(loader):
        if i == WARMUP:
            start = time.process_time()
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kd_loss(s_logits, t_logits, 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.process_time() - start


class MinimalKD(L.LightningModule):
    """What a user writes by hand: no taps, no checks, one log call."""

    def __init__(self) -> None:
        super().__init__()
        self.student, self.teacher = pair()

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kd_loss(s_logits, t_logits, 4.0)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9)


def lightningkd_module() -> L.LightningModule:
    student, teacher = pair()
    return ClassificationDistillationModule(
        student,
        teacher,
        [KD(temperature=4.0, weight=0.9)],
        num_classes=10,
        task_weight=0.1,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    )


class CpuTimer(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == WARMUP:
            self.start = time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        self.elapsed = time.process_time() - self.start


def fit(module: L.LightningModule, loader: DataLoader) -> float:
    timer = CpuTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, loader)
    return timer.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.steps * args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.steps * args.batch,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch)
    timed = args.steps - WARMUP
    runs = {
        "plain": lambda: plain(loader),
        "minimal": lambda: fit(MinimalKD(), loader),
        "lightningkd": lambda: fit(lightningkd_module(), loader),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():  # interleaved: drift of the machine hits every loop alike
            times[name].append(run())
    print(f"tiny CNN pair, batch {args.batch}, 1 thread, CPU time, {args.rounds} rounds x {timed} steps")
    for name, values in times.items():
        print(f"  {name:12s} median {1e3 * statistics.median(values) / timed:7.3f} ms/step")

    def ratio(fast: str, slow: str) -> float:
        # throughput ratio slow/fast = time fast / time slow, per round, then the median
        return statistics.median(f / s for f, s in zip(times[fast], times[slow]))

    print(f"minimal Lightning / plain PyTorch throughput:     {ratio('plain', 'minimal'):.3f}")
    print(f"lightningkd / plain PyTorch throughput:           {ratio('plain', 'lightningkd'):.3f}")
    print(f"lightningkd / minimal Lightning throughput:       {ratio('minimal', 'lightningkd'):.3f}")


if __name__ == "__main__":
    main()
