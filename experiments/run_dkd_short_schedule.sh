#!/usr/bin/env bash
# DKD in a short schedule (README "DKD in short schedules"): why beta 8 collapses and what fixes it.
# CIFAR-10 setting of experiments/cifar10_kd.py (ResNet-18 teacher, ShuffleNetV2 x0.5 student, 6 epochs x
# 100 batches of 128 = 600 steps), every loss term and the student's gradient norm logged at every step.
# Rows: student alone; DKD beta 8 with mdistiller's warm-up fraction (50 of 600 steps); the same with a
# warm-up over half the run; the same with gradient-norm clipping at 1.0; seeds 0-2. Seed 2 also with the
# BatchNorm statistics recomputed before validation (does a stale running mean explain the collapse? no).
# Usage: bash experiments/run_dkd_short_schedule.sh [path/to/cifar10.tar.gz]
set -euo pipefail
tarball=${1:-../shared/data/cifar10.tar.gz}
data=${DATA_DIR:-/tmp/lightningkd-cifar10}
out=${OUT_DIR:-runs/dkd}
py=${PYTHON:-python}
mkdir -p "$data" "$out"
[ -d "$data/cifar10" ] || tar -xzf "$tarball" -C "$data"
[ -f "$out/teacher_seed0.ckpt" ] || $py experiments/cifar10_kd.py --data-dir "$data" --run teacher --seed 0 --epochs 6 --train-batches 120 --out-dir "$out"
common=(--data-dir "$data" --teacher "$out/teacher_seed0.ckpt" --out-dir "$out" --log-every 1)
for seed in 0 1 2; do
  $py experiments/cifar10_kd.py "${common[@]}" --seed "$seed" --run student
  $py experiments/cifar10_kd.py "${common[@]}" --seed "$seed" --run dkd --label dkd_b8
  $py experiments/cifar10_kd.py "${common[@]}" --seed "$seed" --run dkd --label dkd_b8_warmup50 --warmup-fraction 0.5
  $py experiments/cifar10_kd.py "${common[@]}" --seed "$seed" --run dkd --label dkd_b8_clip1 --clip 1.0
done
$py experiments/cifar10_kd.py "${common[@]}" --seed 2 --run dkd --label dkd_b8_precisebn --precise-bn 20
$py experiments/summarize_dkd.py "$out"
