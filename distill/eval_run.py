"""`hybrid eval` as a function: load each model once, run every requested measurement, keep the report.

The teacher (when known) is evaluated first, as the ceiling; then each checkpoint, one at a time;
then a running server, if one is given, on the lm-eval tasks. After every finished measurement the
JSON and markdown are rewritten, so an interrupted run (Ctrl-C) keeps everything measured so far;
the caller then writes the plot of what is there and reports the run as interrupted.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from distill.data import DataSpec, prepare_data, tokenizer_fingerprint
from distill.distributed import Runtime
from distill.errors import UserError
from distill.eval_harness import HarnessSpec, ServerTarget, checkpoint_model_args, run_harness
from distill.eval_recall import score_recall
from distill.eval_report import write_markdown, write_outputs
from distill.eval_results import EvalReport, ModelReport
from distill.evaluate import EvalSet, heldout_scores
from distill.recall_tasks import RecallSample, RecallTaskSpec, build_recall_task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str  # checkpoint directory or hub id


@dataclass(frozen=True)
class EvalRequest:
    models: tuple[ModelSpec, ...]
    out: Path
    teacher: str | None = None  # None: the first checkpoint's provenance names it (or no teacher row)
    heldout: bool = True
    recall_kinds: tuple[str, ...] = ("passkey", "multikey", "assoc", "vartrack")
    lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    samples: int = 100
    seed: int = 0
    needles: dict[str, int] = field(default_factory=dict)  # kind -> needles (default per kind)
    batch_tokens: int = 16384  # recall prompts per forward = max(1, batch_tokens // context)
    data: tuple[str, ...] = ("demo",)
    text_field: str = "text"
    seq_len: int = 512
    eval_tokens: int = 8192
    heldout_batch: int = 4
    harness: HarnessSpec | None = None
    server: ServerTarget | None = None
    command: str = ""

    def settings(self) -> dict:
        raw = asdict(self)
        raw.pop("command")
        if raw["server"] and raw["server"]["api_key"]:
            raw["server"]["api_key"] = "(set, not recorded)"
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in raw.items()}


def device_name(runtime: Runtime) -> str:
    if runtime.device.type == "cuda":
        return torch.cuda.get_device_name(runtime.device)
    return f"CPU, {torch.get_num_threads()} threads"


def load_model(path: str, runtime: Runtime) -> tuple[nn.Module, object]:
    """(model in float32 on the runtime's device, its tokenizer) for a hybrid or plain checkpoint or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import distill  # noqa: F401  (registers the hybrid architecture)

    local = Path(path).expanduser()
    if local.exists() or path.startswith((".", "/", "~")):
        if not (local / "config.json").is_file():
            raise UserError(f"{path}: no config.json (expected a checkpoint directory written by `hybrid` or transformers)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise UserError(f"could not load model {path}: {err}") from None
    return model.to(runtime.device).eval().requires_grad_(False), tokenizer


def _model_report(name: str, path: str, role: str, model: nn.Module | None) -> ModelReport:
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None)
    softmax = None
    if config is not None and getattr(config, "model_type", "") == "hybrid_gdn":
        softmax = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    provenance = getattr(config, "provenance", None) or {}
    return ModelReport(name=name, path=path, role=role, softmax_layers=softmax,
                       num_layers=getattr(config, "num_hidden_layers", None),
                       trained_tokens=dict(provenance.get("tokens", {})))


def _teacher_spec(req: EvalRequest) -> str | None:
    if req.teacher:
        return req.teacher
    for spec in req.models:
        config = Path(spec.path) / "config.json"
        if config.is_file():
            teacher = (json.loads(config.read_text()).get("provenance") or {}).get("teacher")
            if teacher:
                log.info("teacher from %s's provenance: %s", spec.path, teacher)
                return teacher
    return None


def _teacher_harness_path(spec: str) -> str | None:
    """What lm-eval's `hf` model can load for the teacher (None for a .gguf file)."""
    from distill.model.teacher import SMOLLM2_ALIAS, smollm2_checkpoint

    if spec == SMOLLM2_ALIAS:
        return str(smollm2_checkpoint())
    return None if spec.endswith(".gguf") else spec


def heldout_overlap_warnings(config, eval_tokens: int) -> list[str]:
    """A conversion held out the first `eval_tokens` of its --data (by content hash); asking for more here
    scores text it may have trained on. Only convert's provenance names its preset, hence its eval_tokens."""
    from distill.presets import PRESETS

    preset = ((getattr(config, "provenance", None) or {}).get("preset"))
    if preset not in PRESETS:
        return []
    held_out = PRESETS[preset]().eval_tokens
    if eval_tokens <= held_out:
        return []
    return [f"converted with preset {preset!r}, which held out {held_out} tokens of its --data (unless --set "
            f"eval_tokens changed it); --eval-tokens {eval_tokens} may score text it trained on if --data is the same"]


class Evaluation:
    """One `hybrid eval` run; `report` always holds what has been measured."""

    def __init__(self, req: EvalRequest, runtime: Runtime):
        self.req = req
        self.runtime = runtime
        self.report = EvalReport(date=datetime.date.today().isoformat(), device=device_name(runtime),
                                 command=req.command, settings=req.settings())
        self._tasks: dict[tuple[str, str, int], list[RecallSample]] = {}
        self.eval_set: EvalSet | None = None

    # ---- the run -------------------------------------------------------------------------------
    def check(self) -> None:
        req = self.req
        if not req.models and req.teacher is None and req.server is None:
            raise UserError("nothing to evaluate: pass checkpoints, --teacher or --server")
        if req.server is not None and req.harness is None:
            raise UserError("--server answers lm-eval tasks only: pass --tasks lm:TASK or a task .yaml file")
        for length in req.lengths:
            if length < 64:
                raise UserError(f"--lengths: {length} is too short for a recall prompt (at least 64 tokens)")
        if req.harness is not None:
            req.harness.check()
        if req.samples < 1:
            raise UserError(f"--samples must be at least 1, got {req.samples}")

    def run(self) -> EvalReport:
        """Evaluate everything; a KeyboardInterrupt marks the report interrupted and is re-raised."""
        self.check()
        req = self.req
        try:
            teacher_spec = _teacher_spec(req)
            if teacher_spec is None and req.heldout:
                raise UserError("held-out KL needs the teacher: pass --teacher (hub id, directory, .gguf or smollm2-135m)")
            if teacher_spec is not None:
                self._run_teacher(teacher_spec)
            for spec in req.models:
                model, tokenizer = load_model(spec.path, self.runtime)
                self._evaluate(self._add(_model_report(spec.name, spec.path, "model", model)), model, tokenizer, spec.path)
                del model
                gc.collect()
            if req.server is not None:
                row = self._add(ModelReport(name=f"server:{req.server.model}", path=req.server.base_url, role="server"))
                row.lm_eval = run_harness("local-completions", req.server.model_args(), req.harness)
                self._flush()
        except KeyboardInterrupt:
            self.report.interrupted = True
            raise
        finally:
            write_outputs(self.report, self.req.out)
        return self.report

    def _run_teacher(self, spec: str) -> None:
        from distill.model.teacher import load_teacher

        teacher, tokenizer = load_teacher(spec)
        teacher = teacher.to(self.runtime.device).eval().requires_grad_(False)
        if self.req.heldout:
            data = prepare_data(DataSpec(tuple(self.req.data), self.req.seq_len, self.req.eval_tokens,
                                         text_field=self.req.text_field), tokenizer)
            self.eval_set = EvalSet.build(teacher, data, self.req.heldout_batch, self.runtime)
        row = self._add(_model_report("teacher", spec, "teacher", teacher))
        self._evaluate(row, teacher, tokenizer, _teacher_harness_path(spec))
        del teacher
        gc.collect()

    def _add(self, row: ModelReport) -> ModelReport:
        self.report.models.append(row)
        self._flush()
        return row

    def _flush(self) -> None:
        self.req.out.mkdir(parents=True, exist_ok=True)
        self.report.save(self.req.out / "results.json")
        write_markdown(self.report, self.req.out / "results.md")

    # ---- one model -----------------------------------------------------------------------------
    def _evaluate(self, row: ModelReport, model: nn.Module, tokenizer, harness_path: str | None) -> None:
        req = self.req
        if self.eval_set is not None:
            row.warnings += heldout_overlap_warnings(model.config, req.eval_tokens)
            row.heldout = heldout_scores(model, self.eval_set, self.runtime, req.seq_len, desc=f"{row.name}: held-out")
            self._flush()
        max_len = getattr(model.config, "max_position_embeddings", None)
        for kind in req.recall_kinds:
            for length in req.lengths:
                if max_len is not None and length > max_len:
                    row.skipped[f"{kind}@{length}"] = f"longer than max_position_embeddings {max_len}"
                    continue
                spec = RecallTaskSpec(kind, length, req.samples, req.seed, req.needles.get(kind))
                samples = self._recall_samples(spec, tokenizer)
                batch = max(1, req.batch_tokens // length)
                row.recall.append(score_recall(model, spec, samples, self.runtime, batch, desc=f"{row.name}: {spec.name}"))
                self._flush()
        if req.harness is not None:
            if harness_path is None:
                row.skipped["lm-eval"] = "lm-eval's hf model needs a checkpoint directory or hub id, not a .gguf file"
            else:
                args = checkpoint_model_args(harness_path, str(self.runtime.device))
                row.lm_eval = run_harness("hf", args, req.harness)
            self._flush()

    def _recall_samples(self, spec: RecallTaskSpec, tokenizer) -> list[RecallSample]:
        key = (tokenizer_fingerprint(tokenizer), spec.kind, spec.context)
        if key not in self._tasks:
            self._tasks[key] = build_recall_task(spec, tokenizer)
        return self._tasks[key]
