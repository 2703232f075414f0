"""Does segmentation distillation help? Teacher, student alone, CWD and BPKD on CamVid, sized for 2 CPU cores.

Every run goes through the library: ``datamodules.CamVidDataModule``, ``lightningkd.models.TorchvisionSegmenter``,
``SegmentationDistillationModule`` and the CWD / BPKD distillers, with a plain Lightning ``Trainer``.

Setting (chosen so that the 10 runs fit in about an hour and a half on 2 CPU cores; see README "Results"):
    teacher  torchvision DeepLabV3-MobileNetV3-Large with its auxiliary FCN head (11.0 M parameters,
             logits at 1/16), trained from scratch (no pretrained weights can be downloaded here)
    student  torchvision LRASPP-MobileNetV3-Large (3.2 M parameters, logits at 1/8), from scratch
    data     CamVid (SegNet release) 367 training images; random rescale 0.375-0.75 of 360x480, pad with
             the ignore index, 176x240 crops, flip, photometric jitter; batch 8. Scored on the 101 val
             images fed at half size (eval_scale 0.5) and compared with the full 360x480 labels.
    optim    AdamW lr 1e-3, weight decay 1e-4, cosine decay per step to 0; teacher 30 epochs, students 8
    BN       students: BatchNorm statistics recomputed over 20 training batches before validation
             (lightningkd.callbacks.PreciseBatchNorm): torchvision's MobileNetV3 uses BatchNorm momentum
             0.01, and after a short from-scratch run its running statistics lag so far behind the weights
             that eval-mode mIoU collapsed (12 % with, 46 % without the stale statistics, on 32 val images)
    CWD      CE + 3 * CWD(tau 4) on the logits (Shu et al. 2021, TorchDistiller exp_cwd.sh: tau 4, weight 3);
             the teacher's 1/16 logits are resized to the student's 1/8 grid
    BPKD     CE + BPKD(T 2, edge weight 4, body weight 2, alpha 2, edge width 7): the lighter setting of the
             third-party re-implementation's tuned config (the formulation is unverified, see
             lightningkd.distillers.BPKD). ``--run bpkd_default`` uses the distiller's defaults (T 4, 50 / 20),
             whose edge term starts about 100x larger than the cross-entropy here

Usage:
    python experiments/camvid_seg_kd.py --data-dir ../shared/data/camvid --run teacher --seed 0
    python experiments/camvid_seg_kd.py --data-dir ../shared/data/camvid --run cwd --seed 1 --teacher runs/camvid/teacher_seed0.ckpt
(``experiments/run_camvid_seg_kd.sh`` runs the whole table and writes ``runs/camvid/results.jsonl``.)
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

from datamodules import CamVidDataModule  # noqa: E402
from lightningkd.callbacks import PreciseBatchNorm  # noqa: E402
from lightningkd.models import TorchvisionSegmenter  # noqa: E402
from lightningkd.modules import SegmentationDistillationModule  # noqa: E402

TEACHER, STUDENT = "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"
NUM_CLASSES, IGNORE = 11, 11


def build(run: str, teacher_ckpt: str | None, total_steps: int) -> SegmentationDistillationModule:
    if run == "teacher":
        student = TorchvisionSegmenter(TEACHER, NUM_CLASSES, aux_head=True)
    else:
        student = TorchvisionSegmenter(STUDENT, NUM_CLASSES)
    teacher, distillers = None, []
    if run in ("cwd", "bpkd", "bpkd_default"):
        if not teacher_ckpt:
            raise SystemExit(f"--run {run} needs --teacher (a checkpoint of the teacher run)")
        teacher = TorchvisionSegmenter(TEACHER, NUM_CLASSES, aux_head=True, checkpoint=teacher_ckpt)
    if run == "cwd":
        from lightningkd.distillers import ChannelWiseDivergence

        distillers = [ChannelWiseDivergence(temperature=4.0, weight=3.0)]
    elif run == "bpkd":
        from lightningkd.distillers import BPKD

        distillers = [
            BPKD(
                num_classes=NUM_CLASSES,
                ignore_index=IGNORE,
                temperature=2.0,
                edge_weight=4.0,
                body_weight=2.0,
                alpha_edge=2.0,
            )
        ]
    elif run == "bpkd_default":
        from lightningkd.distillers import BPKD

        distillers = [BPKD(num_classes=NUM_CLASSES, ignore_index=IGNORE)]
    return SegmentationDistillationModule(
        student,
        teacher,
        distillers,
        num_classes=NUM_CLASSES,
        ignore_index=IGNORE,
        aux_layer="aux_classifier" if run == "teacher" else None,
        eval_scale=0.5,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-4),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=total_steps),
        lr_scheduler_interval="step",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", required=True, help="the CamVid folder (SegNet layout)")
    parser.add_argument("--run", choices=["teacher", "student", "cwd", "bpkd", "bpkd_default"], required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--teacher", help="teacher checkpoint for cwd / bpkd")
    parser.add_argument("--out-dir", default="runs/camvid")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, workers=True)
    data = CamVidDataModule(
        args.data_dir, crop_size=(176, 240), scale_range=(0.375, 0.75), batch_size=8, num_workers=1
    )
    steps = args.epochs * (367 // 8 + 1)
    module = build(args.run, args.teacher, steps)
    name = f"{args.run}_seed{args.seed}"
    callbacks = [] if args.run == "teacher" else [PreciseBatchNorm(num_batches=20)]
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=args.out_dir, filename=name, enable_version_counter=False
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=L.pytorch.loggers.CSVLogger(args.out_dir, name=name),
        callbacks=[checkpoint, *callbacks],
        enable_progress_bar=False,
        check_val_every_n_epoch=max(1, args.epochs // 3) if args.run == "teacher" else args.epochs,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    start = time.time()
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    result = {
        "run": args.run,
        "seed": args.seed,
        "epochs": args.epochs,
        "val_mIoU": float(metrics["val/mIoU"]),
        "val_aAcc": float(metrics["val/aAcc"]),
        "teacher_mIoU": float(metrics.get("val/teacher_mIoU", float("nan"))),
        "minutes": round((time.time() - start) / 60, 2),
        "checkpoint": checkpoint.last_model_path or checkpoint.best_model_path,
    }
    print(json.dumps(result))
    with open(os.path.join(args.out_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
