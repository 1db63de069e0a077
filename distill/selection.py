"""Which layers keep softmax attention: one ranking of all layers, and its top K.

Selectors (`hybrid score --selector ...`):
    ga-s2     KL-guided (the paper's): for every layer l, a short Stage 2 from the Stage-1 weights with
              only l restored to softmax; score = held-out KL to the teacher it reaches (lower = l matters
              more). All candidates see the same batches in the same order.
    kl-restore  GA-S2 at step 0, the cheap selector: restore only l to softmax in the Stage-1 model and
              measure the held-out KL with no training at all. One teacher forward and one all-linear
              forward over the held-out blocks are shared; candidate l runs only layers l..L-1.
    ga-s1     the per-layer held-out Stage-1 alignment loss (higher = harder to linearise = matters more).
    ablation  zero one teacher attention layer and measure the accuracy drop on synthetic associative
              recall (bigger drop = matters more; ties broken by the drop in the answers' log-probability);
              `score.ablation_task=passkey` (or another recall task) scores the answer log-probability lost
              on that task's prompts instead (nats; ties: the exact-match drop).
    retrieval the teacher's retrieval heads: on passkey prompts, the attention its heads put on the needle
              from the position that predicts the answer (`distill.retrieval_heads`); a layer scores its
              strongest head's mean needle mass (higher = matters more). No training, one teacher forward
              per prompt.
    reach     the teacher's long-range layers: on passkey prompts (or another recall task's: `score.reach_task`)
              whose needle lies in the farthest quarter of the filler, clip one layer's attention to the last
              `score.reach_window` tokens and measure how much log-probability the answer loses (nats;
              higher = the layer's reach matters more). A GDN layer keeps the recent past well and the far
              past blurred, so this asks which layers recall needs to see far back. No training, L teacher
              forwards per prompt.
    uniform   no ranking: K evenly spaced layers.

    A+reach   (ga-s2+reach, the default; kl-restore+reach; ablation+reach, teacher-only as a whole) A's order
              with the layers whose `reach` score is at least `score.reach_threshold` nats put first: softmax goes
              first to the layers far recall cannot do without, then by A. KL over ordinary text hardly sees such a
              layer (SmolLM2's layer 7: GA-S2 26th of 30, yet the one GDN layer that loses the far passkey); the
              ablation probe sees 18 but not 7 (bench/results/quality_h100/probe_and_eighth/).

GA-S2 costs L short Stage-2 runs. What is shared between candidates without changing any score:
  * the training batches and the teacher's final hidden states for them, computed once per process;
  * the held-out blocks with the teacher's hidden states, computed once per process;
  * the first curve point (step 0): layers below l are the same all-linear Stage-1 layers in every
    candidate, so their outputs on the held-out blocks are computed once and candidate l runs only
    layers l..L-1;
  * candidates are spread over all processes (`torchrun`), each a single-process run;
  * each finished candidate is written to disk, so an interrupted selection skips them on rerun.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from distill.atomic_io import write_json_atomic
from distill.data import BlockOrder, PackedData, batch_for_step
from distill.distributed import Runtime
from distill.errors import UserError
from distill.eval_recall import answer_logprobs, depth_bin
from distill.evaluate import EvalSet, kl_from_hidden
from distill.model.modeling import HybridForCausalLM
from distill.model.transfer import restore_softmax
from distill.placement import uniform_softmax_layers
from distill.recall_tasks import RECALL_KINDS, RecallSample, RecallTaskSpec, build_recall_task
from distill.retrieval_heads import layer_scores, mean_mass, measure
from distill.stages import Stage2Config, heldout_alignment, run_stage2

SELECTORS = ("ga-s2", "kl-restore", "ga-s1", "ablation", "retrieval", "reach", "uniform", "ga-s2+reach",
             "kl-restore+reach", "ablation+reach")
# GA-S2 alone keeps SmolLM2's generic-text KL lowest but not its far recall; with the reach layers in front, a
# hybrid trained from Stage 1 finds passkey@4K 0.88 against 0.53 (bench/results/quality_h100/ga_s2_reach/).
DEFAULT_SELECTOR = "ga-s2+reach"
NEEDS_STAGE1 = ("ga-s2", "kl-restore", "ga-s1")  # selectors that score the all-linear Stage-1 model
TEACHER_ONLY = ("ablation", "retrieval", "reach", "uniform", "ablation+reach")  # selectors that read no training text
RANKING_FILE = "ranking.json"


@dataclass
class Ranking:
    """Layers ordered from most to least important, with the evidence."""

    selector: str
    num_layers: int
    order: list[int]  # most important first; empty for `uniform`
    scores: dict[int, float] = field(default_factory=dict)
    metric: str = ""
    lower_is_more_important: bool = True
    curves: dict[int, list[list[float]]] = field(default_factory=dict)  # layer -> [[step, value], ...]
    details: dict = field(default_factory=dict)

    def choose(self, k: int) -> list[int]:
        """The K softmax layers: the top of the ranking (prefixes for every K), or uniform placement."""
        if not 0 <= k <= self.num_layers:
            raise UserError(f"k must be between 0 and {self.num_layers}, got {k}")
        if self.selector == "uniform":
            return uniform_softmax_layers(self.num_layers, k)
        return sorted(self.order[:k])

    def rank_of(self, layer: int) -> int | None:
        return self.order.index(layer) + 1 if layer in self.order else None

    def save(self, path: Path) -> None:
        write_json_atomic(Path(path), asdict(self))

    @classmethod
    def load(cls, path: Path) -> Ranking:
        path = Path(path)
        if path.is_dir():
            path = path / RANKING_FILE
        if not path.is_file():
            raise UserError(f"ranking file {path} not found (write one with `hybrid score`)")
        raw = json.loads(path.read_text())
        raw["scores"] = {int(k): v for k, v in raw["scores"].items()}
        raw["curves"] = {int(k): v for k, v in raw["curves"].items()}
        return cls(**raw)


def ranking_from_scores(selector: str, scores: dict[int, float], lower_is_more_important: bool, metric: str,
                        tiebreak: dict[int, float] | None = None, **kw) -> Ranking:
    """Order by score (then tiebreak, same direction, then layer index) so equal scores rank stably."""
    sign = 1 if lower_is_more_important else -1
    tiebreak = tiebreak or {}
    order = sorted(scores, key=lambda i: (sign * scores[i], sign * tiebreak.get(i, 0.0), i))
    return Ranking(selector, len(scores), order, dict(sorted(scores.items())), metric, lower_is_more_important, **kw)


def uniform_ranking(num_layers: int) -> Ranking:
    return Ranking("uniform", num_layers, [], metric="uniform placement (no scores)")


# ---------------------------------------------------------------------------------------------
# Spreading per-layer work over processes, one result file per layer (resumable)
# ---------------------------------------------------------------------------------------------


def spread_layers(layers: list[int], out_dir: Path, runtime: Runtime, work: Callable[[int], dict],
                  desc: str | None = None) -> dict[int, dict]:
    """Run work(layer) for the layers of this process (round-robin) that have no result file yet; with `desc`,
    behind a progress bar of them."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def path(layer: int) -> Path:
        return out_dir / f"layer_{layer:03d}.json"

    todo = [layer for layer in layers[runtime.rank :: runtime.world] if not path(layer).is_file()]
    for layer in tqdm(todo, desc=desc, unit="layer", disable=desc is None):
        write_json_atomic(path(layer), work(layer), indent=None)
    runtime.barrier()
    return {layer: json.loads(path(layer).read_text()) for layer in layers}


# ---------------------------------------------------------------------------------------------
# GA-S2
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreConfig:
    candidate: Stage2Config  # the short Stage 2 each candidate runs (candidate.train.save_every is ignored)
    eval_batch: int = 4  # held-out blocks per forward
    eval_blocks: int = 0  # candidates are scored on the first N held-out blocks (0: all of them)
    recall_samples: int = 32  # ablation and retrieval selectors: synthetic recall prompts
    recall_pairs: int = 16  # ablation: key/value pairs per prompt
    ablation_task: str = "pairs"  # ablation: "pairs" (recall_pairs key/value pairs, accuracy drop) or a recall task
    # of distill.recall_tasks.RECALL_KINDS at retrieval_context tokens (answer log-prob drop)
    retrieval_context: int = 4096  # retrieval and reach: tokens per passkey prompt (at most the teacher's context)
    reach_window: int = 256  # reach: the clipped layer sees this many tokens back (at most a quarter of the prompt)
    reach_task: str = "passkey"  # reach: the recall task of its prompts (distill.recall_tasks.RECALL_KINDS)
    reach_threshold: float = 0.75  # A+reach: layers whose reach score is at least this (nats) go first (the
    # value keeps SmolLM2's layers 18 and 7, and only those, at 1K and 2K: bench/results/quality_h100/reach/)


def _to_host(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host copy (page-locked when CUDA exists, so the copy back to the GPU is asynchronous)."""
    x = x.to("cpu", dtype=dtype or x.dtype)
    return x.pin_memory() if torch.cuda.is_available() else x


@dataclass
class HeldoutPrefixes:
    """The held-out blocks with the teacher's final hidden states, and the input of every layer of the
    all-linear Stage-1 model on them (host memory): what scoring a restored layer l needs, so that the
    candidate runs only layers l..L-1."""

    eval_set: EvalSet
    prefix_hidden: list[list[torch.Tensor]]  # [eval batch][layer] -> input of that layer, all-linear model, host

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, stage1: HybridForCausalLM, data: PackedData, cfg: ScoreConfig,
              runtime: Runtime) -> HeldoutPrefixes:
        single = replace(runtime, rank=0, world=1)
        eval_set = EvalSet.build(teacher, data, cfg.eval_batch, single, max_blocks=cfg.eval_blocks or None)
        prefix = []
        for ids in eval_set.ids:
            with runtime.autocast():
                out = stage1.model(input_ids=ids, use_cache=False, output_hidden_states=True)
            prefix.append([_to_host(h) for h in out.hidden_states[:-1]])  # hidden_states[l] is the input of layer l
        return cls(eval_set, prefix)


@dataclass
class SharedScoringInputs:
    """Everything the GA-S2 candidates have in common, computed once.

    The per-step teacher hidden states and the per-layer prefixes live in host memory: on the GPU they
    would take (candidate tokens x hidden x 4 bytes) — 30 GB for SmolLM2 at the `paper` preset — and
    grow with the teacher. Training batches hold the teacher's hidden states in the autocast dtype
    (bf16 on CUDA), the precision `kl_from_hidden` computes in anyway; `train` copies each batch to the
    GPU as it runs. Prefixes keep their dtype (they are the residual stream) and go to the GPU one
    candidate layer at a time."""

    batches: list[list[tuple[torch.Tensor, torch.Tensor]]]  # [step][micro] -> (ids, teacher hidden), on the host
    heldout: HeldoutPrefixes

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, stage1: HybridForCausalLM, data: PackedData, cfg: ScoreConfig,
              runtime: Runtime) -> SharedScoringInputs:
        tcfg = cfg.candidate.train
        accum = tcfg.grad_accum(1)  # every candidate is a one-process run over all the data
        order = BlockOrder(len(data.train), tcfg.seed)
        batches = []
        for step in range(tcfg.steps):
            micro_batches = []
            for micro in range(accum):
                ids = batch_for_step(data, order, step, micro, tcfg.micro_batch, accum, copies=cfg.candidate.copies)
                with runtime.autocast():
                    h_t = teacher.model(input_ids=ids.to(runtime.device), use_cache=False).last_hidden_state
                micro_batches.append((_to_host(ids), _to_host(h_t, runtime.amp_dtype)))
            batches.append(micro_batches)
        return cls(batches, HeldoutPrefixes.build(teacher, stage1, data, cfg, runtime))


@torch.no_grad()
def final_hidden_from_layer(model: HybridForCausalLM, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Final hidden states of full held-out blocks (no padding, no cache) from layer `start`'s input."""
    position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
    mask = model.model.causal_mask(hidden, position_ids)
    return model.model.forward_from_layer(hidden, start, position_ids, attention_mask=mask)


def _kl_from_prefix(candidate: HybridForCausalLM, layer: int, heldout: HeldoutPrefixes, runtime: Runtime) -> float:
    total, count = 0.0, 0
    for ids, h_t, prefix in zip(heldout.eval_set.ids, heldout.eval_set.teacher_hidden, heldout.prefix_hidden):
        with runtime.autocast():
            h_s = final_hidden_from_layer(candidate, prefix[layer].to(runtime.device, non_blocking=True), layer)
            kl = kl_from_hidden(h_s, candidate.lm_head.weight, h_t, heldout.eval_set.teacher_weight, runtime.amp_dtype)
        total += kl.item() * ids.numel()
        count += ids.numel()
    return total / count


def score_ga_s2(teacher: nn.Module, stage1: HybridForCausalLM, data: PackedData, cfg: ScoreConfig,
                work_dir: Path, runtime: Runtime, layers: list[int] | None = None) -> Ranking:
    """KL-guided layer selection from an all-linear Stage-1 model."""
    work_dir = Path(work_dir)
    num_layers = stage1.config.num_hidden_layers
    layers = list(range(num_layers)) if layers is None else layers
    t0 = time.perf_counter()
    shared = SharedScoringInputs.build(teacher, stage1, data, cfg, runtime)
    shared_seconds = time.perf_counter() - t0
    single = replace(runtime, rank=0, world=1)
    tcfg = replace(cfg.candidate.train, save_every=0)
    candidate_cfg = replace(cfg.candidate, train=tcfg)

    def get_batch(step: int, micro: int):
        return shared.batches[step][micro]

    def run_candidate(layer: int) -> dict:
        start = time.perf_counter()
        candidate = restore_softmax(stage1, teacher, [layer])
        kl0 = _kl_from_prefix(candidate, layer, shared.heldout, runtime)
        cand_dir = work_dir / "runs" / f"layer_{layer:03d}"
        log = run_stage2(teacher, candidate, data, candidate_cfg, cand_dir, single, shared.heldout.eval_set,
                         get_batch=get_batch, name=f"candidate {layer:>2}/{num_layers}")
        curve = [[0, kl0]] + [[r["step"], r["eval_kl"]] for r in log if "eval_kl" in r]
        del candidate
        return {
            "layer": layer,
            "score": curve[-1][1],
            "curve": curve,
            "train_loss": [[r["step"], r["loss"]] for r in log],
            "seconds": time.perf_counter() - start,
        }

    results = spread_layers(layers, work_dir / "candidates", runtime, run_candidate)
    scores = {layer: r["score"] for layer, r in results.items()}
    return ranking_from_scores(
        "ga-s2", scores, lower_is_more_important=True, metric="held-out KL(teacher || hybrid) after a short Stage 2",
        curves={layer: r["curve"] for layer, r in results.items()},
        details={
            "candidate_steps": tcfg.steps,
            "candidate_tokens": tcfg.tokens,
            "eval_tokens": shared.heldout.eval_set.num_tokens,
            "train_loss": {layer: r["train_loss"] for layer, r in results.items()},
            "seconds_per_candidate": {layer: r["seconds"] for layer, r in results.items()},
            "shared_inputs_seconds": shared_seconds,
        },
    )


def score_kl_restore(teacher: nn.Module, stage1: HybridForCausalLM, data: PackedData, cfg: ScoreConfig,
                     work_dir: Path, runtime: Runtime, layers: list[int] | None = None) -> Ranking:
    """The cheap selector: GA-S2's step-0 point. No candidate trains, so the cost is one teacher and one
    all-linear forward over the held-out blocks plus L partial forwards (layers l..L-1)."""
    num_layers = stage1.config.num_hidden_layers
    layers = list(range(num_layers)) if layers is None else layers
    t0 = time.perf_counter()
    heldout = HeldoutPrefixes.build(teacher, stage1, data, cfg, runtime)
    shared_seconds = time.perf_counter() - t0

    def run_candidate(layer: int) -> dict:
        start = time.perf_counter()
        candidate = restore_softmax(stage1, teacher, [layer])
        kl = _kl_from_prefix(candidate, layer, heldout, runtime)
        del candidate
        return {"layer": layer, "score": kl, "seconds": time.perf_counter() - start}

    results = spread_layers(layers, Path(work_dir) / "candidates", runtime, run_candidate, desc="kl-restore selector")
    return ranking_from_scores(
        "kl-restore", {layer: r["score"] for layer, r in results.items()}, lower_is_more_important=True,
        metric="held-out KL(teacher || hybrid) with only that layer restored to softmax, no training",
        details={
            "candidate_steps": 0,
            "candidate_tokens": 0,
            "eval_tokens": heldout.eval_set.num_tokens,
            "seconds_per_candidate": {layer: r["seconds"] for layer, r in results.items()},
            "shared_inputs_seconds": shared_seconds,
        },
    )


def ranking_agreement(a: Ranking, b: Ranking, k: int) -> dict:
    """How far two rankings of the same layers agree: Spearman's rank correlation over all layers and the
    Jaccard overlap of the K layers each keeps softmax (uniform placement for `uniform`)."""
    if a.num_layers != b.num_layers:
        raise UserError(f"rankings of different models: {a.num_layers} vs {b.num_layers} layers")
    top_a, top_b = set(a.choose(k)), set(b.choose(k))
    agreement = {"k": k, "top_k": {a.selector: sorted(top_a), b.selector: sorted(top_b)},
                 "jaccard_top_k": len(top_a & top_b) / len(top_a | top_b) if top_a | top_b else 1.0,
                 "spearman": None}
    if a.order and b.order:
        n = a.num_layers
        d2 = sum((a.order.index(layer) - b.order.index(layer)) ** 2 for layer in range(n))
        agreement["spearman"] = 1 - 6 * d2 / (n * (n * n - 1))
    return agreement


# ---------------------------------------------------------------------------------------------
# GA-S1
# ---------------------------------------------------------------------------------------------


def score_ga_s1(teacher: nn.Module, stage1: HybridForCausalLM, eval_set: EvalSet, runtime: Runtime,
                loss_kind: str = "l2") -> Ranking:
    """Rank layers by their held-out Stage-1 alignment loss (hardest to linearise first)."""
    losses = heldout_alignment(teacher, stage1, eval_set, runtime, loss_kind)
    return ranking_from_scores("ga-s1", dict(enumerate(losses)), lower_is_more_important=False,
                               metric=f"held-out Stage-1 alignment loss ({loss_kind})")


# ---------------------------------------------------------------------------------------------
# Ablation on synthetic associative recall
# ---------------------------------------------------------------------------------------------


def recall_vocabulary(tokenizer, limit: int = 4096) -> list[int]:
    """Token ids that decode to a plain word (' word'); all non-special ids if there are too few."""
    special = set(tokenizer.all_special_ids)
    words = [i for i in range(min(len(tokenizer), 200_000)) if i not in special
             and re.fullmatch(r" [A-Za-z]{3,}", tokenizer.decode([i]))][:limit]
    return words if len(words) >= 64 else [i for i in range(len(tokenizer)) if i not in special]


def recall_task(vocab: list[int], samples: int, pairs: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts `k1 v1 k2 v2 ... kP vP  k_s1 v_s1 ... k_sP v_sP` (keys repeated in a shuffled order).

    Returns (ids [samples, 4P], query positions [samples, P] (a repeated key; the next token is its
    value), answers [samples, P]).
    """
    if len(vocab) < 2 * pairs:
        raise UserError(f"the tokenizer has too few usable tokens ({len(vocab)}) for {pairs} recall pairs")
    gen = torch.Generator().manual_seed(seed)
    vocab_t = torch.tensor(vocab)
    ids, positions, answers = [], [], []
    for _ in range(samples):
        chosen = vocab_t[torch.randperm(len(vocab), generator=gen)[: 2 * pairs]]
        keys, values = chosen[:pairs], chosen[pairs:]
        perm = torch.randperm(pairs, generator=gen)
        context = torch.stack([keys, values], 1).flatten()
        queries = torch.stack([keys[perm], values[perm]], 1).flatten()
        ids.append(torch.cat([context, queries]))
        positions.append(2 * pairs + 2 * torch.arange(pairs))
        answers.append(values[perm])
    return torch.stack(ids), torch.stack(positions), torch.stack(answers)


@torch.no_grad()
def recall_accuracy(model: nn.Module, ids, positions, answers, runtime: Runtime, batch: int = 8) -> tuple[float, float]:
    """(accuracy of the greedy answer, mean log-probability of the right answer) at the query positions."""
    correct, logprob, n = 0.0, 0.0, 0
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch].to(runtime.device)
        with runtime.autocast():
            logits = model(input_ids=chunk, use_cache=False).logits.float()
        pos = positions[start : start + batch].to(runtime.device)
        ans = answers[start : start + batch].to(runtime.device)
        at = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))  # [b, P, V]
        correct += (at.argmax(-1) == ans).float().sum().item()
        logprob += at.log_softmax(-1).gather(-1, ans[..., None]).sum().item()
        n += ans.numel()
    return correct / n, logprob / n


@contextmanager
def zeroed_attention(model: nn.Module, layer: int) -> Iterator[None]:
    """Run `model` with the output of `layer`'s attention replaced by zeros."""

    def zero(module, args, output):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])

    handle = model.model.layers[layer].self_attn.register_forward_hook(zero)
    try:
        yield
    finally:
        handle.remove()


def score_ablation(teacher: nn.Module, tokenizer, cfg: ScoreConfig, work_dir: Path, runtime: Runtime) -> Ranking:
    """Zero each teacher attention layer in turn; importance = drop in recall accuracy."""
    if cfg.ablation_task != "pairs":
        return score_task_ablation(teacher, tokenizer, cfg, work_dir, runtime)
    ids, positions, answers = recall_task(recall_vocabulary(tokenizer), cfg.recall_samples, cfg.recall_pairs)
    base_acc, base_lp = recall_accuracy(teacher, ids, positions, answers, runtime)
    layers = list(range(teacher.config.num_hidden_layers))

    def ablate(layer: int) -> dict:
        with zeroed_attention(teacher, layer):
            acc, lp = recall_accuracy(teacher, ids, positions, answers, runtime)
        return {"layer": layer, "accuracy": acc, "logprob": lp}

    results = spread_layers(layers, Path(work_dir) / "ablation", runtime, ablate, desc="ablation selector")
    drop = {layer: base_acc - r["accuracy"] for layer, r in results.items()}
    lp_drop = {layer: base_lp - r["logprob"] for layer, r in results.items()}
    return ranking_from_scores(
        "ablation", drop, lower_is_more_important=False, tiebreak=lp_drop,
        metric="recall accuracy drop when the layer's attention is zeroed",
        details={"base_accuracy": base_acc, "base_logprob": base_lp, "logprob_drop": lp_drop,
                 "samples": cfg.recall_samples, "pairs": cfg.recall_pairs},
    )


# ---------------------------------------------------------------------------------------------
# The teacher's retrieval heads
# ---------------------------------------------------------------------------------------------


def prompt_length(teacher: nn.Module, cfg: ScoreConfig) -> int:
    """Tokens per passkey prompt of the retrieval and reach selectors: at most the teacher's context."""
    return min(cfg.retrieval_context, getattr(teacher.config, "max_position_embeddings", None) or cfg.retrieval_context)


def score_retrieval(teacher: nn.Module, tokenizer, cfg: ScoreConfig, runtime: Runtime) -> Ranking:
    """Rank layers by the needle mass of their strongest head on passkey prompts (ties: the layer's summed mass).

    The prompts are `cfg.retrieval_context` tokens long, or the teacher's context where that is shorter. Every
    process computes the same ranking (a few forwards; nothing to share)."""
    context = prompt_length(teacher, cfg)
    spec = RecallTaskSpec("passkey", context, cfg.recall_samples)
    try:
        samples = build_recall_task(spec, tokenizer)
    except UserError as err:
        raise UserError(f"score.retrieval_context={cfg.retrieval_context}: {err}") from None
    rows = measure(teacher, samples, runtime, "retrieval heads")
    per_head = mean_mass(rows)
    return ranking_from_scores(
        "retrieval", layer_scores(per_head), lower_is_more_important=False,
        tiebreak={layer: sum(m) for layer, m in per_head.items()},
        metric="needle attention mass of the layer's strongest head on passkey prompts",
        details={"head_mass": {str(layer): m for layer, m in per_head.items()}, "samples": len(rows),
                 "context": context, "teacher_recalled": sum(r.hit for r in rows) / len(rows)},
    )


# ---------------------------------------------------------------------------------------------
# The teacher's long-range layers
# ---------------------------------------------------------------------------------------------


def far_needle_samples(kind: str, tokenizer, context: int, count: int, seed: int = 0) -> list[RecallSample]:
    """`count` prompts of recall task `kind`, `context` tokens each, whose answer's needle starts in the farthest
    quarter of the filler."""
    spec = RecallTaskSpec(kind, context, samples=8 * count, seed=seed)
    far = [sample for sample in build_recall_task(spec, tokenizer) if depth_bin(sample) == 0][:count]
    if not far:
        raise UserError(f"no {kind} prompt of {context} tokens put its needle in the farthest quarter")
    return far


def local_window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """[1, 1, length, length] boolean: query i sees keys i - window + 1 .. i (True = attend)."""
    pos = torch.arange(length, device=device)
    back = pos[:, None] - pos[None, :]
    return ((back >= 0) & (back < window))[None, None]


@contextmanager
def clipped_attention(model: nn.Module, layer: int, mask: torch.Tensor) -> Iterator[None]:
    """Run `model`'s attention in `layer` under `mask` instead of its causal mask (SDPA and eager honour it)."""

    def use_mask(module, args, kwargs):
        kwargs["attention_mask"] = mask
        return args, kwargs

    handle = model.model.layers[layer].self_attn.register_forward_pre_hook(use_mask, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _answer_scores(model: nn.Module, samples: list[RecallSample], batch: int, runtime: Runtime) -> tuple[float, float]:
    """(mean log-probability of the answer, exact-match rate) over `samples`."""
    logprobs, hits = [], []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        lp, greedy, _ = answer_logprobs(model, torch.tensor([s.ids for s in chunk]), [s.answer_len for s in chunk],
                                        runtime)
        logprobs += lp
        hits += greedy
    return sum(logprobs) / len(logprobs), sum(hits) / len(hits)


def score_reach(teacher: nn.Module, tokenizer, cfg: ScoreConfig, work_dir: Path, runtime: Runtime) -> Ranking:
    """Clip each teacher attention layer in turn to a local window; importance = far-needle answer log-prob lost."""
    implementation = getattr(teacher.config, "_attn_implementation", None) or "sdpa"
    if implementation not in ("sdpa", "eager"):
        raise UserError(f"the reach selector clips attention with a mask, which attn_implementation="
                        f"{implementation!r} ignores; load the teacher with 'sdpa' or 'eager'")
    context = prompt_length(teacher, cfg)
    if 4 * cfg.reach_window > context:
        raise UserError(f"score.reach_window={cfg.reach_window} must be at most a quarter of the {cfg.reach_task} "
                        f"prompt ({context} tokens, score.retrieval_context or the teacher's context): a needle in the "
                        f"farthest quarter must lie outside the window")
    if cfg.reach_task not in RECALL_KINDS:
        raise UserError(f"score.reach_task={cfg.reach_task!r}: expected one of {', '.join(RECALL_KINDS)}")
    try:
        samples = far_needle_samples(cfg.reach_task, tokenizer, context, cfg.recall_samples)
    except UserError as err:
        raise UserError(f"score.retrieval_context={cfg.retrieval_context}: {err}") from None
    batch = max(1, cfg.eval_batch // 2)  # the masked attention holds [batch, heads, T, T] scores
    base_logprob, base_exact = _answer_scores(teacher, samples, batch, runtime)
    mask = local_window_mask(context, cfg.reach_window, runtime.device)

    def clip(layer: int) -> dict:
        with clipped_attention(teacher, layer, mask):
            logprob, exact = _answer_scores(teacher, samples, batch, runtime)
        return {"layer": layer, "logprob": logprob, "exact": exact}

    layers = list(range(teacher.config.num_hidden_layers))
    results = spread_layers(layers, Path(work_dir) / "reach", runtime, clip, desc="reach selector")
    return ranking_from_scores(
        "reach", {layer: base_logprob - r["logprob"] for layer, r in results.items()}, lower_is_more_important=False,
        tiebreak={layer: base_exact - r["exact"] for layer, r in results.items()},
        metric=f"far {cfg.reach_task} answer log-prob lost, layer clipped to {cfg.reach_window} tokens (nats)",
        details={"task": cfg.reach_task, "context": context, "window": cfg.reach_window, "samples": len(samples),
                 "teacher_logprob": base_logprob, "teacher_exact": base_exact,
                 "exact_clipped": {str(layer): r["exact"] for layer, r in results.items()}},
    )


def score_task_ablation(teacher: nn.Module, tokenizer, cfg: ScoreConfig, work_dir: Path, runtime: Runtime) -> Ranking:
    """The ablation selector on `score.ablation_task`'s prompts: importance = answer log-prob lost (nats) when the
    layer's attention is zeroed; ties broken by the exact-match drop."""
    if cfg.ablation_task not in RECALL_KINDS:
        raise UserError(f"score.ablation_task={cfg.ablation_task!r}: expected pairs or one of "
                        f"{', '.join(RECALL_KINDS)}")
    context = prompt_length(teacher, cfg)
    try:
        samples = build_recall_task(RecallTaskSpec(cfg.ablation_task, context, cfg.recall_samples), tokenizer)
    except UserError as err:
        raise UserError(f"score.retrieval_context={cfg.retrieval_context}: {err}") from None
    batch = max(1, cfg.eval_batch // 2)
    base_logprob, base_exact = _answer_scores(teacher, samples, batch, runtime)

    def ablate(layer: int) -> dict:
        with zeroed_attention(teacher, layer):
            logprob, exact = _answer_scores(teacher, samples, batch, runtime)
        return {"layer": layer, "logprob": logprob, "exact": exact}

    layers = list(range(teacher.config.num_hidden_layers))
    results = spread_layers(layers, Path(work_dir) / f"ablation-{cfg.ablation_task}-{context}", runtime, ablate,
                            desc=f"ablation selector ({cfg.ablation_task})")
    return ranking_from_scores(
        "ablation", {layer: base_logprob - r["logprob"] for layer, r in results.items()}, lower_is_more_important=False,
        tiebreak={layer: base_exact - r["exact"] for layer, r in results.items()},
        metric=f"{cfg.ablation_task} answer log-prob lost when the layer's attention is zeroed (nats)",
        details={"task": cfg.ablation_task, "context": context, "samples": len(samples),
                 "teacher_logprob": base_logprob, "teacher_exact": base_exact,
                 "exact_ablated": {str(layer): r["exact"] for layer, r in results.items()}},
    )


def with_reach(base: Ranking, reach: Ranking, threshold: float) -> Ranking:
    """`base`'s order with the layers whose reach score is at least `threshold` nats first (largest first)."""
    if not base.order:
        raise UserError(f"{base.selector}+reach: {base.selector} has no ranking to put the reach layers in front of")
    kept = [layer for layer in reach.order if reach.scores[layer] >= threshold]
    order = kept + [layer for layer in base.order if layer not in kept]
    return Ranking(
        f"{base.selector}+reach", base.num_layers, order, base.scores,
        f"{base.metric}; first the layers losing >= {threshold:g} nats of far-needle recall when clipped",
        base.lower_is_more_important, base.curves,
        details={**base.details, "reach_threshold": threshold, "kept_for_reach": kept,
                 "reach_scores": {str(layer): v for layer, v in reach.scores.items()}, "reach": reach.details},
    )
