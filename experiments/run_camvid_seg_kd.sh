#!/usr/bin/env bash
# The whole CamVid segmentation table: one teacher, then student alone / CWD / BPKD / BPKD with the
# distiller's default weights, seeds 0, 1, 2.
# Usage: bash experiments/run_camvid_seg_kd.sh [path/to/camvid] (default ../shared/data/camvid)
set -euo pipefail
data=${1:-../shared/data/camvid}
out=${OUT_DIR:-runs/camvid}
py=${PYTHON:-python}
mkdir -p "$out"
[ -f "$out/teacher_seed0.ckpt" ] || $py experiments/camvid_seg_kd.py --data-dir "$data" --run teacher --seed 0 --epochs 30 --out-dir "$out"
for seed in 0 1 2; do
  for run in student cwd bpkd bpkd_default; do
    $py experiments/camvid_seg_kd.py --data-dir "$data" --run "$run" --seed "$seed" --epochs 8 --teacher "$out/teacher_seed0.ckpt" --out-dir "$out"
  done
done
$py experiments/summarize_seg.py "$out/results.jsonl"
