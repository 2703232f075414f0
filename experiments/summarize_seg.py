"""Mean +- std of the validation mIoU per run type from a results.jsonl written by camvid_seg_kd.py."""

import json
import statistics
import sys
from collections import defaultdict

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
groups = defaultdict(list)
for row in rows:
    groups[row["run"]].append(100 * row["val_mIoU"])
print("| run | seeds | val mIoU (%) mean +- std | per seed |")
print("|---|---|---|---|")
for run in ("teacher", "student", "cwd", "bpkd", "bpkd_default"):
    values = groups.get(run, [])
    if values:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        seeds = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {run} | {len(values)} | {statistics.mean(values):.2f} +- {std:.2f} | {seeds} |")
