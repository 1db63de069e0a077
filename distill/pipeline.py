"""`hybrid convert`: teacher -> Stage 0+1 -> layer selection -> Stage 2 -> (Stage 3) -> checkpoint + report.

Everything is resumable. The work directory (default: OUT.work next to the output) holds

    run.json              what this run is (teacher, data, preset, K, selector); a rerun must match it
    metrics.json          held-out KL per stage and wall times, written as they are measured
    stage1/               log.jsonl, ckpt.pt (ckpt.dcp/ under torchrun) while training, model/ once done
                          (the all-linear Stage-1 hybrid)
    score/                candidates/layer_XXX.json as each candidate finishes, ranking.json once done
    stage2/, stage3/      like stage1/

and every file in it is replaced atomically. Rerunning the same command after a crash or a kill
skips finished steps and continues the unfinished one from its last checkpoint. The output directory
is written once, atomically, at the end: the HF checkpoint, report.md with plots, ranking.json, logs.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from distill.atomic_io import atomic_directory, check_output_dir, write_json_atomic
from distill.cuda_graph import WARMUP as GRAPH_WARMUP
from distill.data import DataSpec, PackedData, prepare_data, resolve_sources
from distill.distributed import Runtime
from distill.errors import UserError
from distill.evaluate import EvalSet, heldout_kl
from distill.model.checkpoint import save_hybrid
from distill.model.config import LINEAR_ATTENTION
from distill.model.gdn_mixer import set_gdn_backend
from distill.model.modeling import HybridForCausalLM
from distill.model.teacher import load_teacher
from distill.model.transfer import hybrid_from_teacher, restore_softmax
from distill.placement import k_from_ratio
from distill.presets import Preset, get_preset
from distill.report import ReportInputs, plot_curves, plot_scores, write_report
from distill.selection import (
    DEFAULT_SELECTOR,
    RANKING_FILE,
    SELECTORS,
    Ranking,
    score_ablation,
    score_ga_s1,
    score_ga_s2,
    score_kl_restore,
    score_reach,
    score_retrieval,
    uniform_ranking,
    with_reach,
)
from distill.stages import describe_stage1_mixers, run_stage1, run_stage2, run_stage3
from distill.train import read_log
from distill.train_state import remove_checkpoints

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# One run: teacher, data, work dir, metrics
# ---------------------------------------------------------------------------------------------


def is_done(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file()


def load_hybrid(path: Path, runtime: Runtime) -> HybridForCausalLM:
    if not is_done(path):
        raise UserError(f"{path} is not a hybrid checkpoint (no config.json)")
    model = HybridForCausalLM.from_pretrained(path, dtype=torch.float32).to(runtime.device).eval()
    set_gdn_backend(model, runtime.parallel.gdn_backend)
    return model


@dataclass(frozen=True)
class RunSpec:
    """What a run is: its teacher, data and budgets, and where its resumable state lives."""

    teacher: str | None
    data: tuple[str, ...]
    preset: Preset
    work_dir: Path
    seed: int = 0
    text_field: str = "text"


@dataclass
class Session:
    """A started run: its spec, the loaded teacher and tokenizer, and what is computed once per run
    (tokenised data, held-out sets, the Stage-0 model). Made by `open` or `without_teacher`, never
    half-started."""

    spec: RunSpec
    runtime: Runtime
    teacher: nn.Module | None  # None only for a Stage-3 run without a teacher
    tokenizer: PreTrainedTokenizerBase
    _data: dict[tuple[int, int], PackedData] = field(default_factory=dict)  # (seq_len, min_doc_tokens)
    _eval: dict[int, EvalSet] = field(default_factory=dict)
    stage0: HybridForCausalLM | None = None  # kept in memory after building it, for the Stage-0 KL

    # ---- setup ---------------------------------------------------------------------------
    @classmethod
    def open(cls, spec: RunSpec, runtime: Runtime, identity: dict, read_data: bool = True) -> Session:
        """Check the work dir belongs to this run, load the teacher, tokenise every data set needed (none with
        read_data=False: a selector that reads only the teacher)."""
        spec.work_dir.mkdir(parents=True, exist_ok=True)
        run_file = spec.work_dir / "run.json"
        if run_file.is_file():
            previous = json.loads(run_file.read_text())
            diffs = [k for k in identity if previous.get(k) != identity[k]]
            if diffs:
                k = diffs[0]
                raise UserError(
                    f"work dir {spec.work_dir} belongs to another run: {k} was {previous.get(k)!r}, now {identity[k]!r}; "
                    "use another --work-dir, or delete it to start over"
                )
        runtime = replace(runtime, parallel=spec.preset.parallel)
        # the first load may download and convert the teacher: process 0 does it, the others wait
        if not runtime.is_main:
            runtime.barrier()
        teacher, tokenizer = load_teacher(spec.teacher)
        if runtime.is_main:
            runtime.barrier()
        session = cls(spec, runtime, teacher.to(runtime.device).eval().requires_grad_(False), tokenizer)
        log_gdn_path(runtime)
        for seq_len in spec.preset.seq_lens if read_data else []:  # all data problems surface here, before training
            session.data(seq_len)
        for name, stage2 in (("stage2", spec.preset.stage2), ("score.candidate", spec.preset.score.candidate)):
            stage2.copies.check(stage2.train.seq_len, name)
            if read_data:
                session.data(stage2.train.seq_len, stage2.min_doc_tokens)
        if runtime.is_main and not run_file.is_file():
            write_json_atomic(run_file, identity)
        return session

    @classmethod
    def without_teacher(cls, spec: RunSpec, runtime: Runtime, tokenizer: PreTrainedTokenizerBase) -> Session:
        """A Stage-3 run with no teacher: the model's own tokenizer, the Stage-3 data only."""
        spec.work_dir.mkdir(parents=True, exist_ok=True)
        session = cls(spec, replace(runtime, parallel=spec.preset.parallel), None, tokenizer)
        session.data(spec.preset.stage3.seq_len)
        return session

    @property
    def preset(self) -> Preset:
        return self.spec.preset

    @property
    def work_dir(self) -> Path:
        return self.spec.work_dir

    def data(self, seq_len: int, min_doc_tokens: int = 0) -> PackedData:
        """The training text in blocks of `seq_len`; the held-out blocks do not depend on `min_doc_tokens`."""
        key = (seq_len, min_doc_tokens)
        if key not in self._data:
            sources = resolve_sources(self.spec.data)
            streamed = any(s.kind == "hf" for s in sources)
            spec = DataSpec(self.spec.data, seq_len, self.preset.eval_tokens,
                            self._tokens_needed() if streamed else None, self.spec.text_field, min_doc_tokens)
            if self.runtime.is_main:
                prepare_data(spec, self.tokenizer)
            self.runtime.barrier()
            self._data[key] = prepare_data(spec, self.tokenizer)
        return self._data[key]

    def _tokens_needed(self) -> int:
        p = self.preset
        per_candidate = p.score.candidate.train.tokens
        return int(1.05 * max(p.stage1.tokens, per_candidate, p.stage2.train.tokens, p.stage3.tokens)) + 2 * p.eval_tokens

    def eval_set(self, seq_len: int | None = None) -> EvalSet:
        """Held-out blocks with the teacher's outputs (default: at the Stage-2 sequence length)."""
        seq_len = seq_len or self.preset.stage2.train.seq_len
        if seq_len not in self._eval:
            self._eval[seq_len] = EvalSet.build(self.teacher, self.data(seq_len), self.preset.eval_batch, self.runtime)
        return self._eval[seq_len]

    # ---- metrics ---------------------------------------------------------------------------
    def metrics(self) -> dict:
        path = self.work_dir / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {"kl": {}, "seconds": {}}

    def record(self, section: str, key: str, value: float) -> None:
        metrics = self.metrics()
        metrics.setdefault(section, {})[key] = value
        if self.runtime.is_main:
            write_json_atomic(self.work_dir / "metrics.json", metrics)
        self.runtime.barrier()

    def kl_once(self, label: str, build) -> None:
        """Record held-out KL of `build()` under `label` unless already recorded."""
        if label not in self.metrics()["kl"]:
            self.record("kl", label, heldout_kl(build(), self.eval_set(), self.runtime))

    def save_model(self, model: HybridForCausalLM, path: Path) -> None:
        """A finished step's model in the work directory, in float32 whatever the teacher's dtype: a
        resumed run must continue from exactly the weights an uninterrupted run holds in memory."""
        if self.runtime.is_main:
            save_hybrid(model, self.tokenizer, path, overwrite=True, dtype="float32")
            remove_checkpoints(path.parent)
        self.runtime.barrier()

    def build_stage0(self) -> HybridForCausalLM:
        if self.stage0 is None:
            L = self.teacher.config.num_hidden_layers
            provenance = {"teacher": self.spec.teacher, "tokens": {}}
            self.stage0 = hybrid_from_teacher(self.teacher, [LINEAR_ATTENTION] * L, provenance, seed=self.spec.seed)
            self.stage0.to(self.runtime.device)
        return self.stage0


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------


def describe_training_step(runtime: Runtime) -> dict[str, str]:
    """How a training step runs here, beyond the GDN path: one line per speed switch, with how to flip it."""
    return {
        "elementwise work (norms, MLPs, the GDN conv/gate chain)":
            "compiled (torch.compile)" if runtime.uses("compile") else "eager (parallel.compile=on compiles it)",
        "optimiser steps":
            f"replayed from a CUDA graph after {GRAPH_WARMUP} eager ones" if runtime.uses("cuda_graph")
            else "launched op by op (parallel.cuda_graph=on replays them from a CUDA graph, on one CUDA process)",
        "Stage 1 mixers": describe_stage1_mixers(runtime),
    }


def log_gdn_path(runtime: Runtime) -> str:
    """Log (and return) which GDN chunk implementation every stage's mixers run on this machine, and how the
    rest of the step runs."""
    from kernels.gdn import describe_gdn_backend, resolve_gdn_backend

    try:
        resolved = resolve_gdn_backend(runtime.parallel.gdn_backend, runtime.device, runtime.amp_dtype or torch.float32)
    except RuntimeError as error:  # an fla path asked for without CUDA or fla
        raise UserError(f"parallel.gdn_backend={runtime.parallel.gdn_backend}: {error}") from None
    path = describe_gdn_backend(resolved)
    log.info("GDN chunk path (training and prefill): %s", path)
    for what, how in describe_training_step(runtime).items():
        log.info("%s: %s", what, how)
    return path


@contextlib.contextmanager
def _timed(session: Session, name: str):
    """Record the wall time of a step that completes (not of one that raises)."""
    t0 = time.perf_counter()
    yield
    session.record("seconds", name, time.perf_counter() - t0)


def step_stage1(s: Session) -> HybridForCausalLM:
    out = s.work_dir / "stage1" / "model"
    if is_done(out):
        return load_hybrid(out, s.runtime)
    with _timed(s, "stage 1 (align)"):
        s.kl_once("stage 0, all linear", s.build_stage0)
        student = copy.deepcopy(s.build_stage0())
        cfg = s.preset.stage1
        run_stage1(s.teacher, student, s.data(cfg.seq_len), cfg, s.work_dir / "stage1", s.runtime,
                   s.eval_set(cfg.seq_len), s.preset.align_loss)
        student.config.provenance.setdefault("stages", []).append("stage1_align")
        student.config.provenance["tokens"]["stage1"] = cfg.tokens
        s.kl_once("stage 1, all linear", lambda: student)
        s.save_model(student, out)
    return student


def step_score(s: Session, stage1: HybridForCausalLM, selector: str) -> Ranking:
    score_dir = s.work_dir / "score"
    path = score_dir / RANKING_FILE
    if path.is_file():
        return Ranking.load(path)
    if selector not in SELECTORS:
        raise UserError(f"--selector must be one of {', '.join(SELECTORS)}, got {selector!r}")
    with _timed(s, f"layer selection ({selector})"):
        base, _, reach = selector.partition("+")
        ranking = _score(s, stage1, base, score_dir)
        if reach:
            cfg = s.preset.score
            ranking = with_reach(ranking, _score(s, stage1, reach, score_dir), cfg.reach_threshold)
        if s.runtime.is_main:
            score_dir.mkdir(parents=True, exist_ok=True)
            ranking.save(path)
        s.runtime.barrier()
    return ranking


def _score(s: Session, stage1: HybridForCausalLM, selector: str, score_dir: Path) -> Ranking:
    cfg = s.preset.score
    if selector == "ga-s2":
        data = s.data(cfg.candidate.train.seq_len, cfg.candidate.min_doc_tokens)
        return score_ga_s2(s.teacher, stage1, data, cfg, score_dir, s.runtime)
    if selector == "kl-restore":
        data = s.data(cfg.candidate.train.seq_len, cfg.candidate.min_doc_tokens)
        return score_kl_restore(s.teacher, stage1, data, cfg, score_dir, s.runtime)
    if selector == "ga-s1":
        return score_ga_s1(s.teacher, stage1, s.eval_set(s.preset.stage1.seq_len), s.runtime, s.preset.align_loss)
    if selector == "ablation":
        return score_ablation(s.teacher, s.tokenizer, cfg, score_dir, s.runtime)
    if selector == "retrieval":
        return score_retrieval(s.teacher, s.tokenizer, cfg, s.runtime)
    if selector == "reach":
        return score_reach(s.teacher, s.tokenizer, cfg, score_dir, s.runtime)
    return uniform_ranking(s.teacher.config.num_hidden_layers)


def step_stage2(s: Session, stage1: HybridForCausalLM, chosen: list[int], ranking: Ranking) -> HybridForCausalLM:
    out = s.work_dir / "stage2" / "model"
    if is_done(out):
        return load_hybrid(out, s.runtime)
    with _timed(s, "stage 2 (distill)"):
        s.kl_once("stage 0 (chosen layers softmax)", lambda: restore_softmax(s.build_stage0(), s.teacher, chosen))
        s.stage0 = None  # not needed any more
        hybrid = restore_softmax(stage1, s.teacher, chosen)
        s.kl_once("stage 1 (chosen layers softmax)", lambda: hybrid)
        prov = hybrid.config.provenance
        prov["selection"] = {"selector": ranking.selector, "order": ranking.order,
                             "scores": {str(k): v for k, v in ranking.scores.items()}, "metric": ranking.metric}
        prov["softmax_layers"] = chosen
        _distill(s, hybrid, first_sequence=0)
        s.save_model(hybrid, out)
    return hybrid


def step_stage2_more(s: Session, hybrid: HybridForCausalLM, source: Path) -> HybridForCausalLM:
    """Stage 2 again on a hybrid that has had one (`hybrid distill --from`): its layers and weights, the data
    order going on after the sequences its Stage 2 trained on, so that two runs of N steps read what one run
    of 2N steps reads. The optimiser starts afresh: a checkpoint holds no AdamW moments."""
    out = s.work_dir / "stage2" / "model"
    if is_done(out):
        return load_hybrid(out, s.runtime)
    prov = hybrid.config.provenance
    differ = [f"{key} {getattr(hybrid.config, key)} against the teacher's {getattr(s.teacher.config, key)}"
              for key in ("num_hidden_layers", "hidden_size", "vocab_size")
              if getattr(hybrid.config, key) != getattr(s.teacher.config, key)]
    if differ:
        raise UserError(f"--from {source} was not made from this teacher ({s.spec.teacher}): " + "; ".join(differ))
    if "stage2_distill" not in prov.get("stages", []):
        raise UserError(f"--from {source}: this hybrid has had no Stage 2 (its provenance lists the stages "
                        f"{prov.get('stages', [])}); distill an all-linear Stage-1 model with --stage1 instead")
    first = prov.get("stage2_sequences")
    if first is None:  # checkpoints before 2026-12-06 recorded the tokens only
        first = prov["tokens"].get("stage2", 0) // s.preset.stage2.train.seq_len
        log.info("--from %s records no stage2_sequences; taking %d (its Stage-2 tokens / seq_len)", source, first)
    if s.preset.stage2.train.warmup_steps == 0:
        log.info("--from: AdamW starts afresh; its first ~20 steps are large (--set stage2.train.warmup_steps=20 "
                 "keeps them small)")
    with _timed(s, "stage 2 (distill, continued)"):
        s.kl_once("before (the --from hybrid)", lambda: hybrid)
        _distill(s, hybrid, first_sequence=first)
        s.save_model(hybrid, out)
    return hybrid


def _distill(s: Session, hybrid: HybridForCausalLM, first_sequence: int) -> None:
    """Stage 2's training on `hybrid` in place, from the data order's sequence `first_sequence` on."""
    cfg = s.preset.stage2
    run_stage2(s.teacher, hybrid, s.data(cfg.train.seq_len, cfg.min_doc_tokens), cfg, s.work_dir / "stage2",
               s.runtime, s.eval_set(), first_sequence=first_sequence)
    prov = hybrid.config.provenance
    prov.setdefault("stages", []).append("stage2_distill")
    prov["tokens"]["stage2"] = prov["tokens"].get("stage2", 0) + cfg.train.tokens
    prov["stage2_sequences"] = first_sequence + cfg.train.steps * cfg.train.batch
    if cfg.min_doc_tokens:
        prov["stage2_min_doc_tokens"] = cfg.min_doc_tokens
    if cfg.copies.per_sequence:
        prov["stage2_copies"] = asdict(cfg.copies)
    s.kl_once("stage 2", lambda: hybrid)


def step_stage3(s: Session, model: HybridForCausalLM) -> HybridForCausalLM:
    cfg = s.preset.stage3
    out = s.work_dir / "stage3" / "model"
    if cfg.steps == 0:
        return model
    if is_done(out):
        return load_hybrid(out, s.runtime)
    with _timed(s, "stage 3 (finetune)"):
        eval_set = s.eval_set() if s.teacher is not None else None
        run_stage3(model, s.data(cfg.seq_len), cfg, s.work_dir / "stage3", s.runtime, eval_set)
        model.config.provenance.setdefault("stages", []).append("stage3_finetune")
        model.config.provenance["tokens"]["stage3"] = cfg.tokens
        if s.teacher is not None:
            s.kl_once("stage 3", lambda: model)
        s.save_model(model, out)
    return model


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertRequest:
    teacher: str
    out: Path
    data: tuple[str, ...] = ("demo",)
    ratio: float | None = None
    k: int | None = None
    selector: str = DEFAULT_SELECTOR
    preset: str = "demo"
    overrides: tuple[str, ...] = ()
    seed: int = 0
    work_dir: Path | None = None
    overwrite: bool = False
    text_field: str = "text"

    def identity(self, preset: Preset) -> dict:
        """What must match for a rerun to continue this run's work dir."""
        return {"teacher": self.teacher, "data": list(self.data), "text_field": self.text_field,
                "selector": self.selector, "seed": self.seed, "preset": preset.identity()}


def convert(req: ConvertRequest, runtime: Runtime) -> Path:
    out = Path(req.out)
    check_output_dir(out, req.overwrite)
    if (req.ratio is None) == (req.k is None):
        raise UserError("pass exactly one of --ratio or --k")
    if req.selector not in SELECTORS:
        raise UserError(f"--selector must be one of {', '.join(SELECTORS)}, got {req.selector!r}")
    preset = get_preset(req.preset, list(req.overrides), req.seed)
    work_dir = Path(req.work_dir) if req.work_dir else out.with_name(out.name + ".work")
    t0 = time.perf_counter()
    s = Session.open(RunSpec(req.teacher, tuple(req.data), preset, work_dir, req.seed, req.text_field), runtime,
                     req.identity(preset))
    s.record("seconds", "load teacher + data", time.perf_counter() - t0)
    L = s.teacher.config.num_hidden_layers
    k = req.k if req.k is not None else k_from_ratio(req.ratio, L)
    if not 0 <= k <= L:
        raise UserError(f"--k must be between 0 and {L} (the teacher's layer count), got {k}")

    stage1 = step_stage1(s)
    ranking = step_score(s, stage1, req.selector)
    chosen = ranking.choose(k)
    log.info("softmax layers: %s", chosen)
    model = step_stage2(s, stage1, chosen, ranking)
    del stage1
    model = step_stage3(s, model)

    metrics = s.metrics()
    model.config.provenance.update({"preset": preset.name, "heldout_kl": metrics["kl"], "k": k, "ratio": req.ratio})
    if runtime.is_main:
        logs = {name: read_log(work_dir / d) for name, d in
                (("stage 1 align", "stage1"), ("stage 2 distill", "stage2"), ("stage 3 finetune", "stage3"))}
        with atomic_directory(out, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            s.tokenizer.save_pretrained(tmp)
            ranking.save(tmp / RANKING_FILE)
            write_json_atomic(tmp / "metrics.json", metrics)
            (tmp / "logs").mkdir()
            for d in ("stage1", "stage2", "stage3"):
                if (work_dir / d / "log.jsonl").is_file():
                    shutil.copy(work_dir / d / "log.jsonl", tmp / "logs" / f"{d}.jsonl")
            write_report(tmp, ReportInputs(
                teacher=req.teacher, config=model.config, ranking=ranking, chosen=chosen, preset=preset.name,
                data=s.data(preset.stage2.train.seq_len, preset.stage2.min_doc_tokens).meta, kl=metrics["kl"],
                logs=logs,
                seconds=dict(metrics["seconds"]),
                start_eval={"stage 2 distill": metrics["kl"].get("stage 1 (chosen layers softmax)"),
                            "stage 3 finetune": metrics["kl"].get("stage 2")},
                command=" ".join(["hybrid"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("hybrid") else "",
                date=datetime.date.today().isoformat(), device=_device_name(runtime),
            ))
    runtime.barrier()
    return out


def _device_name(runtime: Runtime) -> str:
    if runtime.device.type == "cuda":
        return f"{runtime.world} x {torch.cuda.get_device_name(runtime.device)}"
    return f"{runtime.world} CPU process(es), {torch.get_num_threads()} threads each"


def save_ranking_outputs(ranking: Ranking, out: Path, k: int | None = None) -> None:
    """`hybrid score` output: ranking.json + layer_scores.png (+ score_curves.png for GA-S2)."""
    chosen = ranking.choose(k) if k is not None else []
    with atomic_directory(out, overwrite=True) as tmp:
        ranking.save(tmp / RANKING_FILE)
        plot_scores(ranking, chosen, tmp / "layer_scores.png")
        plot_curves(ranking, chosen, tmp / "score_curves.png")


__all__ = ["RunSpec", "Session", "ConvertRequest", "convert"]
