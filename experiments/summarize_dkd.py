"""Why DKD with beta 8 collapses in a short schedule: per-run loss terms, gradient norms and accuracy.

Reads the per-step CSV logs written by ``experiments/run_dkd_short_schedule.sh`` (``--log-every 1``) and its
``results.jsonl``. For every run: the student's gradient norm (before clipping) averaged over windows of
steps and its largest value with the step, the weighted NCKD term and the cross-entropy over the same
windows, the largest validation loss, and the final top-1. Then top-1 per run type with the paired
difference against the student alone (same seed).

Usage: python experiments/summarize_dkd.py runs/dkd
"""

from __future__ import annotations

import csv
import glob
import json
import os
import statistics
import sys

WINDOWS = ((0, 10), (10, 50), (50, 100), (500, 600))


def column(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) if r.get(key) else 0.0 for r in rows if r.get("train/grad_norm")]


def window_mean(values: list[float], start: int, stop: int) -> float:
    part = values[start:stop]
    return sum(part) / len(part) if part else float("nan")


def describe(folder: str) -> str | None:
    logs = sorted(glob.glob(os.path.join(folder, "version_*", "metrics.csv")))
    if not logs:
        return None
    with open(logs[-1]) as f:
        rows = list(csv.DictReader(f))
    grad = column(rows, "train/grad_norm")
    if not grad:
        return None
    nckd = column(rows, "train/kd/dkd/nckd")
    ce = column(rows, "train/task_loss")
    val_loss = max((float(r["val/loss"]) for r in rows if r.get("val/loss")), default=float("nan"))
    peak = max(range(len(grad)), key=grad.__getitem__)
    cells = [f"{window_mean(grad, a, b):.1f}" for a, b in WINDOWS]
    return (
        f"| {os.path.basename(folder)} | {' / '.join(cells)} | {grad[peak]:.0f} at {peak} "
        f"| {window_mean(nckd, 10, 50):.1f} / {window_mean(nckd, 500, 600):.1f} "
        f"| {window_mean(ce, 10, 50):.2f} / {window_mean(ce, 500, 600):.2f} | {val_loss:.3g} |"
    )


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/dkd"
    print(
        "| run | grad norm, steps 0-10 / 10-50 / 50-100 / 500-600 | largest grad norm, step "
        "| beta*NCKD, steps 10-50 / 500-600 | CE, steps 10-50 / 500-600 | largest val loss |"
    )
    print("|---|---|---|---|---|---|")
    for folder in sorted(glob.glob(os.path.join(out, "*_seed*"))):
        if os.path.isdir(folder):
            line = describe(folder)
            if line:
                print(line)
    with open(os.path.join(out, "results.jsonl")) as f:
        results = [json.loads(line) for line in f if line.strip()]
    top1: dict[str, dict[int, float]] = {}
    for r in results:
        top1.setdefault(r["run"], {})[r["seed"]] = 100 * r["val_acc1"]
    alone = top1.get("student", {})
    print("\n| run | seeds | top-1 (%) mean +- std | paired diff vs student alone | per seed |")
    print("|---|---|---|---|---|")
    for run, per_seed in top1.items():
        seeds = sorted(per_seed)
        values = [per_seed[s] for s in seeds]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        diffs = [per_seed[s] - alone[s] for s in seeds if s in alone and run not in ("student", "teacher")]
        diff = ""
        if diffs:
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            diff = f"{statistics.mean(diffs):+.2f} +- {spread:.2f} (n={len(diffs)})"
        listed = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {run} | {len(values)} | {statistics.mean(values):.2f} +- {std:.2f} | {diff} | {listed} |")


if __name__ == "__main__":
    main()
