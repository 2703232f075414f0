"""The CamVid evidence protocol: one teacher, then every student arm over several seeds, paired by seed.

Does a segmentation distiller help? Train the teacher once, then for each seed the student alone and the
student with each distiller: same initial weights, same data order (the seed fixes both; no distiller
draws random numbers), so ``arm - student`` on the same seed cancels most of the seed-to-seed spread.
``experiments/summarize_protocol.py`` prints the raw means and the paired differences.

Every run goes through the library: ``datamodules.CamVidDataModule``, ``lightningkd.models.TorchvisionSegmenter``,
``SegmentationDistillationModule`` and the distillers, with a plain Lightning ``Trainer``.

Setting (sized for 2 CPU cores: one student run takes 1.5-3 minutes):
    pair     teacher and student are both torchvision LRASPP-MobileNetV3-Large (3.2 M parameters, logits
             at 1/8, head features ``classifier.cbr`` at 1/16 with 128 channels). The teacher is trained
             ``--teacher-epochs`` (default 60), the students ``--epochs`` (default 6), all from scratch
             (nothing can be downloaded here). A DeepLabV3-MobileNetV3 teacher at output stride 8 costs
             3.1x the LRASPP training step and 3.2x its forward on this CPU (measured at 128x160, batch 8),
             which the 2-core budget cannot carry; the stronger teacher comes from the longer schedule.
    data     CamVid (SegNet release), 367 training images: random rescale 0.3-0.6 of 360x480, 128x160 crops
             (padded with the ignore index), flip, photometric jitter; batch 8. Scored on the 101 val
             images fed at half size (eval_scale 0.5) against the full 360x480 labels.
    optim    AdamW lr 1e-3, weight decay 1e-4, cosine decay per step to 0.
    BN       BatchNorm statistics recomputed over 20 training batches before validation
             (lightningkd.callbacks.PreciseBatchNorm; torchvision's MobileNetV3 uses momentum 0.01).

MasKD's tokens are learned on the teacher first (``tokens``: 8 tokens on its logits, 10 epochs, 460 steps,
Adam lr 0.01, cosine: the detection stage's optimiser; the official segmentation stage uses SGD lr 0.1 for
10k iterations), then the ``maskd`` arm reads them (eps 1e-5, weight 0.5). ``acam_kd`` puts one mask per
class on the logits, alpha = lambda = 1.

Cross-architecture arms: ``segformer_b0`` (an mmseg SegFormer-B0 student from scratch, trained alone: the
reference of this pair) and ``segformer_b0_transkd`` (TransKD's CSF + HCL from the same LRASPP teacher on
two stride-matched stage pairs; no PEA, the CNN teacher has no patch embeddings). The README's SegFormer
rows were run with ``--epochs 3`` (138 steps), a budget choice for 2 CPU cores.

Arms are named entries of ``ARMS`` (a function of the teacher's channel count returning the distillers);
a later distiller adds its own entry and reuses everything else.

Usage:
    python experiments/seg_protocol.py teacher --data-dir ../shared/data/camvid
    python experiments/seg_protocol.py tokens --data-dir ../shared/data/camvid   (MasKD's first stage)
    python experiments/seg_protocol.py student --arm cwd --seed 0 --data-dir ../shared/data/camvid
    python experiments/seg_protocol.py list
(``experiments/run_camvid_protocol.sh`` runs the whole table.)
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
import torch.nn.functional as F  # noqa: E402
from protocol_common import done, protocol_main, record  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from datamodules import CamVidDataModule  # noqa: E402
from lightningkd.callbacks import PreciseBatchNorm, SegmentationPreview  # noqa: E402
from lightningkd.distillers import (  # noqa: E402
    ACAMKD,
    BPKD,
    DIST,
    ChannelWiseDivergence,
    CIRKDMemory,
    CIRKDMiniBatch,
    Distiller,
    MasKD,
    PairwiseSimilarityKD,
    PixelKD,
    TransKD,
)
from lightningkd.models import MMSegSegmenter, TorchvisionSegmenter  # noqa: E402
from lightningkd.modules import SegmentationDistillationModule, SegmentationMaskTokens  # noqa: E402

MODEL = "lraspp_mobilenet_v3_large"
NUM_CLASSES, IGNORE = 11, 11
HEAD = "classifier.cbr"  # LRASPP's 128-channel head features at 1/16
HEAD_CHANNELS = 128
BATCH, STEPS_PER_EPOCH = 8, 367 // 8 + 1


BPKD_PREVIOUS = {"edge_weight": 50.0, "body_weight": 20.0}
"""BPKD's defaults before the ablation (the re-implementation's weights): the ablation's reference."""


def _bpkd(**overrides) -> Callable[[], list[Distiller]]:
    """A BPKD ablation arm: the previous defaults with ``overrides``."""
    settings = {**BPKD_PREVIOUS, **overrides}
    return lambda: [BPKD(num_classes=NUM_CLASSES, ignore_index=IGNORE, **settings)]


def _cirkd() -> list[Distiller]:
    # CIRKD's train_cirkd.py: pixel KD 1.0, mini-batch 1.0, memory 0.1 x (pixel-to-pixel + pixel-to-region)
    return [
        PixelKD(temperature=1.0, ignore_index=IGNORE),
        CIRKDMiniBatch(student_layer=HEAD, teacher_layer=HEAD, temperature=0.1),
        CIRKDMemory(
            student_layer=HEAD,
            teacher_layer=HEAD,
            student_channels=HEAD_CHANNELS,
            teacher_channels=HEAD_CHANNELS,
            num_classes=NUM_CLASSES,
            ignore_index=IGNORE,
            weight=0.1,
        ),
    ]


def _acam(**overrides) -> Callable[[], list[Distiller]]:
    """ACAM-KD on the logits, one mask per class (the paper's segmentation setting), with ``overrides``."""
    settings = {"student_layer": "output", "teacher_layer": "output", "channels": NUM_CLASSES}
    return lambda: [ACAMKD(num_masks=NUM_CLASSES, **settings, **overrides)]


def _acam_uniform() -> list[Distiller]:
    """Control: ACAM-KD with its mask tokens fixed at 0, so every mask is 0.5 everywhere and the channel and
    spatial terms are each the plain mean squared error of the logits (what do the learned masks add?)."""
    (acam,) = _acam()()
    with torch.no_grad():
        acam.channel_tokens.zero_()
        acam.spatial_tokens.zero_()
    acam.channel_tokens.requires_grad_(False)
    acam.spatial_tokens.requires_grad_(False)
    return [acam]


ARMS: dict[str, Callable[[], list[Distiller]]] = {
    "student": lambda: [],
    # control: the teacher runs and a distiller is built, with weight 0 (same as the student alone?)
    "zero_weight": lambda: [PixelKD(temperature=1.0, ignore_index=IGNORE, weight=0.0)],
    "pixel_kd": lambda: [PixelKD(temperature=1.0, ignore_index=IGNORE)],
    "cwd": lambda: [ChannelWiseDivergence(temperature=4.0, weight=3.0)],
    "dist": lambda: [DIST(beta=1.0, gamma=1.0, temperature=1.0)],
    "skd": lambda: [PairwiseSimilarityKD(student_layer=HEAD, teacher_layer=HEAD, weight=0.5)],
    "cirkd": _cirkd,
    # BPKD at the distiller's defaults (edge and body weights 0.1 since the ablation), then the ablation:
    # the previous defaults (T 4, weights 50 / 20), and one uncertain choice changed at a time
    "bpkd": lambda: [BPKD(num_classes=NUM_CLASSES, ignore_index=IGNORE)],
    "bpkd_previous": _bpkd(),
    "bpkd_edge_only": _bpkd(body_weight=0.0),
    "bpkd_body_only": _bpkd(edge_weight=0.0),
    "bpkd_T1": _bpkd(temperature=1.0),
    "bpkd_width3": _bpkd(edge_width=3),
    "bpkd_nonzero": _bpkd(count_mode="nonzero_count"),
    "bpkd_postmask": _bpkd(mask_logits_before_softmax=False),
    "bpkd_light": _bpkd(edge_weight=1.0, body_weight=1.0),
    "bpkd_light_T1": _bpkd(edge_weight=1.0, body_weight=1.0, temperature=1.0),
    "bpkd_stride16": _bpkd(),  # the previous defaults; the teacher's logits average-pooled to 1/16 (below)
    # ACAM-KD at its defaults (alpha = lambda = 1), then the ablation
    "acam_kd": _acam(),
    # ACAM-KD ablation: one uncertain choice (or the scale) changed at a time
    "acam_kd_alpha0.1": _acam(alpha=0.1),
    "acam_kd_p2_sum": _acam(mask_power=2, normalize_by_mask_sum=False),
    "acam_kd_elementwise": _acam(channel_mask="elementwise"),
    "acam_kd_uniform_masks": _acam_uniform,
}
# Cross-architecture arms: a SegFormer-B0 student (mmseg MiT-B0, from scratch) with the same LRASPP teacher;
# "segformer_b0" is its student-alone reference for the paired differences.
SEGFORMER_B0 = "segformer/segformer_mit-b0_8xb1-160k_cityscapes-1024x1024"
SEGFORMER_ARMS: dict[str, Callable[[], list[Distiller]]] = {
    "segformer_b0": lambda: [],
    # TransKD's CSF + HCL on two stride-matched stage pairs (recipes/segmentation/transkd/
    # segformer_b0_from_lraspp_mobilenet_v3_large_camvid.yaml); no PEA: the CNN teacher has no patch embeddings
    "segformer_b0_transkd": lambda: [
        TransKD(
            student_stages=["backbone:1", "backbone:2"],
            teacher_stages=["backbone:low", "backbone:high"],
            student_channels=[64, 160],
            teacher_channels=[40, 960],
            student_embeddings=None,
            teacher_embeddings=None,
        )
    ],
    "segformer_b0_pixel_kd": lambda: [PixelKD(temperature=1.0, ignore_index=IGNORE)],
}
ARMS.update(SEGFORMER_ARMS)
TOKENS_FILE = "maskd_tokens.pt"  # written by `seg_protocol.py tokens` next to the teacher


def _maskd(tokens: str, weight: float = 0.5) -> list[Distiller]:
    # MasKD's segmentation setting: 8 tokens on the logits, eps 1e-5, factor 0.5 (LRASPP has no aux head)
    settings = {"student_layer": "output", "teacher_layer": "output", "channels": NUM_CLASSES, "eps": 1e-5}
    return [MasKD(tokens=tokens, weight=weight, **settings)]


TOKEN_ARMS: dict[str, Callable[[str], list[Distiller]]] = {
    "maskd": _maskd,
    # ablation: the same loss 10x lighter (is the logits' squared error too strong from scratch?)
    "maskd_light": functools.partial(_maskd, weight=0.05),
}
COARSE_TEACHER_ARMS = {"bpkd_stride16"}


class CoarseLogits(nn.Module):
    """Wrap a segmenter so that its logits come out average-pooled by 2 (stride 8 -> 16).

    For the BPKD ablation "teacher logits at stride 8 vs 16" with one teacher: the distiller resizes the
    pooled logits back to the student's grid, as it would a stride-16 teacher's.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return F.avg_pool2d(self.model(images), 2, ceil_mode=True)


def datamodule(data_dir: str, workers: int) -> CamVidDataModule:
    return CamVidDataModule(
        data_dir, crop_size=(128, 160), scale_range=(0.3, 0.6), batch_size=BATCH, num_workers=workers
    )


def build_tokens(teacher_ckpt: str, epochs: int) -> SegmentationMaskTokens:
    """MasKD's mask-learning stage on the teacher: 8 tokens on its logits, Adam lr 0.01, cosine."""
    if not os.path.exists(teacher_ckpt):
        raise SystemExit(f"token learning needs the teacher checkpoint; not found: {teacher_ckpt}")
    return SegmentationMaskTokens(
        TorchvisionSegmenter(MODEL, NUM_CLASSES, checkpoint=teacher_ckpt),
        tokens_file=os.path.join(os.path.dirname(teacher_ckpt), TOKENS_FILE),
        num_tokens=8,
        num_classes=NUM_CLASSES,
        ignore_index=IGNORE,
        eval_scale=0.5,
        optimizer=functools.partial(torch.optim.Adam, lr=0.01),
        lr_scheduler=functools.partial(
            torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs * STEPS_PER_EPOCH
        ),
        lr_scheduler_interval="step",
    )


def build(arm: str, teacher_ckpt: str | None, epochs: int) -> SegmentationDistillationModule:
    if arm == "tokens":
        return build_tokens(teacher_ckpt, epochs)
    if arm in SEGFORMER_ARMS:
        student = MMSegSegmenter(SEGFORMER_B0, num_classes=NUM_CLASSES)
    else:
        student = TorchvisionSegmenter(MODEL, NUM_CLASSES)
    # Pairing: the teacher and the distillers are built on a forked random stream, so every arm of a seed
    # starts from the same student weights *and* draws the same crops in the same order as the student
    # alone (a distiller that draws random numbers while training, CIRKD's memory, still diverges).
    with torch.random.fork_rng():
        if arm in TOKEN_ARMS:
            distillers = TOKEN_ARMS[arm](os.path.join(os.path.dirname(teacher_ckpt), TOKENS_FILE))
        else:
            distillers = ARMS[arm]() if arm != "teacher" else []
        teacher = None
        if distillers:
            if not teacher_ckpt or not os.path.exists(teacher_ckpt):
                raise SystemExit(f"arm {arm!r} needs the teacher checkpoint; not found: {teacher_ckpt}")
            teacher = TorchvisionSegmenter(MODEL, NUM_CLASSES, checkpoint=teacher_ckpt)
            if arm in COARSE_TEACHER_ARMS:
                teacher = CoarseLogits(teacher)
    return SegmentationDistillationModule(
        student,
        teacher,
        distillers,
        num_classes=NUM_CLASSES,
        ignore_index=IGNORE,
        eval_scale=0.5,
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
        # the preview (4 val images: truth, teacher, student, BPKD masks) lands in the run's log folder
        # (token learning keeps the teacher's BatchNorm statistics: no PreciseBatchNorm there)
        callbacks=[checkpoint, SegmentationPreview(num_images=4)]
        + ([] if arm == "tokens" else [PreciseBatchNorm(num_batches=20)]),
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=max(1, epochs // 4) if arm == "teacher" else epochs,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
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
        "val_mIoU": float(metrics["val/mIoU"]),
        "val_aAcc": float(metrics["val/aAcc"]),
        "teacher_mIoU": float(metrics.get("val/teacher_mIoU", float("nan"))),
        "minutes": round((time.time() - start) / 60, 2),
    }
    record(args.out_dir, result)
    if arm != "teacher" and not args.keep_checkpoints:
        os.remove(
            checkpoint.best_model_path
        )  # students are scored once; 13 MB each adds up (tokens: the file)
    return result


def main() -> None:
    protocol_main(
        __doc__,
        {**ARMS, **TOKEN_ARMS},
        run,
        data_dir="../shared/data/camvid",
        out_dir="runs/camvid_protocol",
        epochs=6,
        teacher_epochs=60,
    )


if __name__ == "__main__":
    main()
