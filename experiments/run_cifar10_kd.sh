#!/usr/bin/env bash
# The whole CIFAR-10 evidence table: one teacher, then student alone / KD / DKD with seeds 0, 1, 2.
# Usage: bash experiments/run_cifar10_kd.sh [path/to/cifar10.tar.gz] (default ../shared/data/cifar10.tar.gz)
set -euo pipefail
tarball=${1:-../shared/data/cifar10.tar.gz}
data=${DATA_DIR:-/tmp/lightningkd-cifar10}
out=${OUT_DIR:-runs/evidence}
py=${PYTHON:-python}
mkdir -p "$data" "$out"
[ -d "$data/cifar10" ] || tar -xzf "$tarball" -C "$data"
[ -f "$out/teacher_seed0.ckpt" ] || $py experiments/cifar10_kd.py --data-dir "$data" --run teacher --seed 0 --epochs 6 --train-batches 120 --out-dir "$out"
for seed in 0 1 2; do
  for run in student kd dkd; do
    $py experiments/cifar10_kd.py --data-dir "$data" --run "$run" --seed "$seed" --teacher "$out/teacher_seed0.ckpt" --out-dir "$out"
  done
  $py experiments/cifar10_kd.py --data-dir "$data" --run dkd --dkd-beta 2 --seed "$seed" --teacher "$out/teacher_seed0.ckpt" --out-dir "$out"
done
$py experiments/summarize.py "$out/results.jsonl"
