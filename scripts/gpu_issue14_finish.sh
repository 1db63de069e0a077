#!/usr/bin/env bash
# Issue 14's open GPU measurements in one device call (carry [".whl"]), most important first, so a call cut off at
# its limit still returns the front of the list under $OUT:
#   0. tests/test_cuda_graph.py on the GPU (~95 s with its compiles; 5 passed on 2026-12-07): replayed steps train as launched ones, a step that runs out
#      of memory is captured again in smaller forwards, and a capture that fails leaves the stream, the memory
#      pool and the random-number generator usable (distill/cuda_graph.py's `_abandon_capture`, eleventh
#      session); then (SMOL_TABLE=1, the default) the SmolLM2 plain-vs-switches table against the targets. On
#      2026-12-06 (eleventh session, H100) every capture of that table failed while `parallel.compile` also
#      compiled the softmax attention; with that compile reverted, the twelfth session's table replayed every
#      step again (bench/results/train_throughput.md);
#   1. peak memory at the `paper` preset's micro-batches for the Qwen2.5-1.5B shape, with the defaults: Stage 1
#      32 x 512, Stage 2 4 x 4096. On 2026-12-06 (tenth session, H100) both ran out of memory: Stage 1's eager
#      steps fit (the batch slices of kernels/gdn_fla.py) but its CUDA-graph capture did not, and the eager
#      fallback then failed too, the failed capture's pool still held; Stage 2's eager step did not fit. Since
#      then the fallback releases the pool (torch never does after a failed capture) and the loop reruns a step
#      that runs out of memory in smaller forwards (the rows' `pieces` and `peak_mem_timed_gib` say how it ran);
#      on 2026-12-07 (eighteenth session) Stage 1 aborted in `~CUDAGraph` instead, a pool released twice after a
#      capture that failed while instantiating; `_abandon_capture` now lets the graph release it, and in the
#      nineteenth session both rows ran (Stage 1 eagerly after a failed capture, Stage 2 in 2 forwards;
#      bench/results/train_throughput.md);
#   2. which tensors the cast kernels of SmolLM2's step copy (the 2026-12-06 steady profile,
#      bench/results/train_throughput_profile_steady_h100.md, names dtype casts among the last 5 %): one step
#      compiled but not replayed, so its aten ops show, with the copies grouped by input shape;
#   3. STEADY=1: the replayed step under the profiler again (every switch on), e.g. after a change to the step.
# Peak memory at the presets' other micro-batches (bench/results/train_throughput.md, "Peak GPU memory"):
#   MODES="stack+compile+graph" SMOL_LIMIT=1 QWEN=0 PRESET_MEMORY=1 bash scripts/gpu_train_throughput.sh
# SMOL_TABLE=0 skips that table (scripts/gpu_train_throughput.sh, ~220 s, the CUDA-graph tests included). Done and recorded in bench/results/train_throughput.md: the steady profile, the Qwen shape's
# Stage 2 with the switches; the correctness cases (scripts/gpu_gdn_rest.sh): bench/results/gdn_correctness.md.
set -uo pipefail
OUT=${OUT:-bench/results}
source scripts/gpu_env.sh
quiet() { grep -v "it/s\|s/it\|step/s\|s/step"; }
if [ "${SMOL_TABLE:-1}" = 1 ]; then
  MODES="plain stack+compile+graph" QWEN=0 SMOL_LIMIT=${SMOL_LIMIT:-220} bash scripts/gpu_train_throughput.sh
else
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py 2>&1 | tail -3 | tee "$OUT/cuda_graph_tests.log"
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
