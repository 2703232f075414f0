#!/usr/bin/env bash
# The BCCD detection evidence protocol (README "Results"): the teacher once, then the student arms over the
# seeds, seed-major so that a partial run is balanced. Two runs at a time, one thread each.
# Usage: bash experiments/run_bccd_protocol.sh [path/to/bccd]   (default ../shared/data/bccd)
#        ARMS="student fgd" SEEDS="0 1" bash experiments/run_bccd_protocol.sh   (a subset)
set -euo pipefail
data=${1:-../shared/data/bccd}
out=${OUT_DIR:-runs/bccd_protocol}
py=${PYTHON:-python}
jobs=${JOBS:-2}
arms=${ARMS-"student fgd pkd mgd zero_weight maskd acam_kd"}
seeds=${SEEDS-"0 1 2 3 4"}
mkdir -p "$out"
[ -f "$out/teacher.ckpt" ] || $py experiments/det_protocol.py teacher --data-dir "$data" --out-dir "$out"
# MasKD's first stage: receptive tokens learned on the frozen teacher (read by the maskd arm)
case " $arms " in *" maskd "*)
  [ -f "$out/maskd_tokens.pt" ] || $py experiments/det_protocol.py tokens --data-dir "$data" --out-dir "$out" ;;
esac
for seed in $seeds; do for arm in $arms; do echo "$arm $seed"; done; done | xargs -P "$jobs" -L 1 sh -c \
  "$py experiments/det_protocol.py student --arm \$0 --seed \$1 --threads 1 --data-dir '$data' --out-dir '$out' > '$out'/\$0_seed\$1.log 2>&1"
for metric in val_mAP val_mAP50; do $py experiments/summarize_protocol.py "$out/results.jsonl" --metric "$metric"; done
