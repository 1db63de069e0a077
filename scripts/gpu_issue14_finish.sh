#!/usr/bin/env bash
# Issue 14's last GPU measurements in one device call (carry [".whl"]), most important first, so a call cut
# off at its limit still returns the front of the list under $OUT:
#   1. on an H100 only (the targets are stated for one; the H200 rows exist): the SmolLM2 throughput table,
#      plain against every switch on (scripts/gpu_train_throughput.sh, the CUDA-graph check first);
#   2. the correctness cases not yet run on a GPU: Qwen2.5-1.5B's head layout, SmolLM2 at 8K, padded batches
#      (scripts/gpu_gdn_rest.sh, merged with bench/results/gdn_correctness_run1.json);
#   3. the Qwen2.5-1.5B shape, plain against every switch on;
#   4. peak memory at the `paper` preset's Stage-2 micro-batch (4 x 4096) for the Qwen2.5-1.5B shape.
set -uo pipefail
OUT=${OUT:-bench/results}
source scripts/gpu_env.sh
MODES="plain stack+compile+graph"
if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H100; then
  MODES="$MODES" QWEN=0 SMOL_LIMIT=${SMOL_LIMIT:-220} bash scripts/gpu_train_throughput.sh
fi
T_QWEN=${T_QWEN:-100} T_SMOL=${T_SMOL:-45} MEMORY=0 bash scripts/gpu_gdn_rest.sh
timeout "${QWEN_LIMIT:-150}" python3 bench/train_throughput.py --out "$OUT/train_throughput.jsonl" \
  --shape qwen2.5-1.5b --seq 2048 --micro-batch 4 --steps 3 --warmup 2 --modes $MODES --baseline --label modes \
  2>&1 | grep -v "it/s\]\|step/s\]\|s/step\]" | tee "$OUT/train_throughput_qwen.log"
timeout 60 python3 bench/train_throughput.py --out "$OUT/train_throughput_memory.jsonl" --seq 4096 --micro-batch 4 \
  --steps 1 --warmup 1 --shape qwen2.5-1.5b --label "paper preset micro-batch 4 x 4096" 2>&1 | tee "$OUT/memory.log"
ls -la "$OUT"
