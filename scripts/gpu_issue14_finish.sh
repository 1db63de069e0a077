#!/usr/bin/env bash
# Issue 14's last GPU measurements in one device call (carry [".whl"]), most important first, so a call cut
# off at its limit still returns the front of the list under $OUT:
#   1. where the H100's last 5 % goes: one replayed (steady) step per stage under the profiler, SmolLM2 shape,
#      8 x 2048, every switch on (the 2026-12-06 H100 table: Stage 1 142.6K, Stage 2 94.9K tokens/s;
#      bench/results/train_throughput.md). On an H200 too, marked as such; SMOL_TABLE=1 reruns the whole
#      plain-vs-switches table first (scripts/gpu_train_throughput.sh, the CUDA-graph check included);
#   2. the Qwen2.5-1.5B shape's Stage 2 with every switch on (its plain rows and Stage 1 ran on 2026-12-06:
#      bench/results/train_throughput_modes_qwen_h200.jsonl; compile + capture of this shape needs ~3 minutes);
#   3. peak memory at the `paper` preset's micro-batches (Stage 1 32 x 512, Stage 2 4 x 4096) for the Qwen2.5-1.5B
#      shape (the 2026-12-06 H100 run: Qwen's Stage 2 with the switches 23.6K tokens/s; stacked Stage 1 at 4 x 4096
#      ran out of memory before the batch slicing of kernels/gdn_fla.py).
# The correctness cases (scripts/gpu_gdn_rest.sh) are done: bench/results/gdn_correctness.md.
set -uo pipefail
OUT=${OUT:-bench/results}
source scripts/gpu_env.sh
quiet() { grep -v "it/s\|s/it\|step/s\|s/step"; }
if [ "${SMOL_TABLE:-0}" = 1 ]; then
  MODES="plain stack+compile+graph" QWEN=0 SMOL_LIMIT=${SMOL_LIMIT:-220} bash scripts/gpu_train_throughput.sh
fi
timeout "${PROFILE_LIMIT:-150}" python3 bench/train_throughput.py --shape smollm2-135m --seq 2048 --micro-batch 8 \
  --steps 3 --warmup 3 --modes stack+compile+graph --out "$OUT/train_throughput_profiled.jsonl" \
  --profile-dir "$OUT/steady" --label "steady-step profile" 2>&1 | quiet | tee "$OUT/profile.log"
TT="python3 bench/train_throughput.py --shape qwen2.5-1.5b"
timeout "${QWEN_LIMIT:-240}" $TT --out "$OUT/train_throughput.jsonl" --seq 2048 --micro-batch 4 --steps 3 --warmup 2 \
  --modes stack+compile+graph --stages 2 --label modes 2>&1 | quiet | tee "$OUT/train_throughput_qwen.log"
# the paper preset's micro-batches with the defaults: Stage 1 32 x 512 (stacked: its torch backward parts run over
# batch slices since the 2026-12-06 out-of-memory at 4 x 4096), Stage 2 4 x 4096
timeout "${MEMORY_LIMIT:-240}" $TT --out "$OUT/train_throughput_memory.jsonl" --stages 1 --seq 512 --micro-batch 32 \
  --steps 1 --warmup 1 --label "paper preset micro-batch" 2>&1 | quiet | tee "$OUT/memory.log"
timeout "${MEMORY_LIMIT:-240}" $TT --out "$OUT/train_throughput_memory.jsonl" --stages 2 --seq 4096 --micro-batch 4 \
  --steps 1 --warmup 1 --label "paper preset micro-batch" 2>&1 | quiet | tee -a "$OUT/memory.log"
ls -la "$OUT"
