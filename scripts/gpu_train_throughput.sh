#!/usr/bin/env bash
# Training throughput on the GPU machine (device `run` tool, carry [".whl"]), one process per shape, every
# row of a shape from the same process: plain fine-tuning of the teacher and Stage 1 / Stage 2 on the path
# `hybrid convert` runs (GDN auto), in each mode of $MODES: 'plain' (before: Stage 1's mixers one after
# another, every op eager, every kernel launched) and '+'-joined switches: stack (Stage 1's mixers as one
# batched computation, the default), compile (parallel.compile), graph (each optimiser step replayed from a
# CUDA graph, parallel.cuda_graph). A replayed step runs the same kernels: its losses must match the launched step's.
# Random weights (throughput does not depend on them). Results: $OUT/train_throughput.jsonl, a log, and a
# profile of one step per stage of the last combination.
# First the check that a replayed step trains as a launched one (tests/test_cuda_graph.py; .whl/ carries pytest).
# PRESET_MEMORY=1 adds peak memory at the `small` and `paper` presets' micro-batch shapes.
set -uo pipefail
OUT=${OUT:-bench/results}
source scripts/gpu_env.sh
MODES=${MODES:-plain stack stack+compile stack+graph stack+compile+graph}
TT="python3 bench/train_throughput.py --out $OUT/train_throughput.jsonl"
{
  timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py
  timeout "${SMOL_LIMIT:-400}" $TT --shape smollm2-135m --seq 2048 --micro-batch 8 --steps "${STEPS:-6}" --warmup 3 \
    --modes $MODES --baseline --profile-dir "$OUT" --label modes
  if [ "${QWEN:-1}" = 1 ]; then
    timeout "${QWEN_LIMIT:-200}" $TT --shape qwen2.5-1.5b --seq 2048 --micro-batch 4 --steps "${QWEN_STEPS:-3}" --warmup 2 \
      --modes $MODES --baseline --label modes
  fi
  if [ "${PRESET_MEMORY:-0}" = 1 ]; then
    for shape in smollm2-135m qwen2.5-1.5b; do
      $TT --shape $shape --seq 512 --micro-batch 16 --steps 2 --warmup 1 --stages 1 --label "preset small stage1"
      $TT --shape $shape --seq 512 --micro-batch 32 --steps 2 --warmup 1 --stages 1 --label "preset paper stage1"
      $TT --shape $shape --seq 1024 --micro-batch 8 --steps 2 --warmup 1 --stages 2 --ratio 0.0334 --label "preset small candidate"
      $TT --shape $shape --seq 4096 --micro-batch 4 --steps 2 --warmup 1 --stages 2 --ratio 0.0334 --label "preset paper candidate"
      $TT --shape $shape --seq 4096 --micro-batch 4 --steps 2 --warmup 1 --stages 2 --label "preset paper stage2"
    done
  fi
} 2>&1 | grep -v "it/s\]\|step/s\]\|s/step\]" | tee "$OUT/train_throughput.log"
