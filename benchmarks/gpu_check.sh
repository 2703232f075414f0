#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): one GPU, under 8 minutes, one results file.
#   bash benchmarks/gpu_check.sh [RESULTS.json]            # default benchmarks/results/gpu_check_<time>.json
#   bash benchmarks/gpu_check.sh --reduced [RESULTS.json]  # the CPU version at toy sizes (the tests run it)
# Put the figures in the README with the date and the GPU model the results file records.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export NO_ALBUMENTATIONS_UPDATE=1
py=${PYTHON:-python}
stamp=$(date +%Y%m%d_%H%M%S)
if [ "${1:-}" = "--reduced" ]; then
  shift
  exec "$py" "$here/gpu_check.py" --reduced --output "${1:-$here/results/gpu_check_reduced_$stamp.json}"
fi
# the script skips what does not fit its 450 s budget; the hard stop keeps a hung run inside the 8 minutes
exec timeout 480 "$py" "$here/gpu_check.py" --output "${1:-$here/results/gpu_check_$stamp.json}"
