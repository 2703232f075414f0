"""The BCCD detection evidence protocol: one teacher, then every student arm over several seeds, paired by seed.

Does a detection distiller help? Train the teacher once, then for each seed the student alone and the
student with each distiller (FGD, PKD, MGD on every FPN level): the seed fixes the student's initial
weights and the first epoch's data order in every arm (the teacher and the distillers are built on a
forked random stream), so ``arm - student`` on the same seed cancels most of the seed-to-seed spread.
MGD draws its random masks from the global stream, so its later epochs see another data order.
``experiments/summarize_protocol.py --metric val_mAP`` prints the raw means and the paired differences.

Every run goes through the library: ``datamodules.VOCDetectionDataModule``, ``lightningkd.models.detector``,
``DetectionDistillationModule``, ``PerLevel`` and the distillers, with a plain Lightning ``Trainer``.

Setting (sized for 2 CPU cores; nothing can be downloaded here, so every model starts from scratch):
    data     BCCD (VOC layout, 3 classes: RBC, WBC, Platelets; 640x480 images, about 13 cells each),
             205 training and 87 validation images, resized to 192x144 (max_size 192); training adds
             scale jitter 0.8-1.2 and horizontal flips; batch 4.
    pair     teacher and student are RetinaNet with a ResNet-18 FPN (levels 0, 1, 2, p6, p7, 256 channels).
             The teacher trains ``--teacher-epochs`` (default 20), the students ``--epochs`` (default 4):
             the stronger teacher comes from the longer schedule, as in the segmentation protocol.
    optim    AdamW lr 1e-3, weight decay 1e-4, cosine decay per step, gradient norm clipped at 10.
    arms     FGD with RetinaNet's hyper-parameters (temperature 0.5, alpha 1e-3, beta 5e-4, gamma 5e-4,
             lambda 5e-6, FGD's configs) on the five levels; PKD weight 10 on the first four levels
             (mmrazor's RetinaNet config); MGD alpha 2e-5, mask ratio 0.65 (MGD's detection config) on the
             five levels; ``zero_weight`` (FGD with weight 0: the teacher runs, nothing is added) is the
             control. MasKD: tokens learned on the teacher first (``tokens``: 10 epochs, 510 steps, Adam
             lr 0.01, cosine; 6 weighted tokens per level), then RetinaNet's MasKD config (loss weight 7,
             align conv, custom mask after 50 steps, about a quarter of the schedule); ACAM-KD: 6 masks per
             level, alpha = lambda = 1, the other choices at their defaults. No neck/head inheritance:
             teacher and student are the same architecture, so it
             would start the student as a copy of the teacher's neck and head.

Usage:
    python experiments/det_protocol.py teacher --data-dir ../shared/data/bccd
    python experiments/det_protocol.py tokens --data-dir ../shared/data/bccd   (MasKD's first stage)
    python experiments/det_protocol.py student --arm fgd --seed 0 --data-dir ../shared/data/bccd
    python experiments/det_protocol.py list
(``experiments/run_bccd_protocol.sh`` runs the whole table; ``summarize_protocol.py --metric val_mAP`` sums it up.)
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from protocol_common import done, protocol_main, record  # noqa: E402

from datamodules import VOCDetectionDataModule  # noqa: E402
from lightningkd.callbacks import DetectionPreview  # noqa: E402
from lightningkd.distillers import ACAMKD, FGD, MGD, PKD, Distiller, MasKD, PerLevel  # noqa: E402
from lightningkd.models import detector  # noqa: E402
from lightningkd.modules import DetectionDistillationModule, DetectionMaskTokens  # noqa: E402

CLASSES = ["RBC", "WBC", "Platelets"]
MODEL = "retinanet_resnet18_fpn"
LEVELS = ["0", "1", "2", "p6", "p7"]
CHANNELS = 256
BATCH = 4
STEPS_PER_EPOCH = 205 // BATCH  # the train loader drops the last incomplete batch


def _per_level(distiller: Distiller) -> list[Distiller]:
    return [PerLevel(distiller=distiller, levels=LEVELS, student_layer="backbone", teacher_layer="backbone")]


ARMS: dict[str, Callable[[], list[Distiller]]] = {
    "student": lambda: [],
    "zero_weight": lambda: _per_level(FGD(channels=CHANNELS, weight=0.0)),
    "fgd": lambda: _per_level(FGD(channels=CHANNELS)),
    "pkd": lambda: [
        PerLevel(distiller=PKD(weight=10.0), levels=LEVELS[:4])
    ],  # mmrazor: the first four levels
    "mgd": lambda: _per_level(MGD(channels=CHANNELS, alpha=2e-5, mask_ratio=0.65)),
    # ACAM-KD on the five levels, 6 masks each (the paper's detection setting), alpha = lambda = 1
    "acam_kd": lambda: _per_level(ACAMKD(channels=CHANNELS, num_masks=6)),
}
TOKENS_FILE = "maskd_tokens.pt"  # written by `det_protocol.py tokens` next to the teacher
CUSTOM_MASK_WARMUP = 50  # about one epoch of the 204 student steps (the configs: 5000-8500 of a 2x schedule)


def _maskd(tokens: str) -> list[Distiller]:
    # MasKD's RetinaNet config: 6 weighted tokens per level, align conv, custom mask, loss weight 7
    template = MasKD(
        tokens=tokens,
        channels=CHANNELS,
        align=True,
        custom_mask=True,
        custom_mask_warmup=CUSTOM_MASK_WARMUP,
        weight=7.0,
    )
    return _per_level(template)


TOKEN_ARMS: dict[str, Callable[[str], list[Distiller]]] = {"maskd": _maskd}


def datamodule(data_dir: str, workers: int) -> VOCDetectionDataModule:
    return VOCDetectionDataModule(
        data_dir,
        classes=CLASSES,
        batch_size=BATCH,
        num_workers=workers,
        max_size=192,
        scale_range=(0.8, 1.2),
    )


def build_tokens(teacher_ckpt: str, epochs: int) -> DetectionMaskTokens:
    """MasKD's mask-learning stage on the teacher: 6 weighted tokens per level, Adam lr 0.01, cosine."""
    if not os.path.exists(teacher_ckpt):
        raise SystemExit(f"token learning needs the teacher checkpoint; not found: {teacher_ckpt}")
    return DetectionMaskTokens(
        detector(MODEL, num_classes=len(CLASSES), checkpoint=teacher_ckpt),
        tokens_file=os.path.join(os.path.dirname(teacher_ckpt), TOKENS_FILE),
        levels=LEVELS,
        num_classes=len(CLASSES),
        optimizer=functools.partial(torch.optim.Adam, lr=0.01),
        lr_scheduler=functools.partial(
            torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs * STEPS_PER_EPOCH
        ),
        lr_scheduler_interval="step",
    )


def build(arm: str, teacher_ckpt: str | None, epochs: int) -> DetectionDistillationModule:
    if arm == "tokens":
        return build_tokens(teacher_ckpt, epochs)
    student = detector(MODEL, num_classes=len(CLASSES))
    with torch.random.fork_rng():  # the pairing: see the module docstring
        if arm in TOKEN_ARMS:
            distillers = TOKEN_ARMS[arm](os.path.join(os.path.dirname(teacher_ckpt), TOKENS_FILE))
        else:
            distillers = ARMS[arm]() if arm != "teacher" else []
        teacher = None
        if distillers:
            if not teacher_ckpt or not os.path.exists(teacher_ckpt):
                raise SystemExit(f"arm {arm!r} needs the teacher checkpoint; not found: {teacher_ckpt}")
            teacher = detector(MODEL, num_classes=len(CLASSES), checkpoint=teacher_ckpt)
    return DetectionDistillationModule(
        student,
        teacher,
        distillers,
        num_classes=len(CLASSES),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-4),
        lr_scheduler=functools.partial(
            torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs * STEPS_PER_EPOCH
        ),
        lr_scheduler_interval="step",
    )


def run(args: argparse.Namespace, arm: str, seed: int, epochs: int) -> dict | None:
    if arm not in ("teacher", "tokens") and done(args.out_dir, arm, seed, epochs):
        print(f"{arm} seed {seed} ({epochs} epochs) is already in results.jsonl; skipped")
        return None
    torch.set_num_threads(args.threads)
    L.seed_everything(seed, workers=True)
    teacher_ckpt = os.path.join(args.out_dir, "teacher.ckpt")
    module = build(arm, teacher_ckpt, epochs)
    name = arm if arm in ("teacher", "tokens") else f"{arm}_seed{seed}"
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=args.out_dir, filename=name, enable_version_counter=False
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=L.pytorch.loggers.CSVLogger(args.out_dir, name=name),
        callbacks=[checkpoint, DetectionPreview(num_images=3)],
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=max(1, epochs // 4) if arm == "teacher" else epochs,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        gradient_clip_val=10.0,
        limit_train_batches=args.limit_batches,
        limit_val_batches=args.limit_batches,
    )
    start = time.time()
    trainer.fit(module, datamodule=datamodule(args.data_dir, args.workers))
    metrics = trainer.callback_metrics
    result = {
        "arm": arm,
        "seed": seed,
        "epochs": epochs,
        "val_mAP": float(metrics["val/mAP"]),
        "val_mAP50": float(metrics["val/mAP50"]),
        "teacher_mAP": float(metrics.get("val/teacher_mAP", float("nan"))),
        "teacher_mAP50": float(metrics.get("val/teacher_mAP50", float("nan"))),
        "per_class_AP": {c: float(metrics[f"val/ap/{c}"]) for c in CLASSES if f"val/ap/{c}" in metrics},
        "minutes": round((time.time() - start) / 60, 2),
    }
    record(args.out_dir, result)
    if arm != "teacher" and not args.keep_checkpoints:
        os.remove(checkpoint.best_model_path)  # students are scored once
    return result


def main() -> None:
    protocol_main(
        __doc__,
        {**ARMS, **TOKEN_ARMS},
        run,
        data_dir="../shared/data/bccd",
        out_dir="runs/bccd_protocol",
        epochs=4,
        teacher_epochs=20,
    )


if __name__ == "__main__":
    main()
