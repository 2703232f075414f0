"""Peak resident memory of one ACAM-KD forward + backward on the CPU: fused against materialised attention.

ACAM-KD's fusion is a cross-attention over every position of the distilled map: the materialised
``P x P`` attention (``P = H W``) holds ``P^2`` floats per image (in the forward, and again as its gradient
in the backward). ``ACAMKD`` calls :func:`~lightningkd.functional.acam_kd.cross_attention_fusion`, which
goes through ``scaled_dot_product_attention``'s fused (flash) kernel and never holds that matrix.

Each configuration runs in a fresh subprocess: one ``ACAMKD`` forward + backward (float32, CPU, batch 1,
student map with ``requires_grad``), after a warm-up step on an 8 x 8 map (kernel and thread-pool set-up).
The peak is ``ru_maxrss`` after the step; the baseline is the process's resident size just before it (the
modules, the inputs and the warm-up already counted), so ``MiB`` is the step's own peak. Configurations:

- ``fused``: the library's path;
- ``naive``: the same distiller with the fusion replaced by the materialised
  ``V softmax(Q^T K / sqrt(C_q))^T`` (the baseline);
- ``stride2``: the fused path with ``key_stride=2`` (a quarter of the keys).

``seconds`` is one step's wall time (``--repeats``: the fastest of that many); on a shared machine it is
noisy, the memory is not.

Maps: (a) Cityscapes logits, 19 classes at 64 x 128 (a 512 x 1024 crop at stride 8), 19 masks; (b) the FPN
P3 level of an 800 x 1333 COCO image, 256 x 100 x 167 (stride 8), 6 masks.

    python benchmarks/acam_attention_memory.py            # a few minutes on 2 cores
    python benchmarks/acam_attention_memory.py --quick    # small maps, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

CASES = {
    # name: (channels, height, width, masks, what)
    "cityscapes": (19, 64, 128, 19, "Cityscapes logits 19 x 64 x 128, 19 masks"),
    "coco_p3": (256, 100, 167, 6, "COCO 800x1333 FPN P3 256 x 100 x 167, 6 masks"),
}
QUICK = {
    "cityscapes": (19, 16, 32, 19, "Cityscapes-like logits 19 x 16 x 32, 19 masks (--quick)"),
    "coco_p3": (256, 25, 42, 6, "P3-like level 256 x 25 x 42, 6 masks (--quick)"),
}
IMPLS = ("fused", "naive", "stride2")


def _rss_mib() -> float:
    """The current resident set size (``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(channels: int, height: int, width: int, masks: int, impl: str, repeats: int = 1) -> dict:
    """One configuration, in this (fresh) process; returns the measurements."""
    import torch

    import lightningkd.distillers.acam_kd as acam_module
    from lightningkd.distillers import ACAMKD

    if impl == "naive":

        def materialised(query, key, value):
            attention = torch.softmax(query.transpose(1, 2) @ key / math.sqrt(query.shape[1]), dim=-1)
            return value @ attention.transpose(1, 2)

        acam_module.cross_attention_fusion = materialised  # the distiller looks it up at call time

    torch.manual_seed(0)
    acam = ACAMKD(
        student_layer="s",
        teacher_layer="t",
        channels=channels,
        num_masks=masks,
        key_stride=2 if impl == "stride2" else 1,
    )

    def step(h: int, w: int) -> None:
        student = {"s": torch.randn(1, channels, h, w, requires_grad=True)}
        teacher = {"t": torch.randn(1, channels, h, w)}
        acam.zero_grad(set_to_none=True)
        acam(student, teacher).backward()

    step(8, 8)  # warm-up
    student = {"s": torch.randn(1, channels, height, width, requires_grad=True)}
    teacher = {"t": torch.randn(1, channels, height, width)}
    acam.zero_grad(set_to_none=True)
    baseline, peak_before = _rss_mib(), _maxrss_mib()
    start = time.perf_counter()
    loss = acam(student, teacher)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _maxrss_mib()
    assert torch.isfinite(loss) and student["s"].grad is not None
    for _ in range(repeats - 1):  # more timings of the same step (the memory is the first one's)
        acam.zero_grad(set_to_none=True)
        start = time.perf_counter()
        acam(student, teacher).backward()
        seconds = min(seconds, time.perf_counter() - start)
    return {
        "baseline_mib": baseline,
        "step_mib": peak - baseline,
        "new_peak": peak > peak_before,  # False: the step stayed under an earlier peak (a lower bound)
        "seconds": seconds,
        "loss": loss.item(),
        "threads": torch.get_num_threads(),
    }


def run_case(name: str, impl: str, quick: bool, repeats: int) -> dict:
    """One configuration in a fresh subprocess (its peak is its own)."""
    command = [sys.executable, __file__, "--child", name, impl, "--repeats", str(repeats)]
    command += ["--quick"] if quick else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small maps (seconds)")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=1, help="time the step this many times (the fastest)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = QUICK if args.quick else CASES

    if args.child:
        name, impl = args.child
        channels, height, width, masks, _ = cases[name]
        print(json.dumps(child(channels, height, width, masks, impl, args.repeats)))
        return

    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU, batch 1, one forward + backward"
    )
    for name in args.cases:
        channels, height, width, masks, what = cases[name]
        positions = height * width
        matrix_mib = positions**2 * 4 / 2**20
        print(f"\n{what}: P = {positions}, one P x P float32 matrix = {matrix_mib:.0f} MiB")
        if 3 * matrix_mib > 8 * 1024:
            print("  note: the naive case holds several P x P matrices (> ~8 GiB expected); it runs anyway")
        print(f"  {'config':8s} {'peak MiB':>10s} {'seconds':>8s} {'base MiB':>9s}  loss")
        results = {}
        for impl in IMPLS:
            r = results[impl] = run_case(name, impl, args.quick, args.repeats)
            if "error" in r:
                print(f"  {impl:8s} failed: {r['error']}")
                continue
            flag = "" if r["new_peak"] else "  (under an earlier peak: a lower bound)"
            print(
                f"  {impl:8s} {r['step_mib']:10.1f} {r['seconds']:8.2f} {r['baseline_mib']:9.1f}"
                f"  {r['loss']:.6f}{flag}"
            )
        if "error" not in results["fused"] and "error" not in results["naive"]:
            ratio = results["fused"]["step_mib"] / max(results["naive"]["step_mib"], 1e-9)
            speed = results["fused"]["seconds"] / results["naive"]["seconds"]
            print(f"  fused / naive: memory {ratio:.3f}, time {speed:.2f}")


if __name__ == "__main__":
    main()
