#!/usr/bin/env bash
# Second GPU call of issue 14 (device `run` tool, carry [".whl"]): the correctness cases the first call
# (scripts/gpu_all.sh, rows in bench/results/gdn_correctness_run1.json) did not reach - the Qwen2.5-1.5B
# layout, SmolLM2 at 8K and padded - merged into one report with the per-layer speed table; then peak
# GPU memory at the `paper` preset's 4 x 4096 micro-batch for the Qwen2.5-1.5B shape.
set -uo pipefail
OUT=${OUT:-bench/results}
source scripts/gpu_env.sh
quiet() { grep -v "it/s\]\|step/s\]\|s/step\]"; }
GC="python3 bench/gdn_correctness.py --out-dir $OUT --skip-side-checks"
timeout ${T_QWEN:-120} $GC --layouts qwen2.5-1.5b --skip-speed --merge bench/results/gdn_correctness_run1.json 2>&1 | quiet | tee "$OUT/gdn_correctness_qwen.log"
cp "$OUT/gdn_correctness.json" /tmp/gc_qwen.json
timeout ${T_SMOL:-50} $GC --layouts smollm2 --lengths 8192 --merge /tmp/gc_qwen.json 2>&1 | quiet | tee "$OUT/gdn_correctness_smollm2.log"
TT="python3 bench/train_throughput.py --out $OUT/train_throughput_memory.jsonl --seq 4096 --micro-batch 4 --steps 1 --warmup 1"
[ "${MEMORY:-1}" = 1 ] && timeout 60 $TT --shape qwen2.5-1.5b --label "paper preset micro-batch 4 x 4096" 2>&1 | quiet | tee "$OUT/memory.log"
