"""Throughput of a lightningkd KD step against a hand-written PyTorch KD step, in the same process.

Both loops train the same student from the same frozen teacher on the same in-memory batches (through
the same kind of DataLoader) with
0.1 * CE + 0.9 * KD(T = 4) and SGD; the Lightning side is ``ClassificationDistillationModule`` + ``KD`` run
by ``Trainer.fit`` (logging on, progress bar and checkpointing off). Reports images/s of each and the ratio
(1.00 = no overhead). Runs on a GPU when there is one (bf16 autocast, channels_last), else on the CPU.

    python benchmarks/kd_step_overhead.py --student resnet18 --teacher resnet50 --size 224 --batch 128
    python benchmarks/kd_step_overhead.py --student shufflenet_v2_x0_5 --teacher resnet18 --size 32   # CPU
"""

from __future__ import annotations

import argparse
import functools
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightningkd.distillers import KD
from lightningkd.functional import kd_loss
from lightningkd.models import classifier
from lightningkd.modules import ClassificationDistillationModule


def plain_pytorch(student, teacher, batches, device, amp_dtype) -> float:
    loader = _loader(batches)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    student.train()
    teacher.eval()
    start = None
    for i, (x, y) in enumerate(loader):
        if i == 2:  # after warm-up steps
            _sync(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kd_loss(s_logits, t_logits, 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return (len(batches) - 2) * batches[0][0].shape[0] / (time.perf_counter() - start)


class Timer(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 2:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.elapsed = time.perf_counter() - self.start


def lightning_run(
    student, teacher, batches, device, amp_dtype, channels_last: bool, num_classes: int
) -> float:
    module = ClassificationDistillationModule(
        student,
        teacher,
        [KD(temperature=4.0, weight=0.9)],
        num_classes=num_classes,
        task_weight=0.1,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        channels_last=channels_last,
    )
    loader = _loader(batches)
    timer = Timer()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if amp_dtype is not None else "32-true",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(module, loader)
    return (len(batches) - 2) * batches[0][0].shape[0] / timer.elapsed


def _loader(batches) -> DataLoader:
    """The same in-memory data, through the same kind of DataLoader, for both loops."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y), batch_size=batches[0][0].shape[0], shuffle=False)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--classes", type=int, default=1000)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    channels_last = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch, 3, args.size, args.size, generator=g),
            torch.randint(0, args.classes, (args.batch,), generator=g),
        )
        for _ in range(args.steps)
    ]

    def models():
        torch.manual_seed(0)
        s = classifier(args.student, num_classes=args.classes).to(device)
        t = classifier(args.teacher, num_classes=args.classes).to(device).requires_grad_(False)
        if channels_last:
            s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
        return s, t

    header = f"device {device}, {args.teacher} -> {args.student}, {args.size}px, batch {args.batch}"
    compare(
        models,
        lambda s, t: plain_pytorch(s, t, batches, device, amp_dtype),
        lambda s, t: lightning_run(s, t, batches, device, amp_dtype, channels_last, args.classes),
        header,
    )


def compare(models, plain, lightning, header: str) -> float:
    """Time ``plain`` and ``lightning`` twice each, interleaved (drift shows up), on fresh ``models()``."""
    results = {}
    for name in ("plain", "lightning", "plain_again", "lightning_again"):
        s, t = models()
        results[name] = (plain if name.startswith("plain") else lightning)(s, t)
    ratio = max(results["lightning"], results["lightning_again"]) / max(
        results["plain"], results["plain_again"]
    )
    print(header)
    for k, v in results.items():
        print(f"  {k:16s} {v:9.1f} img/s")
    print(f"lightningkd / plain PyTorch throughput ratio: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
