"""The prepared GPU check: step ratios, memory ratios and two recipe runs, written to one results file.

Run it whenever a GPU machine is available (``bash benchmarks/gpu_check.sh``, under 8 minutes on one GPU):

- **classification step ratios** at 224 px, bf16, channels_last: ResNet-50 -> ResNet-18 with KD, and the
  tiny pair of ``step_overhead_tiny.py``. Arms on the same batches, interleaved: the hand-written loop
  (eager and compiled), the student alone (hand-written), and lightningkd's ``Trainer.fit`` eager,
  compiled (``compile_student``/``compile_teacher``) and with a teacher-output cache. Ratios are
  throughputs (images/s) against the hand-written eager loop, and for the cache against the student alone;
  peak memory (GPU peak allocated above the models) of lightningkd against the hand-written loop.
- **segmentation step ratios**: DeepLabV3-R101 -> LRASPP-MobileNetV3 at 512 x 1024 with CWD, eager and
  compiled.
- **strategies**: ``strategies_gpu.py`` on one GPU (DDP, FSDP with the teacher replicated and sharded,
  DeepSpeed ZeRO-2 where it imports): the frozen teacher unchanged, the same exported student.
- **recipes**: 200 steps of the CIFAR-100 DKD recipe and of the Cityscapes CWD recipe (PSPNet-R101 ->
  R18, 512 x 1024) on synthetic data of the recipe's full size: the loss must stay finite and decrease.

Every section that cannot finish within the time budget is recorded as skipped with the reason. With
``--reduced`` the same code runs on the CPU at toy sizes (the tests run it); compiled arms then run for
the tiny pair only (inductor needs minutes per model on two cores) and memory is not measured (see
``step_memory.py``, which measures CPU peak resident size in separate processes).

    python benchmarks/gpu_check.py --output results.json
    python benchmarks/gpu_check.py --reduced --output results.json     # CPU, about 2 minutes
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_overhead_tiny, beside this file

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.cli import SaveConfigCallback  # noqa: E402
from step_overhead_tiny import tiny_cnn  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from datamodules.datasets import TensorPairDataset  # noqa: E402
from datamodules.replay import ReplayedAugmentation, collate_keyed  # noqa: E402
from lightningkd.cli import lightning_cli  # noqa: E402
from lightningkd.distillers import KD, ChannelWiseDivergence  # noqa: E402
from lightningkd.functional import cwd_loss, kd_loss  # noqa: E402
from lightningkd.models import TorchvisionSegmenter, classifier  # noqa: E402
from lightningkd.modules import ClassificationDistillationModule, SegmentationDistillationModule  # noqa: E402
from lightningkd.teacher_cache import write_teacher_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2  # steps before the clock starts (compiled arms compile during these)

FULL = {
    "classification": [
        {"name": "resnet50->resnet18", "teacher": "resnet50", "student": "resnet18", "size": 224, "batch": 128,
         "classes": 1000, "compile": True},
        {"name": "tiny", "teacher": "tiny16", "student": "tiny8", "size": 32, "batch": 16, "classes": 10,
         "compile": True},
    ],
    "segmentation": {"teacher": "deeplabv3_resnet101", "student": "lraspp_mobilenet_v3_large", "shape": (512, 1024),
                     "batch": 8, "classes": 19, "compile": True},
    "steps": 20,
    "rounds": 2,
    "recipe_steps": 200,
    "recipe_shape": {"cifar": 32, "cityscapes": (512, 1024)},
    "recipe_batch": {"cifar": 64, "cityscapes": 8},
    "budget_s": 450,
}  # fmt: skip
REDUCED = {
    "classification": [
        {"name": "resnet18->shufflenet_v2_x0_5", "teacher": "resnet18", "student": "shufflenet_v2_x0_5",
         "size": 32, "batch": 8, "classes": 10, "compile": False},
        {"name": "tiny", "teacher": "tiny16", "student": "tiny8", "size": 32, "batch": 16, "classes": 10,
         "compile": True},
    ],
    "segmentation": {"teacher": "lraspp_mobilenet_v3_large", "student": "lraspp_mobilenet_v3_large", "shape": (64, 128),
                     "batch": 2, "classes": 19, "compile": False},
    "steps": 6,
    "rounds": 1,
    "recipe_steps": 16,
    "recipe_shape": {"cifar": 32, "cityscapes": (64, 128)},
    "recipe_batch": {"cifar": 4, "cityscapes": 2},
    "budget_s": 1200,
}  # fmt: skip
DKD_RECIPE = ROOT / "recipes/classification/dkd/resnet18_from_resnet50_cifar100.yaml"
CWD_RECIPE = ROOT / "recipes/segmentation/cwd/pspnet_r18_from_pspnet_r101_cityscapes.yaml"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall time from step ``WARMUP`` to the end (device synchronised), and GPU peak memory of a run."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.elapsed = 0.0
        self.base = self.peak = 0

    def begin(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()

    def step(self, index: int) -> None:
        if index == WARMUP:
            sync(self.device)
            self.start = time.perf_counter()

    def end(self) -> None:
        sync(self.device)
        self.elapsed = time.perf_counter() - self.start
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated() - self.base


class ClockCallback(L.Callback):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.begin()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.step(batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        self.clock.end()


class KeyedData(L.LightningDataModule):
    """In-memory keyed batches for a cached run, with the fingerprint a teacher cache is checked against."""

    def __init__(self, data: ReplayedAugmentation, batch: int) -> None:
        super().__init__()
        self.train_set, self.batch_size, self.num_workers, self.replays = data, batch, 0, 1

    def cache_fingerprint(self) -> dict:
        return self.train_set.fingerprint()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, collate_fn=collate_keyed)


def build_classifier(name: str, classes: int) -> nn.Module:
    """The same weights at every call (the arms train equal copies; the cache fits the teacher)."""
    torch.manual_seed(0)
    if name.startswith("tiny"):
        return tiny_cnn(int(name[4:]), classes)
    return classifier(name, num_classes=classes)


def trainer(
    device: torch.device, bf16: bool, callbacks: list[L.Callback], steps: int | None = None
) -> L.Trainer:
    return L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if bf16 else "32-true",
        max_epochs=1,
        max_steps=-1 if steps is None else steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=50,
        callbacks=callbacks,
    )


# ---- classification --------------------------------------------------------------------------------
def hand_loop(student, teacher, loader, device, bf16, channels_last, compiled, clock) -> None:
    """The hand-written KD step (teacher None: the student alone with cross-entropy)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student = student.to(device, memory_format=fmt).train()
    if teacher is not None:
        teacher = teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
    run_student, run_teacher = (
        (torch.compile(student), teacher and torch.compile(teacher)) if compiled else (student, teacher)
    )
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    clock.begin()
    for i, batch in enumerate(loader):
        clock.step(i)
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = batch["target"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            s = run_student(x)
            if teacher is None:
                loss = F.cross_entropy(s.float(), y)
            else:
                with torch.no_grad():
                    t = run_teacher(x)
                loss = 0.1 * F.cross_entropy(s.float(), y) + 0.9 * kd_loss(s, t, 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    clock.end()


def lightningkd_cls(
    student, teacher, data, device, bf16, channels_last, compiled, cache, clock, classes
) -> None:
    module = ClassificationDistillationModule(
        student,
        teacher,
        [KD(temperature=4.0, weight=0.9)],
        num_classes=classes,
        task_weight=0.1,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        channels_last=channels_last,
        compile_student=compiled,
        compile_teacher=compiled,
        teacher_cache=cache,
    )
    trainer(device, bf16, [ClockCallback(clock)]).fit(module, datamodule=data)


def classification(pair: dict, cfg: dict, device: torch.device, bf16: bool, folder: Path) -> dict:
    steps, batch, size, classes = cfg["steps"], pair["batch"], pair["size"], pair["classes"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(steps * batch, 3, size, size, generator=g)
    labels = torch.randint(0, classes, (steps * batch,), generator=g)
    data = KeyedData(ReplayedAugmentation(TensorPairDataset(images, labels), replays=1), batch)
    channels_last = device.type == "cuda"
    teacher_model = build_classifier(pair["teacher"], classes)
    student_model = build_classifier(pair["student"], classes)
    cache = folder / f"cache_{pair['name'].replace('>', '')}"
    writer = ClassificationDistillationModule(student_model, teacher_model, [KD()], num_classes=classes)
    writer.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    write_teacher_cache(writer, data, cache, device=device, log=lambda line: None,
                        precision=torch.bfloat16 if bf16 else None)  # fmt: skip
    teacher_model.cpu()

    def copies() -> tuple[nn.Module, nn.Module]:
        return build_classifier(pair["student"], classes), build_classifier(pair["teacher"], classes)

    loader = data.train_dataloader
    arms: dict[str, Callable[[Clock], None]] = {
        "hand": lambda c: hand_loop(*copies(), loader(), device, bf16, channels_last, False, c),
        "student_alone": lambda c: hand_loop(copies()[0], None, loader(), device, bf16, channels_last, False, c),
        "lightningkd": lambda c: lightningkd_cls(*copies(), data, device, bf16, channels_last, False, None, c, classes),
        "lightningkd_cached": lambda c: lightningkd_cls(
            *copies(), data, device, bf16, channels_last, False, str(cache), c, classes
        ),
    }  # fmt: skip
    if pair["compile"]:
        arms["hand_compiled"] = lambda c: hand_loop(*copies(), loader(), device, bf16, channels_last, True, c)
        arms["lightningkd_compiled"] = lambda c: lightningkd_cls(
            *copies(), data, device, bf16, channels_last, True, None, c, classes
        )
    result = measure(arms, cfg["rounds"], device, (steps - WARMUP) * batch)
    result["ratios"] = ratios(result, {
        "lightningkd / hand": ("lightningkd", "hand"),
        "lightningkd_compiled / hand": ("lightningkd_compiled", "hand"),
        "lightningkd_compiled / hand_compiled": ("lightningkd_compiled", "hand_compiled"),
        "lightningkd_cached / student_alone": ("lightningkd_cached", "student_alone"),
        "lightningkd_cached / lightningkd": ("lightningkd_cached", "lightningkd"),
    })  # fmt: skip
    return result


# ---- segmentation ------------------------------------------------------------------------------------
class SegBatches(Dataset):
    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "target": self.masks[index]}


def hand_seg(student, teacher, loader, device, bf16, channels_last, compiled, clock) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student = student.to(device, memory_format=fmt).train()
    teacher = teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
    run_student, run_teacher = (
        (torch.compile(student), torch.compile(teacher)) if compiled else (student, teacher)
    )
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    clock.begin()
    for i, batch in enumerate(loader):
        clock.step(i)
        x = batch["image"].to(device, non_blocking=True).contiguous(memory_format=fmt)
        y = batch["target"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            s = run_student(x)
            with torch.no_grad():
                t = run_teacher(x)
            t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
            up = F.interpolate(s, size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(up.float(), y, ignore_index=255) + 3.0 * cwd_loss(s, t, 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    clock.end()


def lightningkd_seg(student, teacher, loader, device, bf16, channels_last, compiled, clock, classes) -> None:
    module = SegmentationDistillationModule(
        student,
        teacher,
        [ChannelWiseDivergence(temperature=4.0, weight=3.0)],
        num_classes=classes,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        channels_last=channels_last,
        compile_student=compiled,
        compile_teacher=compiled,
    )
    trainer(device, bf16, [ClockCallback(clock)]).fit(module, loader)


def segmentation(cfg: dict, device: torch.device, bf16: bool) -> dict:
    spec, steps = cfg["segmentation"], cfg["steps"]
    (h, w), batch, classes = spec["shape"], spec["batch"], spec["classes"]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(steps * batch, 3, h, w, generator=g)
    masks = torch.randint(0, classes, (steps * batch, h, w), generator=g)
    data = SegBatches(images, masks)
    channels_last = device.type == "cuda"

    def copies() -> tuple[nn.Module, nn.Module]:
        torch.manual_seed(0)
        return TorchvisionSegmenter(spec["student"], classes), TorchvisionSegmenter(spec["teacher"], classes)

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=batch)

    arms: dict[str, Callable[[Clock], None]] = {
        "hand": lambda c: hand_seg(*copies(), loader(), device, bf16, channels_last, False, c),
        "lightningkd": lambda c: lightningkd_seg(*copies(), loader(), device, bf16, channels_last, False, c, classes),
    }  # fmt: skip
    if spec["compile"]:
        arms["hand_compiled"] = lambda c: hand_seg(*copies(), loader(), device, bf16, channels_last, True, c)
        arms["lightningkd_compiled"] = lambda c: lightningkd_seg(
            *copies(), loader(), device, bf16, channels_last, True, c, classes
        )
    result = measure(arms, cfg["rounds"], device, (steps - WARMUP) * batch)
    result["ratios"] = ratios(result, {
        "lightningkd / hand": ("lightningkd", "hand"),
        "lightningkd_compiled / hand": ("lightningkd_compiled", "hand"),
        "lightningkd_compiled / hand_compiled": ("lightningkd_compiled", "hand_compiled"),
    })  # fmt: skip
    return result


# ---- measuring ---------------------------------------------------------------------------------------
def measure(arms: dict[str, Callable[[Clock], None]], rounds: int, device: torch.device, images: int) -> dict:
    """Images/s (median over interleaved rounds) and GPU peak memory (MiB) of each arm."""
    throughput: dict[str, list[float]] = {name: [] for name in arms}
    memory: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, run in arms.items():
            clock = Clock(device)
            run(clock)
            throughput[name].append(images / clock.elapsed)
            memory[name].append(clock.peak / 2**20)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result: dict[str, Any] = {"images_per_s": {k: statistics.median(v) for k, v in throughput.items()}}
    if device.type == "cuda":
        result["peak_mib"] = {k: max(v) for k, v in memory.items()}
        if "hand" in memory:
            result["memory_ratio"] = {
                name: result["peak_mib"][name] / result["peak_mib"]["hand"]
                for name in memory
                if name.startswith("lightningkd")
            }
    return result


def ratios(result: dict, wanted: dict[str, tuple[str, str]]) -> dict[str, float]:
    speed = result["images_per_s"]
    return {label: speed[a] / speed[b] for label, (a, b) in wanted.items() if a in speed and b in speed}


# ---- recipes -----------------------------------------------------------------------------------------
class LossLog(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def recipe(path: Path, cfg: dict, device: torch.device, bf16: bool, which: str) -> dict:
    """Fit ``steps`` of the recipe on synthetic data of its full size; the loss must fall and stay finite."""
    steps, batch = cfg["recipe_steps"], cfg["recipe_batch"][which]
    overrides = [
        "--trainer.accelerator", "gpu" if device.type == "cuda" else "cpu",
        "--trainer.devices", "1",
        "--trainer.precision", "bf16-mixed" if bf16 else "32-true",
        "--trainer.max_steps", str(steps),
        "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--trainer.callbacks", "[]",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    if which == "cifar":
        size = cfg["recipe_shape"]["cifar"]
        data = {"class_path": "datamodules.SyntheticClassificationDataModule",
                "init_args": {"num_classes": 100, "image_size": size, "train_size": steps * batch,
                              "val_size": batch, "batch_size": batch, "num_workers": 0}}  # fmt: skip
        teacher = {"class_path": "lightningkd.models.classifier",
                   "init_args": {"name": "resnet50", "num_classes": 100, "small_input": True, "checkpoint": None}}  # fmt: skip
        overrides += ["--data", json.dumps(data), "--model.init_args.teacher", json.dumps(teacher)]
    else:  # Cityscapes: the recipe's models without weights; the data below, at the recipe's crop size
        overrides += ["--data", json.dumps({"class_path": "datamodules.SyntheticSegmentationDataModule",
                                            "init_args": {"num_classes": 19, "train_size": 2, "val_size": 2}})]  # fmt: skip
        spec = _yaml(path)["model"]["init_args"]["teacher"]
        spec["init_args"]["checkpoint"] = None
        overrides += ["--model.init_args.teacher", json.dumps(spec)]
    cli = lightning_cli(["--config", str(path), *overrides], run=False)
    log = LossLog()
    # no config.yaml in the working directory (LightningCLI saves one at fit when nothing else logs)
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, SaveConfigCallback)]
    cli.trainer.callbacks.append(log)
    if which == "cifar":
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    else:
        cli.trainer.fit(cli.model, train_dataloaders=_cityscapes_shape(cfg, steps, batch))
    losses = log.losses
    window = max(1, len(losses) // 10)
    first, last = statistics.mean(losses[:window]), statistics.mean(losses[-window:])
    return {
        "recipe": str(path.relative_to(ROOT)),
        "steps": len(losses),
        "first_loss": first,
        "last_loss": last,
        "finite": all(math.isfinite(v) for v in losses),
        "decreasing": last < first,
    }


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _cityscapes_shape(cfg: dict, steps: int, batch: int) -> DataLoader:
    """Synthetic scenes at the Cityscapes crop (H x W): a square synthetic set, cropped to H x W.

    The same few batches repeat, so the loss can fall within a short run.
    """
    from datamodules.segmentation.synthetic import synthetic_segmentation

    h, w = cfg["recipe_shape"]["cityscapes"]
    (images, masks), _ = synthetic_segmentation(19, max(h, w), 4 * batch, 1, 0, 255)
    data = SegBatches(images[:, :, :h, :w].contiguous(), masks[:, :h, :w].contiguous())
    repeats = math.ceil(steps * batch / len(data))
    return DataLoader(torch.utils.data.ConcatDataset([data] * repeats), batch_size=batch, shuffle=True)


# ---- strategies ----------------------------------------------------------------------------------------
def strategies(reduced: bool, folder: Path) -> dict:
    """``strategies_gpu.py`` (DDP, FSDP with the teacher replicated and sharded, DeepSpeed ZeRO-2) on one GPU,
    or with ``--reduced`` on 2 CPU processes; its per-strategy reports, and whether its checks passed."""
    out = folder / "strategies.json"
    size = ["--reduced", "--steps", "3", "--batch_size", "4"] if reduced else ["--devices", "1"]
    script = Path(__file__).resolve().parent / "strategies_gpu.py"
    done = subprocess.run(
        [sys.executable, str(script), *size, "--out", str(out)], capture_output=True, text=True
    )
    result: dict[str, Any] = {"passed": done.returncode == 0}
    if out.is_file():
        result["reports"] = json.loads(out.read_text())
    if done.returncode:
        result["error"] = (done.stderr or done.stdout)[-2000:]
    return result


# ---- the run -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="the results file (JSON) to write")
    parser.add_argument("--reduced", action="store_true", help="toy sizes on the CPU (what the tests run)")
    parser.add_argument("--budget", type=float, help="seconds after which remaining sections are skipped")
    parser.add_argument("--only", action="append", help="run only the sections whose name contains this")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists():
        parser.error(f"{output} exists; choose a new file (results are never overwritten)")
    cfg = REDUCED if args.reduced else FULL
    device = torch.device("cuda" if torch.cuda.is_available() and not args.reduced else "cpu")
    if not args.reduced and device.type != "cuda":
        parser.error("no GPU here: run with --reduced for the CPU version")
    bf16 = device.type == "cuda"
    budget = args.budget or cfg["budget_s"]
    start = time.time()
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "mode": "reduced" if args.reduced else "full",
        "torch": torch.__version__,
        "lightning": L.__version__,
        "precision": "bf16-mixed, channels_last" if bf16 else "float32",
        "sections": {},
    }  # fmt: skip
    sections: list[tuple[str, Callable[[], dict]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in cfg["classification"]:
            sections.append(
                (
                    f"classification {pair['name']}",
                    functools.partial(classification, pair, cfg, device, bf16, Path(tmp)),
                )
            )
        sections.append(("segmentation", lambda: segmentation(cfg, device, bf16)))
        sections.append(("strategies", lambda: strategies(args.reduced, Path(tmp))))
        sections.append(("recipe dkd cifar100", lambda: recipe(DKD_RECIPE, cfg, device, bf16, "cifar")))
        sections.append(
            ("recipe cwd cityscapes", lambda: recipe(CWD_RECIPE, cfg, device, bf16, "cityscapes"))
        )
        for name, run in sections:
            if args.only and not any(part in name for part in args.only):
                continue
            if time.time() - start > budget:
                results["sections"][name] = {"skipped": f"time budget of {budget:.0f} s spent"}
                continue
            began = time.time()
            results["sections"][name] = {**run(), "seconds": round(time.time() - began, 1)}
            print(f"{name}: {json.dumps(results['sections'][name])}", flush=True)
    results["seconds"] = round(time.time() - start, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"wrote {output} ({results['seconds']} s)")
    return results


if __name__ == "__main__":
    main()
