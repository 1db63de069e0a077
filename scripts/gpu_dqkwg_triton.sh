#!/usr/bin/env bash
# Issue 14: our Triton `chunk_bwd_dqkwg` (kernels/gdn_dqkwg.py, GDN backend `fla-triton-dqkwg`) on the GPU, in one
# device call (carry [".whl"]), proof first so a call cut off at its limit still returns it under $OUT:
#   0. the kernel alone (bench/kernels_bench.py --sections dqkwg): its errors against the float64 torch form on
#      bf16 inputs, and its time per launch config (BK, BV, warps, stages) against the torch form, at a stacked
#      SmolLM2 Stage-1 micro-batch and at the 1.5B shape;
#   1. correctness: outputs and every gradient of `fla-triton-dqkwg` and of the torch form `fla-torch-dqkwg`
#      against the float64 recurrence, both head layouts (SmolLM2 9 x 64, Qwen2.5-1.5B 12 x 128), T = 1 ... 2048
#      and padded batches (LENGTHS= and PADDED= choose them, e.g. LENGTHS="4096 8192" PADDED=8192 for the 8K
#      rows: ~250 s for both layouts on an H100), each layout under its own limit;
#   2. speed: SmolLM2 shape at 8 x 2048, Stage 1 and Stage 2 with every switch on (stack + compile + CUDA graph),
#      the two GDN paths side by side in one process, with plain fine-tuning of the teacher as the baseline.
# The CPU suite checks the kernel in float32 under TRITON_INTERPRET=1 (tests/test_gdn_dqkwg.py); the interpreter
# cannot run bf16 dots, so step 1 is the first check of the bf16 kernel. Every row of step 1 passed and step 2
# was faster on an H100 with Triton 3.6 (2026-12-07, bench/results/dqkwg_triton_h100/), so `auto` picks it there
# (kernels.gdn.auto_cuda_backend): run all three again before adding a Triton version to TRITON_DQKWG_CHECKED.
# On an H100 (twentieth session) the kernel part took ~110 s and the check ~170 s for the SmolLM2 layout (the
# 1.5B layout is slower), the speed part takes up to 280 s: run them as three calls on the warm machine,
# PARTS=kernel, PARTS=check (LAYOUTS= picks layouts, each under CHECK_LIMIT) and PARTS=speed.
set -uo pipefail
OUT=${OUT:-bench/results}
PARTS=${PARTS:-kernel check speed}
source scripts/gpu_env.sh
quiet() { grep -v "it/s\|s/it\|step/s\|s/step"; }
part() { [[ " $PARTS " == *" $1 "* ]]; }
part kernel && timeout "${KERNEL_LIMIT:-150}" python3 bench/kernels_bench.py "$OUT/dqkwg_kernel.md" --sections dqkwg \
  2>&1 | tail -30
for layout in ${LAYOUTS:-smollm2 qwen2.5-1.5b}; do  # one limit each: the SmolLM2 layout alone took ~170 s
  part check && timeout "${CHECK_LIMIT:-240}" python3 bench/gdn_correctness.py \
    --backends fla-triton-dqkwg fla-torch-dqkwg --layouts "$layout" \
    --skip-side-checks --skip-speed --lengths ${LENGTHS:-1 63 64 100 1000 2048} --padded-lengths ${PADDED:-100 2048} \
    --out-dir "$OUT/dqkwg_correctness_$layout" 2>&1 | quiet | tail -30
done
part speed && timeout "${SPEED_LIMIT:-280}" python3 bench/train_throughput.py --shape smollm2-135m --seq 2048 \
  --micro-batch 8 --steps 6 --warmup 3 --modes stack+compile+graph --baseline \
  --gdn-backends fla-torch-dqkwg fla-triton-dqkwg \
  --out "$OUT/train_throughput_dqkwg.jsonl" --label "dqkwg: torch vs triton" 2>&1 | quiet | tee "$OUT/throughput.log"
ls -la "$OUT"
