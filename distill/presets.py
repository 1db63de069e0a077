"""Budget presets (demo, small, paper): every stage's training settings, their GPU-minute cost at the
measured throughput, and the `--set path.to.field=value` parser that edits them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, is_dataclass, replace

from distill.distributed import ParallelConfig
from distill.errors import UserError
from distill.selection import ScoreConfig
from distill.stages import Stage2Config
from distill.train import TrainConfig


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
    parallel: ParallelConfig = ParallelConfig()  # how it runs, not what it computes: not in `identity`

    def identity(self) -> dict:
        """The settings a rerun must match to continue a run's work dir (JSON types)."""
        settings = asdict(self)
        del settings["parallel"]
        return json.loads(json.dumps(settings))

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
        # 30 candidates: one step of 128 tokens each, scored on 256 held-out tokens; reach: 8 prompts x 31
        # teacher forwards of 256 tokens (~0.6 s each on 2 cores)
        score=ScoreConfig(
            candidate=Stage2Config(TrainConfig(steps=1, seq_len=seq // 2, batch=1, micro_batch=1, lr=1e-4,
                                               schedule="constant")),
            eval_batch=2, eval_blocks=2, recall_samples=8, recall_pairs=12, retrieval_context=256, reach_window=32,
        ),
        stage2=Stage2Config(TrainConfig(steps=6, seq_len=seq, batch=2, micro_batch=2, lr=1e-4, schedule="constant", save_every=3)),
        stage3=TrainConfig(steps=0, seq_len=seq, batch=2, micro_batch=2, lr=1e-5, schedule="constant", save_every=6),
    )


def _small() -> Preset:
    """One GPU, a ~100M-3B teacher: 20M Stage-1 tokens, 0.5M tokens per candidate, 65M Stage-2 tokens.
    Stage 2 runs its mixers at twice the reference LR: at 33M and 65M tokens a SmolLM2 hybrid reached a lower
    held-out KL at 2e-4 than at 1e-4 (bench/results/quality_h100/stage2_4k_lr2/), and a decaying LR was worse."""
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
        stage2=Stage2Config(TrainConfig(steps=1000, seq_len=2048, batch=32, micro_batch=8, lr=2e-4,
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

# Training tokens/s measured for SmolLM2-135M at 8 x 2048 tokens per micro-batch on one GPU's defaults: the
# fla-triton-dqkwg GDN path, Stage 1 stacked, compiled, each step replayed from a CUDA graph
# (bench/results/train_throughput.md, 2026-12-07, one H100, Triton 3.6; with fla-torch-dqkwg, where our kernel
# is not used, the same run gave 142.5K / 94.5K). GA-S2
# candidates are Stage-2 runs (their first steps run eager and compile, so short candidates run slower than
# this); Stage 3 is plain fine-tuning.
MEASURED_TOK_S = {"stage1": 162_727.0, "stage2": 101_064.0, "stage3": 132_966.0}
MEASURED_ON = "one H100, SmolLM2-135M, 8 x 2048 tokens per micro-batch, bench/results/train_throughput.md"


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
        lines.append("reference recipe (docs/design.md §2.2): Stage 1 100M tokens (seq 512, batch 96), Stage 2 600M tokens "
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
