#!/usr/bin/env bash
# The CamVid evidence protocol (README "Results"): the teacher once, then the student arms over 5 seeds,
# seed-major so that a partial run is balanced; then the BPKD ablation on seeds 0-2. MasKD's tokens are
# learned on the teacher first. Two runs at a time,
# one thread each (faster than one run on two threads on a 2-core machine).
# Usage: bash experiments/run_camvid_protocol.sh [path/to/camvid]   (default ../shared/data/camvid)
#        ARMS="student cwd" SEEDS="0 1" ABLATION="" bash experiments/run_camvid_protocol.sh   (a subset; empty: none)
#        ARMS="segformer_b0 segformer_b0_transkd" ABLATION="" EPOCHS=3 bash experiments/run_camvid_protocol.sh
#          (the SegFormer-B0 student alone and with TransKD, as in the README: 3 epochs)
set -euo pipefail
data=${1:-../shared/data/camvid}
out=${OUT_DIR:-runs/camvid_protocol}
py=${PYTHON:-python}
jobs=${JOBS:-2}
arms=${ARMS-"student zero_weight pixel_kd cwd dist skd cirkd bpkd_previous bpkd maskd acam_kd"}
seeds=${SEEDS-"0 1 2 3 4"}
ablation=${ABLATION-"bpkd_light bpkd_light_T1 bpkd_edge_only bpkd_body_only bpkd_T1 bpkd_stride16 bpkd_width3 bpkd_nonzero bpkd_postmask acam_kd_alpha0.1 acam_kd_p2_sum acam_kd_elementwise acam_kd_uniform_masks maskd_light"}
ablation_seeds=${ABLATION_SEEDS-"0 1 2"}
mkdir -p "$out"
[ -f "$out/teacher.ckpt" ] || $py experiments/seg_protocol.py teacher --data-dir "$data" --out-dir "$out"
# MasKD's first stage: receptive tokens learned on the frozen teacher (read by the maskd arm)
case " $arms " in *" maskd "*)
  [ -f "$out/maskd_tokens.pt" ] || $py experiments/seg_protocol.py tokens --data-dir "$data" --out-dir "$out" ;;
esac
{
  for seed in $seeds; do for arm in $arms; do echo "$arm $seed"; done; done
  for seed in $ablation_seeds; do for arm in $ablation; do echo "$arm $seed"; done; done
} | xargs -P "$jobs" -L 1 sh -c \
  "$py experiments/seg_protocol.py student --arm \$0 --seed \$1 ${EPOCHS:+--epochs $EPOCHS} --threads 1 --data-dir '$data' --out-dir '$out' > '$out'/\$0_seed\$1.log 2>&1"
$py experiments/summarize_protocol.py "$out/results.jsonl"
