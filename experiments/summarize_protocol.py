"""Raw means and paired differences (arm minus student alone, same seed) from a protocol results.jsonl.

Usage: python experiments/summarize_protocol.py runs/camvid_protocol/results.jsonl [--metric val_mIoU]
       [--baseline segformer_b0 --arms segformer_b0 segformer_b0_transkd]   (another student's pairs)

A paired difference is computed only for the seeds both the arm and the student alone have. The last
result of an (arm, seed) pair wins, so a rerun replaces an earlier one.
"""

from __future__ import annotations

import argparse
import json
import statistics


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {std:.2f}"


def table(rows: list[dict], metric: str, baseline: str = "student") -> str:
    by_arm: dict[str, dict[int, float]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], {})[row["seed"]] = 100 * row[metric]
    lines = [
        f"| run | seeds | {metric} (%) mean +- std | paired diff vs {baseline} mean +- std | per seed |",
        "|---|---|---|---|---|",
    ]
    alone = by_arm.get(baseline, {})
    for arm, per_seed in by_arm.items():
        seeds = sorted(per_seed)
        values = [per_seed[s] for s in seeds]
        shared = [s for s in seeds if s in alone]
        if arm in ("teacher", baseline) or not shared:
            diff = ""
        else:
            diffs = [per_seed[s] - alone[s] for s in shared]
            diff = f"{'+' if statistics.mean(diffs) >= 0 else ''}{mean_std(diffs)} (n={len(diffs)})"
        listed = ", ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {arm} | {len(values)} | {mean_std(values)} | {diff} | {listed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    parser.add_argument("--metric", default="val_mIoU")
    parser.add_argument(
        "--baseline", default="student", help="the arm the paired differences are taken against"
    )
    parser.add_argument("--arms", nargs="*", help="only these arms (default: all)")
    args = parser.parse_args()
    with open(args.results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if args.arms:
        rows = [r for r in rows if r["arm"] in args.arms]
    print(table(rows, args.metric, args.baseline))


if __name__ == "__main__":
    main()
