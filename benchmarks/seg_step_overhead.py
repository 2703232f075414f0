"""Throughput of a lightningkd segmentation distillation step against a hand-written PyTorch step, in one process.

Both loops train the same torchvision student from the same frozen teacher on the same in-memory batches
with pixel cross-entropy on the logits resized to the labels + 3 * CWD(tau 4) on the logits (the teacher's
resized to the student's) and SGD; the Lightning side is ``SegmentationDistillationModule`` +
``ChannelWiseDivergence`` run by ``Trainer.fit``. Reports images/s of each and the ratio (1.00 = no
overhead). Runs on a GPU when there is one (bf16 autocast, channels_last), else on the CPU.

    python benchmarks/seg_step_overhead.py --student lraspp_mobilenet_v3_large --teacher deeplabv3_resnet101 --height 512 --width 1024 --batch 8
    python benchmarks/seg_step_overhead.py --height 128 --width 160 --batch 8   # CPU
"""

from __future__ import annotations

import argparse
import functools
import time

import lightning as L
import torch
import torch.nn.functional as F
from kd_step_overhead import Timer, _loader, _sync, compare

from lightningkd.distillers import ChannelWiseDivergence
from lightningkd.functional import cwd_loss
from lightningkd.models import TorchvisionSegmenter
from lightningkd.modules import SegmentationDistillationModule


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
            t_logits = F.interpolate(t_logits, size=s_logits.shape[-2:], mode="bilinear", align_corners=False)
            up = F.interpolate(s_logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(up.float(), y, ignore_index=255) + 3.0 * cwd_loss(s_logits, t_logits, 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return (len(batches) - 2) * batches[0][0].shape[0] / (time.perf_counter() - start)


def lightning_run(
    student, teacher, batches, device, amp_dtype, channels_last: bool, num_classes: int
) -> float:
    module = SegmentationDistillationModule(
        student,
        teacher,
        [ChannelWiseDivergence(temperature=4.0, weight=3.0)],
        num_classes=num_classes,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        channels_last=channels_last,
    )
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
    trainer.fit(module, _loader(batches))
    return (len(batches) - 2) * batches[0][0].shape[0] / timer.elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--student", default="lraspp_mobilenet_v3_large")
    parser.add_argument("--teacher", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--classes", type=int, default=19)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = torch.bfloat16 if device.type == "cuda" else None
    channels_last = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch, 3, args.height, args.width, generator=g),
            torch.randint(0, args.classes, (args.batch, args.height, args.width), generator=g),
        )
        for _ in range(args.steps)
    ]

    def models():
        torch.manual_seed(0)
        s = TorchvisionSegmenter(args.student, num_classes=args.classes).to(device)
        t = TorchvisionSegmenter(args.teacher, num_classes=args.classes).to(device).requires_grad_(False)
        if channels_last:
            s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
        return s, t

    header = (
        f"device {device}, {args.teacher} -> {args.student}, {args.height}x{args.width}, batch {args.batch}"
    )
    compare(
        models,
        lambda s, t: plain_pytorch(s, t, batches, device, amp_dtype),
        lambda s, t: lightning_run(s, t, batches, device, amp_dtype, channels_last, args.classes),
        header,
    )


if __name__ == "__main__":
    main()
