"""`hybrid convert`: teacher -> Stage 0+1 -> layer selection -> Stage 2 -> (Stage 3) -> checkpoint + report.

Everything is resumable. The work directory (default: OUT.work next to the output) holds

    run.json              what this run is (teacher, data, preset, K, selector); a rerun must match it
    metrics.json          held-out KL per stage and wall times, written as they are measured
    stage1/               log.jsonl, ckpt.pt while training, model/ once done (all-linear Stage-1 hybrid)
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
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch
from torch import nn

from distill.checkpoint import atomic_directory, save_hybrid
from distill.config import LINEAR_ATTENTION
from distill.data import DataSpec, PackedData, prepare_data, resolve_sources
from distill.distributed import Runtime
from distill.errors import UserError
from distill.modeling import HybridForCausalLM
from distill.placement import k_from_ratio
from distill.report import ReportInputs, plot_curves, plot_scores, write_report
from distill.selection import (
    RANKING_FILE,
    SELECTORS,
    Ranking,
    ScoreConfig,
    score_ablation,
    score_ga_s1,
    score_ga_s2,
    score_kl_restore,
    uniform_ranking,
)
from distill.stages import EvalSet, Stage2Config, heldout_kl, restore_softmax, run_stage1, run_stage2, run_stage3
from distill.teacher import load_teacher
from distill.train import CHECKPOINT, TrainConfig, read_log
from distill.transfer import hybrid_from_teacher

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    name: str
    eval_tokens: int  # held-out tokens (the same documents for every stage)
    eval_batch: int  # held-out blocks per forward
    stage1: TrainConfig
    score: ScoreConfig
    stage2: Stage2Config
    stage3: TrainConfig  # steps=0: no Stage 3
    align_loss: str = "l2"  # Stage 1: "l2" (||t - s|| / sqrt(d), the reference) or "mse"

    @property
    def seq_lens(self) -> list[int]:
        lens = {self.stage1.seq_len, self.score.candidate.train.seq_len, self.stage2.train.seq_len}
        if self.stage3.steps:
            lens.add(self.stage3.seq_len)
        return sorted(lens)


def _demo() -> Preset:
    """SmolLM2-135M (30 layers) on 2 CPU cores in well under 20 minutes: enough to exercise every step, not
    to make a good model. Budgets are ~10^4 x smaller than the reference, so Stage 1 uses LR 5e-3
    (at 1e-3 a dozen steps barely move the all-linear KL); Stage 2 keeps the reference LRs."""
    seq = 256
    return Preset(
        name="demo",
        eval_tokens=2 * seq,
        eval_batch=2,
        stage1=TrainConfig(steps=8, seq_len=seq, batch=2, micro_batch=2, lr=5e-3, schedule="cosine", save_every=4),
        score=ScoreConfig(  # 30 candidates: one step of 128 tokens each, scored on 256 held-out tokens
            candidate=Stage2Config(TrainConfig(steps=1, seq_len=seq // 2, batch=1, micro_batch=1, lr=1e-4,
                                               schedule="constant")),
            eval_batch=2, eval_blocks=2, recall_samples=16, recall_pairs=12,
        ),
        stage2=Stage2Config(TrainConfig(steps=6, seq_len=seq, batch=2, micro_batch=2, lr=1e-4, schedule="constant", save_every=3)),
        stage3=TrainConfig(steps=0, seq_len=seq, batch=2, micro_batch=2, lr=1e-5, schedule="constant", save_every=6),
    )


def _small() -> Preset:
    """One GPU, a ~100M-3B teacher: 20M Stage-1 tokens, 0.5M tokens per candidate, 65M Stage-2 tokens."""
    return Preset(
        name="small",
        eval_tokens=32 * 2048,
        eval_batch=8,
        stage1=TrainConfig(steps=400, seq_len=512, batch=96, micro_batch=16, lr=1e-3, warmup_steps=20, save_every=50),
        score=ScoreConfig(
            candidate=Stage2Config(TrainConfig(steps=32, seq_len=1024, batch=16, micro_batch=8, lr=1e-4,
                                               schedule="constant", eval_every=8)),
            eval_batch=8,
        ),
        stage2=Stage2Config(TrainConfig(steps=1000, seq_len=2048, batch=32, micro_batch=8, lr=1e-4,
                                        schedule="constant", save_every=100, eval_every=100)),
        stage3=TrainConfig(steps=0, seq_len=4096, batch=16, micro_batch=2, lr=1e-5, schedule="constant", save_every=100),
    )


def _paper() -> Preset:
    """The reference budgets: Stage 1 100M tokens (seq 512, batch 96, LR 1e-3 cosine); Stage 2 600M
    tokens (seq 4096, batch 32, LRs 1e-4 / 7e-6 constant); ~13M tokens per GA-S2 candidate."""
    return Preset(
        name="paper",
        eval_tokens=64 * 4096,
        eval_batch=8,
        stage1=TrainConfig(steps=2035, seq_len=512, batch=96, micro_batch=32, lr=1e-3, warmup_steps=50, save_every=100,
                           eval_every=500),
        score=ScoreConfig(
            candidate=Stage2Config(TrainConfig(steps=100, seq_len=4096, batch=32, micro_batch=4, lr=1e-4,
                                               schedule="constant", eval_every=25)),
            eval_batch=8,
        ),
        stage2=Stage2Config(TrainConfig(steps=4578, seq_len=4096, batch=32, micro_batch=4, lr=1e-4,
                                        schedule="constant", save_every=100, eval_every=500)),
        stage3=TrainConfig(steps=0, seq_len=16384, batch=8, micro_batch=1, lr=1e-5, schedule="constant", save_every=100),
    )


PRESETS = {"demo": _demo, "small": _small, "paper": _paper}

# Training tokens/s measured for SmolLM2-135M at 8 x 2048 tokens per micro-batch on the default GDN path
# (bench/results/train_throughput.md, 2026-12-05). Only an H200 could be had that day; an H100 runs the
# same kernels somewhat slower. GA-S2 candidates are Stage-2 runs; Stage 3 is plain fine-tuning.
MEASURED_TOK_S = {"stage1": 56_354.0, "stage2": 39_652.0, "stage3": 124_220.0}
MEASURED_ON = "one H200, SmolLM2-135M, 8 x 2048 tokens per micro-batch, bench/results/train_throughput.md"


def preset_budget(preset: Preset, num_layers: int = 30, tok_s: dict[str, float] | None = None) -> list[dict]:
    """Per stage: tokens per optimiser step, steps, tokens, and GPU-minutes at the measured throughput
    (GA-S2: `num_layers` candidate runs; SmolLM2-135M has 30)."""
    tok_s = tok_s or MEASURED_TOK_S
    stages = [("stage 1 align", preset.stage1, 1, "stage1"),
              (f"GA-S2 candidates ({num_layers} x)", preset.score.candidate.train, num_layers, "stage2"),
              ("stage 2 distill", preset.stage2.train, 1, "stage2"),
              ("stage 3 finetune", preset.stage3, 1, "stage3")]
    rows = []
    for name, cfg, runs, speed in stages:
        tokens = runs * cfg.tokens
        minutes = tokens / tok_s[speed] / 60 if tok_s[speed] else None
        rows.append({"stage": name, "tokens_per_step": cfg.batch * cfg.seq_len, "steps": runs * cfg.steps,
                     "tokens": tokens, "gpu_minutes": None if minutes is None else round(minutes, 1)})
    return rows


def format_preset_budget(preset: Preset, num_layers: int = 30) -> str:
    """The budget table `hybrid presets` prints under a preset's settings."""
    lines = [f"{preset.name}: GPU-minutes at the measured throughput ({MEASURED_ON})",
             f"{'stage':<28}{'tokens/step':>12}{'steps':>8}{'tokens':>14}{'GPU-min':>9}"]
    rows = preset_budget(preset, num_layers)
    for r in rows:
        minutes = "-" if r["gpu_minutes"] is None else f"{r['gpu_minutes']:.1f}"
        lines.append(f"{r['stage']:<28}{r['tokens_per_step']:>12,}{r['steps']:>8,}{r['tokens']:>14,}{minutes:>9}")
    total = sum(r["gpu_minutes"] or 0 for r in rows)
    lines.append(f"{'total':<62}{total:>9.1f}")
    if preset.name == "paper":
        lines.append("reference recipe (DESIGN.md 2.2): Stage 1 100M tokens (seq 512, batch 96), Stage 2 600M tokens "
                     "(seq 4096, batch 32) - matched; the per-candidate GA-S2 budget (100 steps x 32 x 4096 = 13.1M "
                     "tokens) is ours: the reference states none")
    return "\n".join(lines)


def get_preset(name: str, overrides: list[str] | None = None, seed: int | None = None) -> Preset:
    """A preset by name with `path.to.field=value` overrides, e.g. stage2.train.steps=10."""
    if name not in PRESETS:
        raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    preset = PRESETS[name]()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. stage2.train.steps=10")
        preset = _override(preset, key.strip().split("."), value.strip(), key)
    if seed is not None:
        preset = replace(
            preset,
            stage1=replace(preset.stage1, seed=seed),
            score=replace(preset.score, candidate=replace(preset.score.candidate, train=replace(preset.score.candidate.train, seed=seed))),
            stage2=replace(preset.stage2, train=replace(preset.stage2.train, seed=seed)),
            stage3=replace(preset.stage3, seed=seed),
        )
    return preset


def _override(obj, path: list[str], value: str, full_key: str):
    names = {f.name: f for f in fields(obj)}
    if path[0] not in names:
        raise UserError(f"--set {full_key}: {type(obj).__name__} has no field {path[0]!r} (fields: {', '.join(names)})")
    current = getattr(obj, path[0])
    if len(path) > 1:
        if not is_dataclass(current):
            raise UserError(f"--set {full_key}: {path[0]!r} is not a group of settings")
        return replace(obj, **{path[0]: _override(current, path[1:], value, full_key)})
    if is_dataclass(current):
        raise UserError(f"--set {full_key}: name a field inside {path[0]!r}, e.g. {full_key}.steps=10")
    kind = type(current)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            parsed = value.lower() in ("true", "1")
        else:
            parsed = kind(value)
    except ValueError:
        raise UserError(f"--set {full_key}={value}: expected a {kind.__name__}") from None
    return replace(obj, **{path[0]: parsed})


# ---------------------------------------------------------------------------------------------
# One run: teacher, data, work dir, metrics
# ---------------------------------------------------------------------------------------------


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def is_done(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file()


def load_hybrid(path: Path, runtime: Runtime) -> HybridForCausalLM:
    if not is_done(path):
        raise UserError(f"{path} is not a hybrid checkpoint (no config.json)")
    return HybridForCausalLM.from_pretrained(path, dtype=torch.float32).to(runtime.device).eval()


@dataclass
class Session:
    teacher_spec: str
    data_sources: tuple[str, ...]
    preset: Preset
    runtime: Runtime
    work_dir: Path
    seed: int = 0
    text_field: str = "text"
    teacher: nn.Module | None = None
    tokenizer: object = None
    _data: dict[int, PackedData] = field(default_factory=dict)
    _eval: dict[int, EvalSet] = field(default_factory=dict)
    stage0: HybridForCausalLM | None = None  # kept in memory after building it, for the Stage-0 KL

    # ---- setup ---------------------------------------------------------------------------
    def start(self, identity: dict) -> None:
        """Check the work dir belongs to this run, load the teacher, tokenise every data set needed."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        run_file = self.work_dir / "run.json"
        if run_file.is_file():
            previous = json.loads(run_file.read_text())
            diffs = [k for k in identity if previous.get(k) != identity[k]]
            if diffs:
                k = diffs[0]
                raise UserError(
                    f"work dir {self.work_dir} belongs to another run: {k} was {previous.get(k)!r}, now {identity[k]!r}; "
                    "use another --work-dir, or delete it to start over"
                )
        # the first load may download and convert the teacher: process 0 does it, the others wait
        if not self.runtime.is_main:
            self.runtime.barrier()
        teacher, tokenizer = load_teacher(self.teacher_spec)
        if self.runtime.is_main:
            self.runtime.barrier()
        self.teacher = teacher.to(self.runtime.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        log_gdn_path(self.runtime)
        for seq_len in self.preset.seq_lens:  # all data problems surface here, before any training
            self.data(seq_len)
        if self.runtime.is_main and not run_file.is_file():
            _atomic_json(run_file, identity)

    def data(self, seq_len: int) -> PackedData:
        if seq_len not in self._data:
            sources = resolve_sources(self.data_sources)
            streamed = any(s.kind == "hf" for s in sources)
            spec = DataSpec(self.data_sources, seq_len, self.preset.eval_tokens,
                            self._tokens_needed() if streamed else None, self.text_field)
            if self.runtime.is_main:
                prepare_data(spec, self.tokenizer)
            self.runtime.barrier()
            self._data[seq_len] = prepare_data(spec, self.tokenizer)
        return self._data[seq_len]

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
            _atomic_json(self.work_dir / "metrics.json", metrics)
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
            ckpt = path.parent / CHECKPOINT
            if ckpt.is_file():
                ckpt.unlink()
        self.runtime.barrier()

    def build_stage0(self) -> HybridForCausalLM:
        if self.stage0 is None:
            L = self.teacher.config.num_hidden_layers
            provenance = {"teacher": self.teacher_spec, "tokens": {}}
            self.stage0 = hybrid_from_teacher(self.teacher, [LINEAR_ATTENTION] * L, provenance, seed=self.seed)
            self.stage0.to(self.runtime.device)
        return self.stage0


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------


def log_gdn_path(runtime: Runtime) -> str:
    """Log (and return) which GDN chunk implementation every stage's mixers run on this machine."""
    from kernels.gdn import describe_gdn_backend, resolve_gdn_backend

    path = describe_gdn_backend(resolve_gdn_backend("auto", runtime.device, runtime.amp_dtype or torch.float32))
    log.info("GDN chunk path (training and prefill): %s", path)
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
    L = s.teacher.config.num_hidden_layers
    with _timed(s, f"layer selection ({selector})"):
        if selector == "ga-s2":
            cfg = s.preset.score
            ranking = score_ga_s2(s.teacher, stage1, s.data(cfg.candidate.train.seq_len), cfg, score_dir, s.runtime)
        elif selector == "kl-restore":
            cfg = s.preset.score
            ranking = score_kl_restore(s.teacher, stage1, s.data(cfg.candidate.train.seq_len), cfg, score_dir,
                                       s.runtime)
        elif selector == "ga-s1":
            ranking = score_ga_s1(s.teacher, stage1, s.eval_set(s.preset.stage1.seq_len), s.runtime, s.preset.align_loss)
        elif selector == "ablation":
            ranking = score_ablation(s.teacher, s.tokenizer, s.preset.score, score_dir, s.runtime)
        else:
            ranking = uniform_ranking(L)
        if s.runtime.is_main:
            score_dir.mkdir(parents=True, exist_ok=True)
            ranking.save(path)
        s.runtime.barrier()
    return ranking


def step_stage2(s: Session, stage1: HybridForCausalLM, chosen: list[int], ranking: Ranking) -> HybridForCausalLM:
    out = s.work_dir / "stage2" / "model"
    if is_done(out):
        return load_hybrid(out, s.runtime)
    with _timed(s, "stage 2 (distill)"):
        s.kl_once("stage 0 (chosen layers softmax)", lambda: restore_softmax(s.build_stage0(), s.teacher, chosen))
        s.stage0 = None  # not needed any more
        hybrid = restore_softmax(stage1, s.teacher, chosen)
        s.kl_once("stage 1 (chosen layers softmax)", lambda: hybrid)
        cfg = s.preset.stage2
        run_stage2(s.teacher, hybrid, s.data(cfg.train.seq_len), cfg, s.work_dir / "stage2", s.runtime, s.eval_set())
        prov = hybrid.config.provenance
        prov.setdefault("stages", []).append("stage2_distill")
        prov["tokens"]["stage2"] = cfg.train.tokens
        prov["selection"] = {"selector": ranking.selector, "order": ranking.order,
                             "scores": {str(k): v for k, v in ranking.scores.items()}, "metric": ranking.metric}
        prov["softmax_layers"] = chosen
        s.kl_once("stage 2", lambda: hybrid)
        s.save_model(hybrid, out)
    return hybrid


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
    selector: str = "ga-s2"
    preset: str = "demo"
    overrides: tuple[str, ...] = ()
    seed: int = 0
    work_dir: Path | None = None
    overwrite: bool = False
    text_field: str = "text"

    def identity(self, preset: Preset) -> dict:
        """What must match for a rerun to continue this run's work dir."""
        return {"teacher": self.teacher, "data": list(self.data), "text_field": self.text_field,
                "selector": self.selector, "seed": self.seed, "preset": json.loads(json.dumps(asdict(preset)))}


def convert(req: ConvertRequest, runtime: Runtime) -> Path:
    out = Path(req.out)
    if out.exists() and any(out.iterdir()) and not req.overwrite:
        raise UserError(f"output directory {out} already exists and is not empty (pass --overwrite to replace it)")
    if (req.ratio is None) == (req.k is None):
        raise UserError("pass exactly one of --ratio or --k")
    if req.selector not in SELECTORS:
        raise UserError(f"--selector must be one of {', '.join(SELECTORS)}, got {req.selector!r}")
    preset = get_preset(req.preset, list(req.overrides), req.seed)
    work_dir = Path(req.work_dir) if req.work_dir else out.with_name(out.name + ".work")
    s = Session(req.teacher, tuple(req.data), preset, runtime, work_dir, req.seed, req.text_field)
    with _timed(s, "load teacher + data"):
        s.start(req.identity(preset))
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
            _atomic_json(tmp / "metrics.json", metrics)
            (tmp / "logs").mkdir()
            for d in ("stage1", "stage2", "stage3"):
                if (work_dir / d / "log.jsonl").is_file():
                    shutil.copy(work_dir / d / "log.jsonl", tmp / "logs" / f"{d}.jsonl")
            write_report(tmp, ReportInputs(
                teacher=req.teacher, config=model.config, ranking=ranking, chosen=chosen, preset=preset.name,
                data=s.data(preset.stage2.train.seq_len).meta, kl=metrics["kl"], logs=logs,
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


__all__ = ["Preset", "PRESETS", "get_preset", "preset_budget", "format_preset_budget", "Session", "ConvertRequest", "convert"]
