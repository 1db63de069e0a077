#!/usr/bin/env bash
# Issue 14: our Triton `chunk_bwd_dqkwg` (kernels/gdn_dqkwg.py, GDN backend `fla-triton-dqkwg`) on the GPU, in one
# device call (carry [".whl"]), proof first so a call cut off at its limit still returns it under $OUT:
#   0. the kernel alone (bench/kernels_bench.py --sections dqkwg): its errors against the float64 torch form on
#      bf16 inputs, and its time per launch config (BK, BV, warps, stages) against the torch form, at a stacked
#      SmolLM2 Stage-1 micro-batch and at the 1.5B shape;
#   1. correctness: outputs and every gradient of `fla-triton-dqkwg` and of today's default `fla-torch-dqkwg`
#      against the float64 recurrence, both head layouts (SmolLM2 9 x 64, Qwen2.5-1.5B 12 x 128), T = 1 ... 2048
#      and padded batches (LENGTHS= adds 8192), then one layer's forward + backward time of each;
#   2. speed: SmolLM2 shape at 8 x 2048, Stage 1 and Stage 2 with every switch on (stack + compile + CUDA graph),
#      the two GDN paths side by side in one process, with plain fine-tuning of the teacher as the baseline.
# The CPU suite checks the kernel in float32 under TRITON_INTERPRET=1 (tests/test_gdn_dqkwg.py); the interpreter
# cannot run bf16 dots, so step 1 is the first check of the bf16 kernel. It becomes `auto`'s choice on Hopper
# with Triton < 3.7.1 (kernels.gdn.resolve_gdn_backend) only if every row of step 1 passes and step 2 is faster.
# The three parts' limits add up to 570 s, under one call's 600; PARTS="kernel check" and PARTS=speed split
# them over two calls on the warm machine.
set -uo pipefail
OUT=${OUT:-bench/results}
PARTS=${PARTS:-kernel check speed}
source scripts/gpu_env.sh
quiet() { grep -v "it/s\|s/it\|step/s\|s/step"; }
part() { [[ " $PARTS " == *" $1 "* ]]; }
part kernel && timeout "${KERNEL_LIMIT:-120}" python3 bench/kernels_bench.py "$OUT/dqkwg_kernel.md" --sections dqkwg \
  2>&1 | tail -30
part check && timeout "${CHECK_LIMIT:-170}" python3 bench/gdn_correctness.py \
  --backends fla-triton-dqkwg fla-torch-dqkwg \
  --skip-side-checks --lengths ${LENGTHS:-1 63 64 100 1000 2048} --padded-lengths 100 2048 \
  --out-dir "$OUT/dqkwg_correctness" 2>&1 | quiet | tail -60
part speed && timeout "${SPEED_LIMIT:-280}" python3 bench/train_throughput.py --shape smollm2-135m --seq 2048 \
  --micro-batch 8 --steps 6 --warmup 3 --modes stack+compile+graph --baseline \
  --gdn-backends fla-torch-dqkwg fla-triton-dqkwg \
  --out "$OUT/train_throughput_dqkwg.jsonl" --label "dqkwg: torch vs triton" 2>&1 | quiet | tee "$OUT/throughput.log"
ls -la "$OUT"
