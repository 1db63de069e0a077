#!/usr/bin/env bash
# Everything issue 14 needs from the GPU in one call (device `run` tool, carry [".whl"]), in order of
# importance, each part time-boxed so a slow part cannot starve the next:
#   1. the GDN correctness proof (bench/gdn_correctness.py)
#   2. SmolLM2-135M shape: Stage 1 / Stage 2 before (torch GDN) and after (default), plain fine-tuning,
#      profiles of one step per stage on the default path
#   3. Qwen2.5-1.5B shape: the same, micro-batch 4 x 2048
# Results under $OUT: gdn_correctness.{md,json}, train_throughput.jsonl, profile.md, *.log
set -uo pipefail
OUT=${OUT:-bench/results}
source scripts/gpu_env.sh
TT="python3 bench/train_throughput.py --out $OUT/train_throughput.jsonl"
quiet() { grep -v "it/s\]\|step/s\]\|s/step\]"; }
timeout "${T_CHECK:-200}" python3 bench/gdn_correctness.py --out-dir "$OUT" 2>&1 | quiet | tee "$OUT/gdn_correctness.log"
timeout "${T_SMOL:-170}" $TT --shape smollm2-135m --seq 2048 --micro-batch 8 --steps 5 --warmup 3 \
  --gdn-backends torch auto --baseline --profile-dir "$OUT" --label before-after 2>&1 | quiet | tee "$OUT/smollm2.log"
timeout "${T_QWEN:-190}" $TT --shape qwen2.5-1.5b --seq 2048 --micro-batch 4 --steps 3 --warmup 2 \
  --gdn-backends torch auto --baseline --label before-after 2>&1 | quiet | tee "$OUT/qwen.log"
