"""Does distillation help? Teacher, student alone, KD and DKD on CIFAR-10, sized for a 2-core CPU.

Every run goes through the library: ``datamodules.CIFAR10DataModule``, ``lightningkd.models.classifier``,
``ClassificationDistillationModule`` and the KD / DKD distillers, with a plain Lightning ``Trainer``.

Setting (chosen so that the 10 runs fit in well under an hour on 2 CPU cores; see README "Results"):
    teacher  torchvision ResNet-18 (standard ImageNet stem, 11.2 M parameters)
    student  torchvision ShuffleNetV2 x0.5 (0.35 M parameters)
    data     CIFAR-10 JPEG copy, 32x32, pad-4 crop + flip; each epoch draws ``--train-batches`` random
             batches of 128 from the 50,000 training images; top-1 on the full 10,000-image test split
    optim    SGD momentum 0.9, lr 0.05 (nesterov off), weight decay 5e-4, cosine schedule to 0
    KD       0.1 * CE + 0.9 * KD(T = 4)                       (mdistiller CIFAR setting)
    DKD      1.0 * CE + DKD(alpha 1, beta 8, T 4), linear warm-up over the first 1/12 of the steps
             (mdistiller: 20 of 240 epochs); ``--dkd-beta 2`` gives mdistiller's beta for its smallest
             CIFAR pair (res56 -> res20), reported as a second DKD row

Teacher-output caching (``--replays K``: each training image has K fixed augmentations; ``--run cache``
writes the teacher's logits for all of them, ``--cache FOLDER`` makes a KD run read them instead of
running the teacher; ``experiments/run_cifar10_cache.sh`` compares cached and uncached KD).

Usage:
    python experiments/cifar10_kd.py --data-dir /tmp/cifar10 --run teacher --seed 0
    python experiments/cifar10_kd.py --data-dir /tmp/cifar10 --run kd --seed 1 --teacher runs/evidence/teacher.ckpt
    python experiments/cifar10_kd.py --data-dir /tmp/cifar10 --run cache --replays 4 --cache runs/cache/c \
        --teacher runs/evidence/teacher.ckpt
(``experiments/run_cifar10_kd.sh`` runs the whole table and writes ``runs/evidence/results.jsonl``.)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules import CIFAR10DataModule  # noqa: E402
from lightningkd.callbacks import KDWeightWarmup, PreciseBatchNorm  # noqa: E402
from lightningkd.distillers import DKD, KD  # noqa: E402
from lightningkd.models import classifier  # noqa: E402
from lightningkd.modules import ClassificationDistillationModule  # noqa: E402
from lightningkd.teacher_cache import write_teacher_cache  # noqa: E402

TEACHER, STUDENT = "resnet18", "shufflenet_v2_x0_5"


class GradNormLog(L.Callback):
    """Log the student's total gradient norm (before clipping) at the logging interval."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        if pl_module.log_due():
            norms = [p.grad.detach().norm() for p in pl_module.student.parameters() if p.grad is not None]
            pl_module.log("train/grad_norm", torch.stack(norms).norm(), on_step=True, on_epoch=False)


def build(
    run: str,
    teacher_ckpt: str | None,
    epochs: int,
    steps: int,
    dkd_beta: float = 8.0,
    warmup_fraction: float = 20 / 240,
    cache: str | None = None,
) -> tuple[ClassificationDistillationModule, list]:
    student = classifier(TEACHER if run == "teacher" else STUDENT, num_classes=10)
    teacher, distillers, task_weight, callbacks = None, [], 1.0, []
    if run in ("kd", "dkd", "cache"):
        if not teacher_ckpt:
            raise SystemExit(f"--run {run} needs --teacher (a checkpoint of the teacher run)")
        teacher = classifier(TEACHER, num_classes=10, checkpoint=teacher_ckpt)
    if run in ("kd", "cache"):
        distillers, task_weight = [KD(temperature=4.0, weight=0.9)], 0.1
    elif run == "dkd":
        distillers = [DKD(alpha=1.0, beta=dkd_beta, temperature=4.0)]
        # mdistiller ramps DKD over 20 of 240 epochs; by default the same fraction of this run, in steps
        callbacks.append(KDWeightWarmup(steps=max(1, round(steps * warmup_fraction))))
    module = ClassificationDistillationModule(
        student,
        teacher,
        distillers,
        num_classes=10,
        task_weight=task_weight,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs),
        teacher_cache=cache if run != "cache" else None,
    )
    return module, callbacks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", required=True, help="folder holding the extracted cifar10.tar.gz")
    parser.add_argument("--run", choices=["teacher", "student", "kd", "dkd", "cache"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-batches", type=int, default=100, help="random batches of 128 per epoch")
    parser.add_argument("--teacher", help="teacher checkpoint for kd / dkd")
    parser.add_argument(
        "--dkd-beta",
        type=float,
        default=8.0,
        help="DKD beta (mdistiller: 8 for res32x4->res8x4, 2 for res56->res20)",
    )
    parser.add_argument(
        "--warmup-fraction", type=float, default=20 / 240, help="DKD warm-up, fraction of all steps"
    )
    parser.add_argument("--clip", type=float, default=None, help="gradient norm clipping (Trainer)")
    parser.add_argument(
        "--precise-bn",
        type=int,
        default=0,
        help="recompute BatchNorm statistics over N batches before validation",
    )
    parser.add_argument("--log-every", type=int, default=50, help="log the loss terms every N steps")
    parser.add_argument("--label", help="name of the run in results.jsonl (default: from --run)")
    parser.add_argument("--out-dir", default="runs/evidence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--replays", type=int, help="fixed augmentations per training image (for caching)")
    parser.add_argument("--cache", help="teacher cache folder: --run cache writes it, kd reads it")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)
    module, callbacks = build(
        args.run,
        args.teacher,
        args.epochs,
        args.epochs * args.train_batches,
        args.dkd_beta,
        args.warmup_fraction,
        args.cache,
    )
    data = CIFAR10DataModule(args.data_dir, batch_size=128, num_workers=2, replays=args.replays)
    if args.run == "cache":
        start = time.time()
        write_teacher_cache(module, data, args.cache, dtype="float32")
        print(
            json.dumps(
                {"run": "cache", "replays": args.replays, "minutes": round((time.time() - start) / 60, 2)}
            )
        )
        return
    label = args.run if args.run != "dkd" or args.dkd_beta == 8.0 else f"dkd_beta{args.dkd_beta:g}"
    label = args.label or label
    name = f"{label}_seed{args.seed}"
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=args.out_dir, filename=name, enable_version_counter=False
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        limit_train_batches=args.train_batches,
        logger=L.pytorch.loggers.CSVLogger(args.out_dir, name=name),
        callbacks=[checkpoint, GradNormLog(), *callbacks]
        + ([PreciseBatchNorm(num_batches=args.precise_bn)] if args.precise_bn else []),
        enable_progress_bar=False,
        gradient_clip_val=args.clip,
        log_every_n_steps=args.log_every,
        deterministic=False,
    )
    start = time.time()
    trainer.fit(module, datamodule=data)
    result = {
        "run": label,
        "seed": args.seed,
        "epochs": args.epochs,
        "train_batches": args.train_batches,
        "val_acc1": float(trainer.callback_metrics["val/acc1"]),
        "val_acc5": float(trainer.callback_metrics["val/acc5"]),
        "teacher_acc1": float(trainer.callback_metrics.get("val/teacher_acc1", float("nan"))),
        "minutes": round((time.time() - start) / 60, 2),
        "replays": args.replays,
        "cached": bool(args.cache),
        "checkpoint": checkpoint.last_model_path or checkpoint.best_model_path,
    }
    print(json.dumps(result))
    with open(os.path.join(args.out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
