#!/usr/bin/env bash
# The CIFAR-10 cross-architecture protocol (README "Results"): for each pair, the teacher once, then the
# student arms over 5 seeds, seed-major so that a partial run is balanced. Two runs at a time, one thread each.
# Usage: bash experiments/run_cifar10_cross_arch.sh [path/to/cifar10.tar.gz]   (default ../shared/data/cifar10.tar.gz)
#        PAIRS="vit_to_cnn" ARMS="student ofa" SEEDS="0 1" bash experiments/run_cifar10_cross_arch.sh   (a subset)
set -euo pipefail
tarball=${1:-../shared/data/cifar10.tar.gz}
data=${DATA_DIR:-/tmp/lightningkd-cifar10}
out=${OUT_DIR:-runs/cifar10_cross_arch}
py=${PYTHON:-python}
jobs=${JOBS:-2}
pairs=${PAIRS-"vit_to_cnn cnn_to_vit"}
arms=${ARMS-"student kd ofa scalekd"}
seeds=${SEEDS-"0 1 2 3 4"}
mkdir -p "$data" "$out"
[ -d "$data/cifar10" ] || tar -xzf "$tarball" -C "$data"
for pair in $pairs; do
  [ -f "$out/$pair/teacher.ckpt" ] || echo "$pair"
done | xargs -P "$jobs" -I{} sh -c \
  "$py experiments/cifar10_cross_arch.py teacher --pair {} --threads 1 --data-dir '$data/cifar10' --out-dir '$out' > '$out'/teacher_{}.log 2>&1"
for seed in $seeds; do for pair in $pairs; do for arm in $arms; do echo "$pair $arm $seed"; done; done; done \
  | xargs -P "$jobs" -L 1 sh -c \
  "$py experiments/cifar10_cross_arch.py student --pair \$0 --arm \$1 --seed \$2 --threads 1 --data-dir '$data/cifar10' --out-dir '$out' > '$out'/\$0_\$1_seed\$2.log 2>&1"
for pair in $pairs; do
  echo "## $pair"
  $py experiments/summarize_protocol.py "$out/$pair/results.jsonl" --metric val_acc1
done
