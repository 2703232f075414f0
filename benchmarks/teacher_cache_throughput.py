"""Training throughput with a teacher-output cache, against the student alone and uncached KD.

Three arms run the same training steps (``ClassificationDistillationModule.training_step``, backward,
SGD step) on the same in-memory keyed batches, in interleaved rounds so that a shared, noisy machine
slows them alike:

- ``student``: the student alone (no teacher, no distiller): the ceiling;
- ``kd``: KD with the teacher run at every step;
- ``kd_cached``: KD reading the teacher's logits from a cache written beforehand.

The printed ratios are throughputs (images/s) relative to ``student``. The goal of the cache is a
``kd_cached / student`` ratio of at least 0.9. Data loading is left out (the batches are prepared once),
so the ratios measure the step, which is what the cache changes.

    python benchmarks/teacher_cache_throughput.py                     # the CIFAR-10 protocol pair
    python benchmarks/teacher_cache_throughput.py --rounds 3 --steps 5 --images 256 --batch 32  # quick
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from datamodules import ArrayDataset, cifar_train_transform  # noqa: E402
from datamodules.replay import ReplayedAugmentation, collate_keyed  # noqa: E402
from lightningkd.distillers import KD  # noqa: E402
from lightningkd.models import classifier  # noqa: E402
from lightningkd.modules import ClassificationDistillationModule  # noqa: E402
from lightningkd.teacher_cache import TeacherCache, write_teacher_cache  # noqa: E402


class _KeyedData:
    """The minimal datamodule ``write_teacher_cache`` needs: a replayed train set and loader sizes."""

    def __init__(self, train_set: ReplayedAugmentation, batch_size: int) -> None:
        self.train_set, self.batch_size, self.num_workers, self.replays = (
            train_set,
            batch_size,
            0,
            train_set.replays,
        )

    def cache_fingerprint(self) -> dict:
        return self.train_set.fingerprint()


def build(args: argparse.Namespace, folder: str) -> tuple[dict, list[dict]]:
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(args.images) % 10
    data = ReplayedAugmentation(ArrayDataset(images, labels, cifar_train_transform()), replays=args.replays)
    teacher = classifier(args.teacher, num_classes=10)
    student = classifier(args.student, num_classes=10)
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def module(with_teacher: bool) -> ClassificationDistillationModule:
        return ClassificationDistillationModule(
            copy.deepcopy(student),
            copy.deepcopy(teacher) if with_teacher else None,
            [KD(temperature=4.0, weight=0.9)] if with_teacher else [],
            num_classes=10,
            task_weight=0.1 if with_teacher else 1.0,
            optimizer=sgd,
        )

    arms = {"student": module(False), "kd": module(True), "kd_cached": module(True)}
    write_teacher_cache(arms["kd"], _KeyedData(data, args.batch), folder, log=lambda line: None)
    arms["kd_cached"].teacher_cache = TeacherCache(folder)  # what setup() does after its checks
    torch.manual_seed(1)
    batches = [
        collate_keyed([data[i] for i in range(b * args.batch, (b + 1) * args.batch)]) for b in range(4)
    ]
    return arms, batches


def run_steps(module: ClassificationDistillationModule, optimizer, batches: list[dict], steps: int) -> float:
    start = time.perf_counter()
    for step in range(steps):
        loss = module.training_step(dict(batches[step % len(batches)]), step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="shufflenet_v2_x0_5")
    parser.add_argument("--images", type=int, default=1024, help="training images (x replays are cached)")
    parser.add_argument("--replays", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per arm per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.images < 4 * args.batch:
        parser.error("--images must hold at least 4 batches")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        arms, batches = build(args, os.path.join(tmp, "cache"))
        optimizers = {name: m.configure_optimizers() for name, m in arms.items()}
        for name, m in arms.items():  # warm-up: allocator, kernels, cache pages
            m.train()
            run_steps(m, optimizers[name], batches, 2)
        times: dict[str, list[float]] = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, m in arms.items():
                times[name].append(run_steps(m, optimizers[name], batches, args.steps) / args.steps)
    per_step = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.teacher} -> {args.student}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps, "
        f"{torch.get_num_threads()} threads"
    )
    for name, t in per_step.items():
        ratio = per_step["student"] / t
        print(
            f"  {name:10s} {t * 1000:8.1f} ms/step  {args.batch / t:8.0f} img/s  throughput vs student {ratio:.3f}"
        )


if __name__ == "__main__":
    main()
