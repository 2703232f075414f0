"""The CIFAR-10 cross-architecture protocol: a transformer teacher -> CNN student, a CNN teacher -> ViT student.

Does distillation help across architectures? For each pair, train the teacher once, then for each seed the
student alone and the student with KD, OFA and ScaleKD: same initial weights, same data order (the seed
fixes both), so ``arm - student`` on the same seed cancels most of the seed-to-seed spread.
``experiments/summarize_protocol.py`` prints the raw means and the paired differences.

Every run goes through the library: ``datamodules.CIFAR10DataModule``, ``lightningkd.models.classifier``
(timm transformers with ``small_input``), ``ClassificationDistillationModule`` and the distillers, with a
plain Lightning ``Trainer``.

Setting (sized for 2 CPU cores; the student runs are short, so absolute accuracies are low):
    vit_to_cnn  teacher timm ViT-Tiny on 32x32 (``small_input``: 4-pixel patches, 8x8 tokens + class token)
                with depth 6 instead of 12 (2.7 M parameters); student torchvision ShuffleNetV2 x0.5 with
                the CIFAR stem (``small_input``, 0.35 M parameters; stages 16x16, 8x8, 4x4).
    cnn_to_vit  teacher torchvision ShuffleNetV2 x1.0 with the CIFAR stem (1.3 M parameters); student timm
                ViT-Tiny on 32x32 with depth 4 (1.8 M parameters).
    data        CIFAR-10, pad-4 crop + flip, batch 128. Teachers: 8 epochs x 120 random batches (960
                steps); students 1 epoch x 80 random batches (80 steps, 10,240 images: a fifth of the
                training set). Top-1 on the full 10,000-image test split.
    optim       CNN students/teachers: SGD momentum 0.9, lr 0.05, weight decay 5e-4; ViTs: AdamW lr 1e-3,
                weight decay 0.05; cosine decay per step to 0.
    KD          0.1 * CE + 0.9 * KD(T 4) (mdistiller's CIFAR setting).
    OFA         CE + OFA on the final logits + OFA on three stage branches, eps 1.0, T 1 (OFAKD's CIFAR-100
                setting).
    ScaleKD     0.5 * CE + ScaleKD (its KD term alpha 0.5, T 1; feature terms at the official weights).

Usage:
    python experiments/cifar10_cross_arch.py teacher --pair vit_to_cnn
    python experiments/cifar10_cross_arch.py student --pair vit_to_cnn --arm ofa --seed 0
(``experiments/run_cifar10_cross_arch.sh`` runs the whole table.)
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
from torch import nn  # noqa: E402

from datamodules import CIFAR10DataModule  # noqa: E402
from lightningkd.distillers import KD, OFA, Distiller, ScaleKD  # noqa: E402
from lightningkd.models import classifier  # noqa: E402
from lightningkd.modules import ClassificationDistillationModule  # noqa: E402

BATCH = 128
VIT = "vit_tiny_patch16_224"
MODELS: dict[str, dict[str, tuple[str, dict]]] = {
    # pair -> role -> (name, model_kwargs); every model gets small_input=True
    "vit_to_cnn": {"teacher": (VIT, {"depth": 6}), "student": ("shufflenet_v2_x0_5", {})},
    "cnn_to_vit": {"teacher": ("shufflenet_v2_x1_0", {}), "student": (VIT, {"depth": 4})},
}


def build_model(pair: str, role: str, checkpoint: str | None = None) -> nn.Module:
    name, kwargs = MODELS[pair][role]
    return classifier(name, 10, small_input=True, model_kwargs=kwargs or None, checkpoint=checkpoint)


def is_vit(pair: str, role: str) -> bool:
    return MODELS[pair][role][0] == VIT


def _kd(pair: str) -> tuple[list[Distiller], float]:
    return [KD(temperature=4.0, weight=0.9)], 0.1


def _ofa(pair: str) -> tuple[list[Distiller], float]:
    """OFA with a branch on three student stages (OFAKD's CIFAR-100 setting: eps 1, T 1, weights 1)."""
    if pair == "vit_to_cnn":  # ShuffleNetV2 x0.5 (CIFAR stem): stages at 16x16, 8x8, 4x4
        stages = {"stage_layers": ["stage2", "stage3", "stage4"], "stage_channels": [48, 96, 192]}
        # embed_dim = max(student's last width (conv5: 1024), teacher's width (192)), as OFAKD's CNN students
        ofa = OFA(num_classes=10, **stages, stage_downsamples=[2, 1, 0], embed_dim=1024, branch="conv")
    else:  # ViT-Tiny depth 4: a branch after blocks 0, 1 and 2 (2, 1 and 1 ViT blocks), class token pooled
        stages = {"stage_layers": ["blocks.0", "blocks.1", "blocks.2"], "stage_channels": [192, 192, 192]}
        ofa = OFA(
            num_classes=10,
            **stages,
            stage_downsamples=[0, 0, 0],
            embed_dim=192,
            branch="tokens",
            prefix_tokens=1,
        )
    return [ofa], 1.0


def _scalekd(pair: str) -> tuple[list[Distiller], float]:
    """ScaleKD at the official weights (alpha [0.08, 0.06] per stage, softmax scale 5, KD alpha 0.5 with the
    CE rescaled by 0.5); the two stages and the teacher's last part as in recipes/classification/scalekd/
    (shufflenet_v2_x0_5_from_vit_tiny_cifar10.yaml and vit_tiny_from_shufflenet_v2_x1_0_cifar10.yaml)."""
    official = {"softmax_scale": [5.0, 5.0], "alpha_s3": [0.08, 0.06], "alpha_s4": [0.08, 0.06]}
    official.update(kd_alpha=0.5, temperature=1.0)
    if pair == "vit_to_cnn":  # student stages 96@8x8 and 192@4x4; teacher blocks 4-5 + norm, 8x8 tokens
        scalekd = ScaleKD(
            student_s3_layer="stage3",
            student_s4_layer="stage4",
            teacher_layer="norm",
            teacher_stages=["blocks.4", "blocks.5", "norm"],
            student_s3_channels=96,
            student_s4_channels=192,
            teacher_s3_channels=192,
            teacher_channels=192,
            student_s3_hw=[8, 8],
            student_s4_hw=[4, 4],
            teacher_s3_hw=[8, 8],
            teacher_hw=[8, 8],
            num_heads_s3=3,
            num_heads_s4=3,
            student_layout="nchw",
            teacher_layout="tokens",
            teacher_prefix_tokens=1,
            stage_layout="tokens",
            **official,
        )
    else:  # student ViT blocks.2 and its final norm (8x8 tokens); teacher stage4 (464@4x4) on stage3's grid
        scalekd = ScaleKD(
            student_s3_layer="blocks.2",
            student_s4_layer="norm",
            teacher_layer="stage4",
            teacher_stages=["stage4"],
            student_s3_channels=192,
            student_s4_channels=192,
            teacher_s3_channels=232,
            teacher_channels=464,
            student_s3_hw=[8, 8],
            student_s4_hw=[8, 8],
            teacher_s3_hw=[8, 8],
            teacher_hw=[4, 4],
            num_heads_s3=4,
            num_heads_s4=8,
            student_layout="tokens",
            student_prefix_tokens=1,
            teacher_layout="nchw",
            stage_layout="nchw",
            **official,
        )
    return [scalekd], 0.5


ARMS: dict[str, Callable[[str], tuple[list[Distiller], float]]] = {
    "student": lambda pair: ([], 1.0),
    "kd": _kd,
    "ofa": _ofa,
    "scalekd": _scalekd,
}


class StudentRun(ClassificationDistillationModule):
    """The teacher's accuracy is recorded once by its own run: the student runs do not score it again."""

    def teacher_due(self, stage: str) -> bool:
        return False


def build(pair: str, arm: str, teacher_ckpt: str, steps: int) -> ClassificationDistillationModule:
    role = "teacher" if arm == "teacher" else "student"
    vit = is_vit(pair, role)
    optimizer = (
        functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
        if vit
        else functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
    )
    schedule = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=steps)
    common = {
        "num_classes": 10,
        "optimizer": optimizer,
        "lr_scheduler": schedule,
        "lr_scheduler_interval": "step",
    }
    if arm == "teacher":
        return ClassificationDistillationModule(build_model(pair, "teacher"), **common)
    student = build_model(pair, "student")
    # Pairing: the teacher and the distillers are built on a forked random stream, so every arm of a seed
    # starts from the same student weights and draws the same batches as the student alone.
    with torch.random.fork_rng():
        distillers, task_weight = ARMS[arm](pair)
        teacher = None
        if distillers:
            if not os.path.exists(teacher_ckpt):
                raise SystemExit(f"arm {arm} needs the teacher checkpoint; not found: {teacher_ckpt}")
            teacher = build_model(pair, "teacher", teacher_ckpt)
    return StudentRun(student, teacher, distillers, task_weight=task_weight, **common)


def run(args: argparse.Namespace, arm: str, seed: int, epochs: int) -> dict | None:
    out_dir = os.path.join(args.out_dir, args.pair)
    os.makedirs(out_dir, exist_ok=True)
    if arm != "teacher" and done(out_dir, arm, seed, epochs):
        print(f"{arm} seed {seed} ({epochs} epochs) is already in results.jsonl; skipped")
        return None
    torch.set_num_threads(args.threads)
    L.seed_everything(seed, workers=True)
    teacher_ckpt = os.path.join(out_dir, "teacher.ckpt")
    batches = args.limit_batches or (args.teacher_batches if arm == "teacher" else args.train_batches)
    module = build(args.pair, arm, teacher_ckpt, epochs * batches)
    name = arm if arm == "teacher" else f"{arm}_seed{seed}"
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out_dir, filename=name, enable_version_counter=False
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=L.pytorch.loggers.CSVLogger(out_dir, name=name),
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=epochs,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        limit_train_batches=batches,
        limit_val_batches=args.limit_batches,
    )
    data = CIFAR10DataModule(args.data_dir, batch_size=BATCH, num_workers=args.workers)
    start = time.time()
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    result = {
        "arm": arm,
        "seed": seed,
        "epochs": epochs,
        "train_batches": batches,
        "val_acc1": float(metrics["val/acc1"]),
        "val_acc5": float(metrics["val/acc5"]),
        "minutes": round((time.time() - start) / 60, 2),
    }
    record(out_dir, result)
    if arm != "teacher" and not args.keep_checkpoints:
        os.remove(checkpoint.best_model_path)  # students are scored once
    return result


def _pair_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", choices=sorted(MODELS), required=True)
    parser.add_argument(
        "--train-batches", type=int, default=80, help="student: random batches of 128 per epoch"
    )
    parser.add_argument("--teacher-batches", type=int, default=120, help="teacher: random batches per epoch")


def main() -> None:
    protocol_main(
        __doc__,
        ARMS,
        run,
        data_dir="/tmp/lightningkd-cifar10",
        out_dir="runs/cifar10_cross_arch",
        epochs=1,
        teacher_epochs=8,
        extra_arguments=_pair_arguments,
    )


if __name__ == "__main__":
    main()
