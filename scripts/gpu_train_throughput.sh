#!/usr/bin/env bash
# Stage 1 and Stage 2 training throughput on the GPU machine (run from the repo root, e.g. through the
# device `run` tool with carry [".whl"]). SmolLM2-135M's architecture (config below) with random
# weights: throughput does not depend on the weights' values, and it spares carrying the 98 MB GGUF.
# Results: JSON lines in $OUT/train_throughput.jsonl (or bench/results/ without $OUT).
set -euo pipefail
OUT=${OUT:-bench/results}
if compgen -G ".whl/flash_linear_attention-*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/fla_core-*.whl .whl/flash_linear_attention-*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
mkdir -p /tmp/smollm2-135m
cat > /tmp/smollm2-135m/config.json <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": false, "attention_dropout": 0.0,
 "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
 "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 8192, "mlp_bias": false,
 "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "rms_norm_eps": 1e-05,
 "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": true, "vocab_size": 49152}
JSON
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; from kernels.gdn import fla_available; print('torch', torch.__version__, 'transformers', transformers.__version__, 'fla', fla_available())"
python3 bench/train_throughput.py --config /tmp/smollm2-135m/config.json --seq 2048 \
  --micro-batch "${MICRO_BATCH:-8}" --steps "${STEPS:-10}" --warmup 3 --out "$OUT/train_throughput.jsonl"
