"""Per-step time of a distillation step with torch.compile, against the hand-written eager loop.

The tiny CNN pair of ``step_overhead_tiny.py`` (batch 16, 32x32, 10 classes, ``0.1 * CE + 0.9 * KD(T = 4)``,
SGD) trained by four loops on the same in-memory batches:

- ``plain``: the hand-written PyTorch loop, eager (the baseline of every ratio);
- ``plain_compiled``: the same loop with ``torch.compile`` on the student and the teacher (for reference);
- ``lightningkd``: ``ClassificationDistillationModule`` + ``KD`` run by ``Trainer.fit``, eager;
- ``lightningkd_compiled``: the same with ``compile_student=True, compile_teacher=True``.

Each loop's models are built once and reused by every round, so each loop compiles once (in its first
round's warm-up steps, which are not timed; the wall time of those steps is printed as the compile cost).
Rounds are interleaved and the median of the per-round ratios is reported. On the CPU the time is CPU time
of the process (``time.process_time``) with one intra-op thread (inductor's C++ kernels run on that one
thread too), so another job on the machine changes the result little; on a GPU it is wall time between
two device synchronisations. The dynamo counters printed at the end show that every compiled loop ran
compiled graphs (no fallback to eager after a recompile limit).

    python benchmarks/compile_step.py --rounds 5 --steps 200                 # CPU
    python benchmarks/compile_step.py --device cuda --rounds 7 --steps 300   # GPU
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from step_overhead_tiny import WARMUP, pair
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightningkd.distillers import KD
from lightningkd.functional import kd_loss
from lightningkd.modules import ClassificationDistillationModule


class Clock:
    """CPU time of the process on the CPU; wall time between device synchronisations on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()


class PlainLoop:
    """The hand-written KD loop; ``compiled`` wraps both models in ``torch.compile``."""

    def __init__(self, device: torch.device, compiled: bool) -> None:
        self.student, self.teacher = (m.to(device) for m in pair())
        self.device = device
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9)
        self.run_student: nn.Module = torch.compile(self.student) if compiled else self.student
        self.run_teacher: nn.Module = torch.compile(self.teacher) if compiled else self.teacher

    def __call__(self, loader: DataLoader, clock: Clock) -> tuple[float, float]:
        self.student.train()
        first = time.perf_counter()
        start = warmup = 0.0
        for i, (x, y) in enumerate(loader):
            if i == WARMUP:
                start = clock()
                warmup = time.perf_counter() - first
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with torch.no_grad():
                t_logits = self.run_teacher(x)
            s_logits = self.run_student(x)
            loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kd_loss(s_logits, t_logits, 4.0)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return clock() - start, warmup


class Timer(L.Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.first = time.perf_counter()
        if batch_idx == WARMUP:
            self.start = self.clock()
            self.warmup = time.perf_counter() - self.first

    def on_train_end(self, trainer, pl_module) -> None:
        self.elapsed = self.clock() - self.start


class LightningLoop:
    """``ClassificationDistillationModule`` + ``KD``, fitted for one epoch per round."""

    def __init__(self, device: torch.device, compiled: bool) -> None:
        student, teacher = pair()
        self.device = device
        self.module = ClassificationDistillationModule(
            student,
            teacher,
            [KD(temperature=4.0, weight=0.9)],
            num_classes=10,
            task_weight=0.1,
            optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
            compile_student=compiled,
            compile_teacher=compiled,
        )

    def __call__(self, loader: DataLoader, clock: Clock) -> tuple[float, float]:
        timer = Timer(clock)
        trainer = L.Trainer(
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
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
        trainer.fit(self.module, loader)
        return timer.elapsed, timer.warmup


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--skip", nargs="*", default=[], help="loops to leave out (e.g. plain_compiled), the baseline stays"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    clock = Clock(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.steps * args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.steps * args.batch,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch, pin_memory=device.type == "cuda")
    timed = args.steps - WARMUP
    loops: dict[str, Callable[[DataLoader, Clock], tuple[float, float]]] = {
        "plain": PlainLoop(device, compiled=False),
        "plain_compiled": PlainLoop(device, compiled=True),
        "lightningkd": LightningLoop(device, compiled=False),
        "lightningkd_compiled": LightningLoop(device, compiled=True),
    }
    loops = {name: loop for name, loop in loops.items() if name == "plain" or name not in args.skip}
    times: dict[str, list[float]] = {name: [] for name in loops}
    first_warmup: dict[str, float] = {}
    for round_index in range(args.rounds):
        for name, loop in loops.items():  # interleaved: drift of the machine hits every loop alike
            elapsed, warmup = loop(loader, clock)
            times[name].append(elapsed)
            if round_index == 0:
                first_warmup[name] = warmup
    what = (
        "CPU time, 1 thread" if device.type == "cpu" else f"wall time on {torch.cuda.get_device_name(device)}"
    )
    print(
        f"tiny CNN pair, batch {args.batch}, {what}, {args.rounds} rounds x {timed} steps, torch {torch.__version__}"
    )
    for name, values in times.items():
        print(
            f"  {name:22s} median {1e3 * statistics.median(values) / timed:7.3f} ms/step"
            f"   first {WARMUP} steps of round 1 (compiling): {first_warmup[name]:6.1f} s wall"
        )

    def ratio(fast: str, slow: str) -> float:
        # throughput ratio slow/fast = time fast / time slow, per round, then the median
        return statistics.median(f / s for f, s in zip(times[fast], times[slow]))

    print("throughput ratios (> 1: the first-named loop is faster):")
    for name in loops:
        if name != "plain":
            print(f"  {name} / plain eager:{'':{22 - len(name)}s}{ratio('plain', name):.3f}")
    if {"lightningkd_compiled", "plain_compiled"} <= loops.keys():
        print(
            f"  lightningkd_compiled / plain_compiled:  {ratio('plain_compiled', 'lightningkd_compiled'):.3f}"
        )
    stats = torch._dynamo.utils.counters["stats"]
    frames = torch._dynamo.utils.counters["frames"]
    print(f"dynamo: {stats['unique_graphs']} graphs, {frames['ok']} of {frames['total']} frames compiled")


if __name__ == "__main__":
    main()
