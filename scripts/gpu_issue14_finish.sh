#!/usr/bin/env bash
# Issue 14's last GPU measurements in one device call (carry [".whl"]), most important first, so a call cut
# off at its limit still returns the front of the list under $OUT:
#   1. on an H100 only (the targets are stated for one; the H200 rows exist): the SmolLM2 throughput table,
#      plain against every switch on (scripts/gpu_train_throughput.sh, the CUDA-graph check first);
#   2. the Qwen2.5-1.5B shape's Stage 2 with every switch on (its plain rows and Stage 1 ran on 2026-12-06:
#      bench/results/train_throughput_modes_qwen_h200.jsonl; compile + capture of this shape needs ~3 minutes);
#   3. peak memory at the `paper` preset's Stage-2 micro-batch (4 x 4096) for the Qwen2.5-1.5B shape.
# The correctness cases (scripts/gpu_gdn_rest.sh) are done: bench/results/gdn_correctness.md.
set -uo pipefail
OUT=${OUT:-bench/results}
source scripts/gpu_env.sh
quiet() { grep -v "it/s\]\|step/s\]\|s/step\]"; }
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100; then
  MODES="plain stack+compile+graph" QWEN=0 SMOL_LIMIT=${SMOL_LIMIT:-220} bash scripts/gpu_train_throughput.sh
fi
TT="python3 bench/train_throughput.py --shape qwen2.5-1.5b"
timeout "${QWEN_LIMIT:-240}" $TT --out "$OUT/train_throughput.jsonl" --seq 2048 --micro-batch 4 --steps 3 --warmup 2 \
  --modes stack+compile+graph --stages 2 --label modes 2>&1 | quiet | tee "$OUT/train_throughput_qwen.log"
timeout "${MEMORY_LIMIT:-240}" $TT --out "$OUT/train_throughput_memory.jsonl" --seq 4096 --micro-batch 4 --steps 1 \
  --warmup 1 --label "paper preset micro-batch 4 x 4096" 2>&1 | quiet | tee "$OUT/memory.log"
ls -la "$OUT"
