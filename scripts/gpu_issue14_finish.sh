#!/usr/bin/env bash
# Issue 14's open GPU measurements in one device call (carry [".whl"]), most important first, so a call cut off at
# its limit still returns the front of the list under $OUT:
#   1. peak memory at the `paper` preset's micro-batches for the Qwen2.5-1.5B shape, with the defaults: Stage 1
#      32 x 512 (stacked; on 2026-12-06 its stacked step ran out of memory at 4 x 4096 on an H100, before the
#      torch GDN backward parts ran over batch slices, kernels/gdn_fla.py), Stage 2 4 x 4096;
#   2. which tensors the cast kernels of SmolLM2's step copy (the 2026-12-06 steady profile,
#      bench/results/train_throughput_profile_steady_h100.md, names dtype casts among the last 5 %): one step
#      compiled but not replayed, so its aten ops show, with the copies grouped by input shape;
#   3. STEADY=1: the replayed step under the profiler again (every switch on), e.g. after a change to the step.
# SMOL_TABLE=1 first reruns the SmolLM2 plain-vs-switches table (scripts/gpu_train_throughput.sh, the CUDA-graph
# check included). Done and recorded in bench/results/train_throughput.md: the steady profile, the Qwen shape's
# Stage 2 with the switches; the correctness cases (scripts/gpu_gdn_rest.sh): bench/results/gdn_correctness.md.
set -uo pipefail
OUT=${OUT:-bench/results}
source scripts/gpu_env.sh
quiet() { grep -v "it/s\|s/it\|step/s\|s/step"; }
if [ "${SMOL_TABLE:-0}" = 1 ]; then
  MODES="plain stack+compile+graph" QWEN=0 SMOL_LIMIT=${SMOL_LIMIT:-220} bash scripts/gpu_train_throughput.sh
fi
QWEN="python3 bench/train_throughput.py --shape qwen2.5-1.5b --out $OUT/train_throughput_memory.jsonl --steps 1
  --warmup 1 --label paper-preset-micro-batch"
timeout "${MEMORY_LIMIT:-200}" $QWEN --stages 1 --seq 512 --micro-batch 32 2>&1 | quiet | tee "$OUT/memory.log"
timeout "${MEMORY_LIMIT:-200}" $QWEN --stages 2 --seq 4096 --micro-batch 4 2>&1 | quiet | tee -a "$OUT/memory.log"
SMOL="python3 bench/train_throughput.py --shape smollm2-135m --seq 2048 --micro-batch 8 --steps 3 --warmup 3
  --out $OUT/train_throughput_profiled.jsonl"
timeout "${PROFILE_LIMIT:-150}" $SMOL --modes stack+compile --profile-dir "$OUT/compiled_eager" \
  --label "compiled eager-step profile" 2>&1 | quiet | tee "$OUT/profile.log"
if [ "${STEADY:-0}" = 1 ]; then
  timeout "${PROFILE_LIMIT:-150}" $SMOL --modes stack+compile+graph --profile-dir "$OUT/steady" \
    --label "steady-step profile" 2>&1 | quiet | tee -a "$OUT/profile.log"
fi
ls -la "$OUT"
