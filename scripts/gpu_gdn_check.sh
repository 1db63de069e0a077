#!/usr/bin/env bash
# GPU machine (device `run` tool, carry [".whl"]): the GDN correctness proof, then a quick throughput
# measurement of the default path with profiles of one Stage-1 and one Stage-2 step.
# Results under $OUT (or bench/results): gdn_correctness.{md,json}, train_throughput_check.jsonl, profile.md, log.
set -uo pipefail
OUT=${OUT:-bench/results}
source scripts/gpu_env.sh
{
  python3 bench/gdn_correctness.py --out-dir "$OUT" ${CORRECTNESS_ARGS:-}
  if [ "${SKIP_THROUGHPUT:-0}" != 1 ]; then
    python3 bench/train_throughput.py --shape smollm2-135m --seq 2048 --micro-batch 8 --steps 4 --warmup 3 \
      --gdn-backends auto --baseline --profile-dir "$OUT" --out "$OUT/train_throughput_check.jsonl"
  fi
} 2>&1 | grep -v "it/s\]\|step/s\]\|s/step\]" | tee "$OUT/gpu_gdn_check.log"
