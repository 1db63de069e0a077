#!/usr/bin/env bash
# (Planned, not run on 2026-12-05: the device time went to failed starts; scripts/gpu_all.sh ran instead.)
# Training throughput before/after on the GPU machine, in one process per shape (device `run` tool,
# carry [".whl"]): "torch" = the pure-torch chunked GDN (the path before issue 14), "auto" = what
# `hybrid convert` runs now; plus plain fine-tuning of the same teacher. Random weights (throughput does
# not depend on them). Then peak memory of each stage at the `small` and `paper` presets' micro-batch
# shapes (2 timed steps each, default path). Results: $OUT/train_throughput.jsonl and a log.
set -uo pipefail
OUT=${OUT:-bench/results}
source scripts/gpu_env.sh
TT="python3 bench/train_throughput.py --out $OUT/train_throughput.jsonl"
{
  $TT --shape smollm2-135m --seq 2048 --micro-batch 8 --steps "${STEPS:-5}" --warmup 3 --gdn-backends torch auto --baseline --label before-after
  $TT --shape qwen2.5-1.5b --seq 2048 --micro-batch 4 --steps "${QWEN_STEPS:-3}" --warmup 2 --gdn-backends torch auto --baseline --label before-after
  if [ "${PRESET_MEMORY:-1}" = 1 ]; then
    for shape in smollm2-135m qwen2.5-1.5b; do
      $TT --shape $shape --seq 512 --micro-batch 16 --steps 2 --warmup 1 --stages 1 --label "preset small stage1"
      $TT --shape $shape --seq 512 --micro-batch 32 --steps 2 --warmup 1 --stages 1 --label "preset paper stage1"
      $TT --shape $shape --seq 1024 --micro-batch 8 --steps 2 --warmup 1 --stages 2 --ratio 0.0334 --label "preset small candidate"
      $TT --shape $shape --seq 4096 --micro-batch 4 --steps 2 --warmup 1 --stages 2 --ratio 0.0334 --label "preset paper candidate"
      $TT --shape $shape --seq 4096 --micro-batch 4 --steps 2 --warmup 1 --stages 2 --label "preset paper stage2"
    done
  fi
} 2>&1 | grep -v "it/s\]\|step/s\]\|s/step\]" | tee "$OUT/train_throughput.log"
