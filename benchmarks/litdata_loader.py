"""Loader throughput: ImageNetDataModule from image folders vs from LitData streams, on the same images.

Takes a subset of the CIFAR-10 training JPEGs in ``../shared/data/cifar10.tar.gz`` (the first
``--per-class`` files of each class, as a tree of symbolic links; the extracted copy in
``/tmp/lightningkd-cifar10`` is used when present), converts it once with
``python -m datamodules.classification.streaming convert`` logic (timed and reported), then reads the
training split through both paths of :class:`~datamodules.ImageNetDataModule` with the same
albumentations training pipeline (random resized crop to 32 px, flip, normalise), the same batch size and
the same number of DataLoader workers. Both loaders are built once (persistent workers), warmed up for one
epoch, then timed epoch by epoch in interleaved rounds (the machine is shared and noisy; drift hits both
alike). Time is wall-clock per epoch (the work happens in the worker processes); images/s counts the
images actually delivered (the folder loader drops the last incomplete batch, the stream fewer than one
batch). The median of the per-round ratios is reported.

    python benchmarks/litdata_loader.py --per-class 1000 --workers 2 --batch 64 --rounds 5
    python benchmarks/litdata_loader.py --per-class 1000 --workers 0 --batch 64 --rounds 7   # CPU time

Small 32x32 JPEGs from the page cache are the worst case for a streaming format (decoding dominates,
file opens are cheap); on ImageNet-sized files on network or object storage the gap is the opposite way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules import ImageNetDataModule  # noqa: E402
from datamodules.classification.streaming import convert_splits  # noqa: E402

SHARED = ROOT / ".." / "shared" / "data"
EXTRACTED = Path(tempfile.gettempdir()) / "lightningkd-cifar10" / "cifar10"


def cifar10_root(scratch: Path) -> Path | None:
    """The extracted CIFAR-10 ImageFolder tree, extracting the shared archive into ``scratch`` if needed."""
    if (EXTRACTED / "train").is_dir():
        return EXTRACTED
    archive = SHARED / "cifar10.tar.gz"
    if not archive.is_file():
        return None
    with tarfile.open(archive) as tar:
        tar.extractall(scratch, filter="data")
    return scratch / "cifar10"


def subset_tree(source: Path, dest: Path, per_class: int, val_per_class: int = 10) -> int:
    """``dest/{train,val}/<class>/`` with symbolic links to the first files of each class."""
    total = 0
    for split, src_split, n in (("train", "train", per_class), ("val", "test", val_per_class)):
        for class_dir in sorted(p for p in (source / src_split).iterdir() if p.is_dir()):
            (dest / split / class_dir.name).mkdir(parents=True)
            for f in sorted(class_dir.iterdir())[:n]:
                (dest / split / class_dir.name / f.name).symlink_to(f)
                total += split == "train"
    return total


def epoch(loader, clock) -> tuple[float, int]:
    start, images = clock(), 0
    for batch_images, _ in loader:
        images += len(batch_images)
    return clock() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-class", type=int, default=1000, help="training images per class (10 classes)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="ImageNet-1k has 1000 classes")  # 10 classes here, on purpose
    with tempfile.TemporaryDirectory(prefix="litdata-bench-") as tmp:
        scratch = Path(tmp)
        source = cifar10_root(scratch)
        if source is None:
            print(f"skipped: no CIFAR-10 data ({SHARED / 'cifar10.tar.gz'} is absent)")
            return
        n = subset_tree(source, scratch / "tree", args.per_class)
        start = time.perf_counter()
        convert_splits(scratch / "tree", scratch / "stream", num_workers=max(1, args.workers))
        convert_s = time.perf_counter() - start
        common = {"image_size": 32, "resize": 36, "batch_size": args.batch, "num_workers": args.workers}
        # with workers the work is in other processes: wall time; without, this process's CPU time (less
        # sensitive to other jobs on a shared machine), with one intra-op thread
        clock = time.perf_counter if args.workers else time.process_time
        torch.set_num_threads(1)
        loaders = {
            "folder": ImageNetDataModule(scratch / "tree", **common).train_dataloader(),
            "stream": ImageNetDataModule(stream_dir=str(scratch / "stream"), **common).train_dataloader(),
        }
        for loader in loaders.values():
            epoch(loader, clock)  # warm-up: workers start, page cache fills
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.rounds):
            for name, loader in loaders.items():  # interleaved
                seconds, images = epoch(loader, clock)
                rates[name].append(images / seconds)
        print(
            f"CIFAR-10 train subset: {n} JPEGs (first {args.per_class} per class), 32x32 -> RandomResizedCrop 32, "
            f"batch {args.batch}, {args.workers} workers ({'wall' if args.workers else 'CPU'} time), {args.rounds} rounds; "
            f"conversion took {convert_s:.1f} s"
        )
        for name, values in rates.items():
            print(
                f"  {name:7s} median {statistics.median(values):8.0f} images/s  (rounds: {', '.join(f'{v:.0f}' for v in values)})"
            )
        ratio = statistics.median(s / f for s, f in zip(rates["stream"], rates["folder"]))
        print(f"stream / folder throughput: {ratio:.3f}")
        del loaders  # stop the persistent workers before the folder is removed


if __name__ == "__main__":
    main()
