#!/usr/bin/env bash
# Fills .whl-eval/ (git-ignored) with lm-evaluation-harness and what it needs beyond the GPU machine's image
# (its image has accelerate, absl-py, xxhash, pandas, pyarrow, sacrebleu, scikit-learn, huggingface_hub 1.33):
# Python 3.12 wheels for `gpu_quality_experiment.sh eval` with TASKS="... cloze" (carry [".whl", ".whl-eval"]).
# Runs here, where PyPI is reachable; versions are the ones the test suite runs with.
set -euo pipefail
DEST=${1:-.whl-eval}
mkdir -p "$DEST"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
  lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 evaluate==0.4.6 multiprocess==0.70.19 pytablewriter==1.2.1 \
  more-itertools==11.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 \
  tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 nltk==3.10.4
pip wheel -q --no-deps -w "$DEST" rouge-score==0.1.2 word2number==1.1 sqlitedict==2.1.0  # published as sources only
du -sh "$DEST"
