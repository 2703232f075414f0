"""Mean +- std of the top-1 accuracy per run type from a results.jsonl written by cifar10_kd.py."""

import json
import statistics
import sys
from collections import defaultdict

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
groups = defaultdict(list)
for row in rows:
    groups[row["run"]].append(100 * row["val_acc1"])
print("| run | seeds | top-1 (%) mean +- std |")
print("|---|---|---|")
known = ("teacher", "student", "kd", "dkd")
for run in (*known, *sorted(k for k in groups if k not in known)):
    acc = groups.get(run, [])
    if acc:
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {run} | {len(acc)} | {statistics.mean(acc):.2f} +- {std:.2f} |")

# paired by seed: every other run against KD (the cache's comparison) when both have the seed
by_seed = {(row["run"], row["seed"]): 100 * row["val_acc1"] for row in rows}
for run in sorted(k for k in groups if k != "kd" and k.startswith("kd")):
    diffs = [
        by_seed[(run, s)] - by_seed[("kd", s)] for (r, s) in by_seed if r == run and ("kd", s) in by_seed
    ]
    if len(diffs) > 1:
        print(
            f"{run} - kd, paired over {len(diffs)} seeds: {statistics.mean(diffs):+.2f} +- {statistics.stdev(diffs):.2f}"
        )
