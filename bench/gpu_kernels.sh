#!/usr/bin/env bash
# Device-machine driver for bench/kernels_bench.py, run from the repo root with .whl carried:
#   bash bench/gpu_kernels.sh [sections]     (sections: comma-separated kl,decode,sweep; default all)
# Unpacks the pure-python wheels of fla-core and liger-kernel (fla-core and flash-linear-attention
# share the fla/ folder, so they are unzipped, not pip-installed, side by side), then runs the
# benchmark; the report and the log land in $OUT (or bench/results when OUT is unset).
set -uo pipefail
site=/tmp/site
mkdir -p "$site"
for wheel in .whl/fla_core-*.whl .whl/liger_kernel-*.whl; do
    python3 -m zipfile -e "$wheel" "$site" || exit 1
done
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
out="${OUT:-bench/results}"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
python3 bench/kernels_bench.py "$out/kernels.md" --sections "${1:-kl,decode,sweep}" 2>&1 | tee "$out/kernels_bench.log"
