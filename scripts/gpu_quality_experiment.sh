#!/usr/bin/env bash
# Issue 15's experiment on one GPU: SmolLM2-135M (30 layers) -> one Stage 1 -> layer rankings (GA-S2, the
# cheap kl-restore, GA-S1, the ablation probe) -> Stage 2 hybrids at 1/4 softmax -> `hybrid eval` of the
# teacher and every hybrid. A checkpoint cannot leave the GPU machine, so every phase runs there, one
# device call each, back to back while the machine is warm (it keeps /root/x between calls):
#
#   prep     carry [.whl, .device/en-mix-train.jsonl.xz, .device/en-mix-validation.jsonl.xz, .device/smol.gguf.aa]
#            (RANKINGS=bench/results/quality_h100 reuses committed rankings instead of the score phase)
#   ab       carry [.device/smol.gguf.ab]: the GGUF's second piece (each piece fills one call's 64 MiB beside the
#            tree and that call's other inputs; scripts/fetch_device_inputs.sh cuts them)
#   align    carry [.whl, .device/smol.gguf.ac]   joins the GGUF; Stage 1; kl-restore and reach rankings
#   score    carry [.whl]       GA-S2, GA-S1, ablation, retrieval-head and reach rankings (align and score also
#                               write ga-s2+reach and ablation+reach from those and the reach ranking)
#   distill  carry [.whl]       Stage 2 for each layer choice in $HYBRIDS (default: ga-s2 uniform); TAG names a variant
#                               (e.g. TAG=4k EXTRA="--set stage2.train.seq_len=4096 ..." -> hybrid-ga-s2-k8-s0-4k)
#   eval     carry [.whl]       hybrid eval: teacher + every finished hybrid; rankings and metrics to $OUT
#                               (TASKS="heldout passkey cloze" with carry [.whl, .whl-eval] adds the lm-eval task
#                               of bench/recall_cloze.py: names recalled from 250+ tokens back in real prose)
#   teacher  carry [.whl, .device/smol.gguf.ac]   (after ab) joins the GGUF only (a session that
#                               restores a hybrid instead of running Stage 1)
#   keep / restore              a hybrid back to this machine and up again (below)
#
# Stage 2 at 4K for 32.8M tokens (bench/results/quality_h100/stage2_4k_long/: 438 s on an H100 with start-up and
# evals, so give it LIMIT=540; save_every=100 keeps a cut-off run resumable by the same phase):
#   HYBRIDS=ga-s2 TAG=4k-long LIMIT=540 EXTRA="--set stage2.train.seq_len=4096 --set stage2.train.batch=8
#     --set stage2.train.micro_batch=8 --set stage2.train.steps=1000 --set stage2.train.save_every=100
#     --set stage2.train.eval_every=500"            (add --set stage2.min_doc_tokens=2048 and TAG=4k-longdocs
#                                                    to train on documents of at least 2,048 tokens only)
# Twice the tokens (65.5M, ~730 s of training): steps=2000 and TAG=4k-2x, and the same distill call twice: the
# second resumes from the first one's last checkpoint (save_every=100). Ran on 2026-12-06 (LIMIT=540, then 420:
# 528 s + 388 s; bench/results/quality_h100/stage2_4k_2x/).
# Runs before 2026-12-06's fix of distill/data.py trained on documents cut at 8,000 characters (an EOS every ~2K
# tokens of a long document); tag runs after it apart (e.g. TAG=4k-whole) when comparing with those. Both
# variants ran (bench/results/quality_h100/stage2_4k_whole/: distill 432 s and 444 s; eval of the teacher and two
# hybrids with TASKS="heldout passkey cloze" 88 s).
# .whl/, .whl-eval/ and .device/ (the SmolLM2 GGUF split with `split -b 40000000`, ../shared/data/en-mix-*.jsonl.xz)
# come from `bash scripts/fetch_device_inputs.sh`, once per checkout.
# Every step is resumable: a phase cut off by the call's limit continues when the same phase runs again.
# Budgets: Stage 1 300 x 64 x 512 = 9.8M tokens; GA-S2 candidates 8 x 16 x 1024 = 131K tokens each;
# Stage 2 300 x 16 x 2048 = 9.8M tokens per hybrid (0.68 epochs of the 14.5M-token mix each).
#
# The `small` preset's Stage-2 mixer LR is 2e-4 since 2026-12-06 (bench/results/quality_h100/stage2_4k_lr2/); runs
# before it used 1e-4: add `--set stage2.train.lr=1e-4` to EXTRA to repeat one of them.
# Layer 7 (bench/results/quality_h100/retrieval_heads/restore_each/: restored alone into the 65.5M GA-S2 hybrid, it
# brings back the far passkeys): HYBRIDS="ga-s2-l7=1,2,5,7,8,17,18,20 retrieval" TAG=4k-lr2 on the 4K settings.
# Layer 7 for layer 5 (bench/results/quality_h100/swap_l7_for_l5/: swapped into the 65.5M hybrid on a CPU, no Stage 2
# after it, passkey@2K 0.97 at KL 0.112): HYBRIDS="l7-for-l5=1,2,7,8,17,18,20,24" TAG=4k-lr2 trains those 8 from Stage 1.
# GA-S2 with the reach layers in front, the default selector (bench/results/quality_h100/reach/: the teacher's layers
# 18 and 7 lose the far passkey when clipped to 256 tokens; ga_s2_reach/: trained from Stage 1, passkey@4K 0.88
# against GA-S2's 0.53): RANKINGS= brings the CPU's 2K reach ranking (ranking-reach.json; the 4K one did not fit in
# align's LIMIT=330 on 2026-12-07), `align` writes rank-ga-s2+reach from it and GA-S2's, then HYBRIDS="ga-s2+reach"
# TAG=4k-lr2 on the 4K settings trains 1, 2, 5, 7, 8, 17, 18, 20. Seeds 0 and 1 of it and of ga-s2 ran
# (ga_s2_reach/, ga_s2_reach_seed1/, ga_s2_seed1/); seed 2 of both is still to run.
# The ablation probe's eight (0, 1, 16, 18, 19, 20, 23, 24; bench/results/quality_h100/probe_and_eighth/: passkey@2K 0.96
# at 5.9M tokens, GA-S2 0.45-0.58) against the default at one budget: HYBRIDS="ablation ablation+reach ga-s2+reach"
# TAG=4k-lr2 on the 4K settings, or the three at the 5.9M recipe of probe_and_eighth/README.md (align writes
# rank-ablation+reach: 0, 1, 7, 16, 18, 19, 20, 23, the probe's eight with layer 7 for 24).
# The passkey-ablation probe's eight (bench/results/quality_h100/passkey_ablation/, CPU) and uniform at its other
# phase (`uniform` is each span's centre, 1,5,9,13,16,20,24,28), SEED=2 at the 5.9M recipe, ran on 2026-12-07
# (uniform_start_and_pk_probe/: passkey 1.00 at 2K and 4K at KL 0.178):
# HYBRIDS="pk-ablation=0,1,3,7,16,18,19,23 uniform-start=0,3,7,11,15,18,22,26". Next: the probe's eight beside
# ga-s2+reach at the 4K settings, HYBRIDS="pk-ablation=0,1,3,7,16,18,19,23 ga-s2+reach" TAG=4k-lr2.
# The reach layers of the harder recall tasks too (reach_tasks/: on the teacher, multi-key, associative and variable
# tracking also lean on layers 14 and 23): HYBRIDS="reach-all=1,7,8,14,17,18,20,23" TAG=4k-lr2 on the 4K settings.
# Long-range copies in every Stage-2 sequence (distill.data.CopySpans; TAG=4k-copy, `--set
# stage2.copies.per_sequence=4` on the 4K settings): the KL then asks for text 1,024-4,000 tokens back.
# Cosine instead of the constant Stage-2 LR (TAG=4k-cos, `--set stage2.train.schedule=cosine --set
# stage2.train.warmup_steps=20` on the 4K settings): worse at 32.8M tokens (bench/results/quality_h100/stage2_4k_cos/).
#
# A hybrid can outlive the machine (Stage 2 longer than one session's device time): `keep` sends it back in
# 16 MB pieces, four per call (PART=0, 1, ...; each call's files land under the run tool's files_at: move
# them, NAME.sha256 with them, to .device/keep/, git-ignored), and in a later session `restore` takes them up
# again, four per call, before `distill` goes on with FROM=NAME (`hybrid distill --from`: the same layers, the
# data order where it stopped):
#   KEEP=hybrid-ga-s2-k8-s0-4k PART=0 bash scripts/gpu_quality_experiment.sh keep      carry [] (then PART=1, ...)
#   prep; ab; teacher (the GGUF joined, no Stage 1)
#   RESTORE=hybrid-ga-s2-k8-s0-4k bash scripts/gpu_quality_experiment.sh restore   carry [4 of .device/keep/*]
#   FROM=hybrid-ga-s2-k8-s0-4k TAG=more EXTRA="... --set stage2.train.warmup_steps=20" ... distill
# A 4K SmolLM2 hybrid in bf16 is ~20 pieces: 5 calls each way, against ~260 s for prep and align again.
set -uo pipefail
PHASE=${1:?phase: prep | ab | align | teacher | score | distill | eval | keep | restore}
X=${X:-/root/x}             # DEVICE=cpu X=/tmp/qx EXTRA="--set ..." rehearses the phases on a CPU at toy budgets
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$X/out}
PIECE=16000000              # bytes: files that come back from the device may not exceed 16 MiB each
case $PHASE in
  ab) mkdir -p "$X" && cp .device/smol.gguf.a[ab] "$X/" && ls -la "$X"; exit $? ;;  # whichever pieces were carried
  keep)  # KEEP=NAME PART=i: pieces 4i .. 4i+3 of $X/NAME (tar, split) to $OUT
    name=${KEEP:?KEEP=NAME of a directory under $X}; dir=$X/keep/$name
    if [[ ! -f $dir/$name.sha256 ]]; then
      rm -rf "$dir" && mkdir -p "$dir" || exit 1
      tar cf - -C "$X" --exclude="*.work" "$name" | split -b $PIECE -d -a 2 - "$dir/$name.tar." || exit 1
      (cd "$dir" && cat "$name".tar.* | sha256sum | cut -d' ' -f1 > "$name.sha256")
    fi
    mkdir -p "$OUT"; pieces=("$dir/$name".tar.*); part=${PART:-0}
    cp "${pieces[@]:$((4 * part)):4}" "$dir/$name.sha256" "$OUT/" || exit 1
    echo "$name: ${#pieces[@]} pieces (PART=0..$(( (${#pieces[@]} - 1) / 4 ))), sha256 $(cat "$dir/$name.sha256")"
    ls -la "$OUT"; exit 0 ;;
  restore)  # RESTORE=NAME: the carried pieces .device/keep/NAME.tar.* join the ones earlier calls brought
    name=${RESTORE:?RESTORE=NAME}; dir=$X/incoming/$name
    mkdir -p "$dir" && cp .device/keep/"$name".tar.* .device/keep/"$name".sha256 "$dir/" 2>/dev/null
    echo "$name: $(ls "$dir" | grep -c '\.tar\.') pieces here"
    if [[ -f $dir/$name.sha256 ]] && [[ $(cat "$dir/$name".tar.* | sha256sum | cut -d' ' -f1) == $(cat "$dir/$name.sha256") ]]; then
      rm -rf "${X:?}/$name" && cat "$dir/$name".tar.* | tar xf - -C "$X" && rm -rf "$dir" && echo "restored $X/$name"
    else
      echo "$name: not complete yet (or $name.sha256 not carried yet); carry the rest"
    fi
    exit 0 ;;
esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# .whl-eval/ (lm-evaluation-harness and what it needs beyond the GPU image, 12 MB; scripts/fetch_eval_wheels.sh)
if [[ $PHASE == eval ]] && compgen -G ".whl-eval/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl-eval/*.whl || echo ".whl-eval/ not installed: its wheels are for the GPU machine's Python 3.12"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HYBRID_CACHE=$X/cache TQDM_MININTERVAL=15
mkdir -p "$X" "$OUT" "$X/cache/downloads"
LIMIT=${LIMIT:-570}   # seconds this call may spend on training before it returns (the call's limit is 600)
DEADLINE=$(( $(date +%s) + LIMIT ))
left() { echo $(( DEADLINE - $(date +%s) )); }

DATA=${DATA:-$X/en-mix-train.jsonl.xz}  # DATA=demo: the teacher-only selectors of `score` read no training text
VALID=$X/en-mix-validation.jsonl.xz
SETTINGS=(
  --set eval_tokens=65536
  --set stage1.steps=300 --set stage1.seq_len=512 --set stage1.batch=64 --set stage1.micro_batch=64
  --set stage1.warmup_steps=15 --set stage1.save_every=50
  --set score.candidate.train.steps=8 --set score.candidate.train.seq_len=1024
  --set score.candidate.train.batch=16 --set score.candidate.train.micro_batch=16
  --set score.candidate.train.eval_every=4 --set score.eval_blocks=16
  --set stage2.train.steps=300 --set stage2.train.seq_len=2048 --set stage2.train.batch=16
  --set stage2.train.micro_batch=16 --set stage2.train.save_every=50 --set stage2.train.eval_every=100
  ${EXTRA:-}
)
hybrid() {
  local t; t=$(left)
  if (( t < 30 )); then echo "skipped (time): hybrid $*"; return 0; fi
  local start=$SECONDS
  timeout "$t" python3 -m distill.cli "$@" --teacher smollm2-135m --data "$DATA" \
    --preset small --device "$DEVICE" --seed "${SEED:-0}" "${SETTINGS[@]}" 2>&1 | grep -v "it/s\|s/it\|step/s\|s/step"
  echo "$(( SECONDS - start )) s: hybrid $*" | tee -a "$X/wall.log"
}
rank() {  # rank SELECTOR [hybrid score args]: skipped where a ranking is there already (RANKINGS=, or a finished run)
  local sel=$1; shift
  if [[ -f $X/rank-$sel/ranking.json ]]; then echo "ranking $sel: kept $X/rank-$sel/ranking.json"; return 0; fi
  hybrid score "$@" --selector "$sel" --k 8 --out "$X/rank-$sel"
}
with_reach() {  # with_reach BASE: rank-BASE+reach from two rankings this machine holds, nothing scored again
  local base=$1
  [[ -f $X/rank-$base/ranking.json && -f $X/rank-reach/ranking.json ]] || { echo "$base+reach: a ranking is missing"; return 0; }
  mkdir -p "$X/rank-$base+reach"
  python3 -c "import sys; from distill.selection import Ranking, with_reach as w
r = w(Ranking.load(sys.argv[1]), Ranking.load(sys.argv[2]), float(sys.argv[3])); r.save(sys.argv[4])
print(r.selector, 'order', r.order, 'top 8', r.choose(8))" "$X/rank-$base/ranking.json" "$X/rank-reach/ranking.json" \
    "${REACH_THRESHOLD:-0.75}" "$X/rank-$base+reach/ranking.json"
}
join_teacher() {
  cat "$X/smol.gguf.aa" $(ls .device/smol.gguf.ab 2>/dev/null || echo "$X/smol.gguf.ab") .device/smol.gguf.ac > "$X/cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf"
  sha256sum "$X/cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf"
}
k_of() { python3 -c "import sys; from distill.placement import k_from_ratio; print(k_from_ratio(float(sys.argv[1]), 30))" "$1"; }

case $PHASE in
  prep)
    cp .device/en-mix-train.jsonl.xz .device/en-mix-validation.jsonl.xz "$X/" || exit 1
    cp .device/smol.gguf.aa "$X/" 2>/dev/null || echo "smol.gguf.aa not carried: carry it to an ab call"
    # RANKINGS=DIR reuses the rankings an earlier run committed (DIR/ranking-NAME.json), e.g. for more seeds
    for r in ${RANKINGS:+$RANKINGS/ranking-*.json}; do
      n=${r##*/ranking-}; n=${n%.json}; mkdir -p "$X/rank-$n" && cp "$r" "$X/rank-$n/ranking.json"
    done
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, transformers, gguf, pyarrow, huggingface_hub; from kernels.gdn import fla_available; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'fla', fla_available(), \
'pyarrow', pyarrow.__version__, 'huggingface_hub', huggingface_hub.__version__)"
    ;;
  teacher)
    join_teacher
    ;;
  align)
    join_teacher
    hybrid align --out "$X/stage1"
    rank kl-restore --stage1 "$X/stage1"
    rank reach  # the teacher alone: each layer's attention clipped to 256 tokens on far-needle passkey prompts
    with_reach ga-s2; with_reach ablation
    ;;
  score)
    rank ga-s2 --stage1 "$X/stage1"
    rank ga-s1 --stage1 "$X/stage1"
    rank ablation
    rank retrieval
    rank reach
    with_reach ga-s2; with_reach ablation
    for r in "$X"/rank-*/ranking.json; do n=${r%/ranking.json}; cp "$r" "$OUT/ranking-${n##*/rank-}.json"; done
    cp "$X"/rank-reach/layer_scores.png "$OUT/ranking-reach.png" 2>/dev/null
    ;;
  distill)
    if [[ -n ${FROM:-} ]]; then  # a hybrid this machine holds (a distill here, or `restore`), trained further
      hybrid distill --from "$X/$FROM" --out "$X/$FROM-${TAG:-more}"
      exit 0
    fi
    # NAME or NAME@RATIO; NAME is a selector whose ranking phase `score` wrote, or `uniform`;
    # NAME=LAYERS trains those softmax layers (e.g. mix=1,2,7,17,20,21,22,23)
    for spec in ${HYBRIDS:-ga-s2 uniform}; do
      if [[ $spec == *=* ]]; then
        layers=${spec#*=}; k=$(( $(tr -cd , <<< "$layers" | wc -c) + 1 ))
        hybrid distill --stage1 "$X/stage1" --softmax-layers "$layers" \
          --out "$X/hybrid-${spec%%=*}-k$k-s${SEED:-0}${TAG:+-$TAG}"
        continue
      fi
      name=${spec%@*}; ratio=0.25; [[ $spec == *@* ]] && ratio=${spec#*@}
      k=$(k_of "$ratio"); out="$X/hybrid-$name-k$k-s${SEED:-0}${TAG:+-$TAG}"
      if [[ $name == uniform ]]; then
        layers=$(python3 -c "from distill.placement import uniform_softmax_layers as u; print(','.join(map(str, u(30, $k))))")
        hybrid distill --stage1 "$X/stage1" --softmax-layers "$layers" --out "$out"
      else
        hybrid distill --stage1 "$X/stage1" --ranking "$X/rank-$name/ranking.json" --k "$k" --out "$out"
      fi
    done
    ;;
  eval)
    tasks=${TASKS:-heldout passkey multikey assoc vartrack}
    if [[ " $tasks " == *" cloze "* ]]; then  # the natural-text recall task (lm-eval), written from $VALID
      if python3 -c "import lm_eval, datasets" && python3 bench/recall_cloze.py --data "$VALID" --out "$X/cloze"; then
        tasks=${tasks/cloze/$X/cloze/recall_cloze.yaml}
      else
        echo "cloze left out: lm-eval does not import here (carry .whl-eval) or the task could not be written"
        tasks=${tasks/cloze/}
      fi
    fi
    models=()
    for d in "$X"/hybrid-*; do [[ -f $d/config.json ]] && models+=("${d#$X/hybrid-}=$d"); done
    t=$(left)
    timeout "$t" python3 -m distill.cli eval "${models[@]}" --teacher smollm2-135m --device "$DEVICE" \
      --data "$VALID" --seq-len 1024 --eval-tokens ${EVAL_TOKENS:-65536} \
      --tasks $tasks --lengths ${LENGTHS:-512 1024 2048 4096} --samples ${SAMPLES:-100} \
      --out "$X/eval" 2>&1 | grep -v "it/s]\|s/it]"
    # at most 8 files come back: the table and plot, and one archive of every JSON
    R=$X/results; mkdir -p "$R"; cp "$X"/eval/results.* "$X/wall.log" "$R/" 2>/dev/null
    for r in "$X"/rank-*/ranking.json; do n=${r%/ranking.json}; cp "$r" "$R/ranking-${n##*/rank-}.json"; done
    for d in "$X"/stage1 "$X"/rank-* "$X"/hybrid-*; do
      w=$d.work/metrics.json; [[ -f $w ]] && cp "$w" "$R/metrics-${d##*/}.json"
      for l in "$d".work/stage*/log.jsonl; do [[ -f $l ]] && cp "$l" "$R/log-${d##*/}.jsonl"; done
    done
    tar czf "$OUT/results.tgz" -C "$R" . && cp "$X"/eval/results.md "$X"/eval/results.png "$OUT/" 2>/dev/null
    ls -la "$R"
    ;;
  *) echo "unknown phase $PHASE" >&2; exit 2 ;;
esac
