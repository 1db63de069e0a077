#!/usr/bin/env bash
# KL-guided (GA-S2) vs uniform vs GA-S1 layer choice at equal budget: SmolLM2-135M, 8 of 30 layers
# softmax, on one GPU. Run from the repo root through the device tool, one phase per call (each phase
# fits a 10-minute call; the machine keeps /root/x between calls while it is warm):
#
#   prep     carry [.whl, .device/smol.gguf.aa, .device/en-train-4k.jsonl.xz, .device/en-mix-validation.jsonl.xz]
#   select   carry [.whl, .device/smol.gguf.ab]        joins the GGUF; Stage 1, GA-S2 and GA-S1 rankings
#   distill  carry [.whl]                              Stage 2 for each layer choice; bench/selection_quality.py
#
# .device/ holds the SmolLM2 GGUF split with `split -b 50000000` and the first 4,000 documents of
# ../shared/data/en-mix-train.jsonl (~4.5M tokens). Results land in $OUT.
set -euo pipefail
PHASE=${1:?phase: prep | select | distill}
X=/root/x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HYBRID_CACHE=$X/cache TQDM_MININTERVAL=10
OUT=${OUT:-$X/out}
mkdir -p "$X" "$OUT"

TEACHER=$X/smollm2.gguf
DATA=$X/en-train-4k.jsonl.xz
SETTINGS=(
  --set eval_tokens=65536
  --set stage1.steps=80 --set stage1.seq_len=512 --set stage1.batch=32 --set stage1.micro_batch=32
  --set stage1.warmup_steps=8 --set stage1.save_every=20
  --set score.candidate.train.steps=4 --set score.candidate.train.seq_len=1024
  --set score.candidate.train.batch=16 --set score.candidate.train.micro_batch=16
  --set score.candidate.train.eval_every=0 --set score.eval_blocks=16
  --set stage2.train.steps=60 --set stage2.train.seq_len=1024 --set stage2.train.batch=16
  --set stage2.train.micro_batch=16 --set stage2.train.save_every=20 --set stage2.train.eval_every=0
)
hybrid() { python3 -m distill.cli "$@" --teacher "$TEACHER" --data "$DATA" --preset small --device cuda --seed 0 "${SETTINGS[@]}"; }

case $PHASE in
  prep)
    cp .device/smol.gguf.aa .device/en-train-4k.jsonl.xz .device/en-mix-validation.jsonl.xz "$X/"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, gguf; from kernels.gdn import fla_available; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'fla', fla_available())"
    ;;
  select)
    cat "$X/smol.gguf.aa" .device/smol.gguf.ab > "$TEACHER"
    sha256sum "$TEACHER"
    time hybrid align --out "$X/stage1"
    time hybrid score --stage1 "$X/stage1" --selector ga-s2 --k 8 --out "$X/rank-ga-s2"
    time hybrid score --stage1 "$X/stage1" --selector ga-s1 --k 8 --out "$X/rank-ga-s1"
    cp "$X/rank-ga-s2/ranking.json" "$OUT/ranking-ga-s2.json"
    cp "$X/rank-ga-s1/ranking.json" "$OUT/ranking-ga-s1.json"
    cp "$X/stage1/metrics.json" "$OUT/stage1-metrics.json"
    ;;
  distill)
    time hybrid distill --stage1 "$X/stage1" --ranking "$X/rank-ga-s2/ranking.json" --k 8 --out "$X/ga-s2"
    time hybrid distill --stage1 "$X/stage1" --softmax-layers 1,5,9,13,16,20,24,28 --out "$X/uniform"
    time hybrid distill --stage1 "$X/stage1" --ranking "$X/rank-ga-s1/ranking.json" --k 8 --out "$X/ga-s1"
    for v in ga-s2 uniform ga-s1; do cp "$X/$v/metrics.json" "$OUT/stage2-metrics-$v.json"; done
    time python3 -m bench.selection_quality --teacher "$TEACHER" --data "$X/en-mix-validation.jsonl.xz" \
      --hybrid ga-s2="$X/ga-s2" --hybrid uniform="$X/uniform" --hybrid ga-s1="$X/ga-s1" \
      --device cuda --out "$OUT/selection_quality.json" | tee "$OUT/selection_quality.md"
    ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
