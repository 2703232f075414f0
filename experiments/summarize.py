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
for run in ("teacher", "student", "kd", "dkd", *sorted(k for k in groups if k.startswith("dkd_"))):
    acc = groups.get(run, [])
    if acc:
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {run} | {len(acc)} | {statistics.mean(acc):.2f} +- {std:.2f} |")
