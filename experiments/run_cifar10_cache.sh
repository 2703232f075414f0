#!/usr/bin/env bash
# Teacher-output caching on the CIFAR-10 protocol (experiments/cifar10_kd.py): KD with the teacher run at
# every step (fresh augmentations) against KD reading a cache of the teacher's logits (4 fixed
# augmentations per image), seeds 0-4, the same teacher. Writes runs/cache/results.jsonl.
# Usage: TEACHER=runs/evidence/teacher_seed0.ckpt bash experiments/run_cifar10_cache.sh [cifar10.tar.gz]
set -euo pipefail
tarball=${1:-../shared/data/cifar10.tar.gz}
data=${DATA_DIR:-/tmp/lightningkd-cifar10}
out=${OUT_DIR:-runs/cache}
py=${PYTHON:-python}
replays=${REPLAYS:-4}
teacher=${TEACHER:-runs/evidence/teacher_seed0.ckpt}
mkdir -p "$data" "$out"
[ -d "$data/cifar10" ] || tar -xzf "$tarball" -C "$data"
[ -f "$teacher" ] || $py experiments/cifar10_kd.py --data-dir "$data" --run teacher --seed 0 --epochs 6 --train-batches 120 --out-dir "$(dirname "$teacher")"
[ -f "$out/teacher_cache/meta.json" ] || $py experiments/cifar10_kd.py --data-dir "$data" --run cache --replays "$replays" --cache "$out/teacher_cache" --teacher "$teacher"
for seed in ${SEEDS:-0 1 2 3 4}; do
  $py experiments/cifar10_kd.py --data-dir "$data" --run kd --seed "$seed" --teacher "$teacher" --out-dir "$out"
  $py experiments/cifar10_kd.py --data-dir "$data" --run kd --label kd_cached --seed "$seed" --teacher "$teacher" --replays "$replays" --cache "$out/teacher_cache" --out-dir "$out"
done
