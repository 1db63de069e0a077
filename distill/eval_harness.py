"""lm-evaluation-harness, both ways: a checkpoint through lm-eval's `hf` model, or a running server
(`hybrid serve`, or any OpenAI-compatible /v1/completions) through its `local-completions` model.

Tasks are lm-eval task names ("hellaswag") or local task files ("path/to/task.yaml"); a folder of
task files can be added with `include`. What a user would type by hand, for reference:

    lm_eval --model hf --model_args pretrained=CKPT,trust_remote_code=True,dtype=float32 --tasks TASK
    lm_eval --model local-completions --tasks TASK --model_args \\
        base_url=http://127.0.0.1:8000/v1/completions,model=NAME,tokenizer=CKPT,tokenizer_backend=huggingface

Log-likelihood requests to a server send token ids (`tokenized_requests`) with `echo` + `logprobs`,
so the tokenizer must be the served model's: a local directory (the checkpoint) works offline.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import UserError

log = logging.getLogger(__name__)

API_PACKAGES = ("aiohttp", "tenacity", "requests")  # what lm-eval's API models import (its `api` extra)


@dataclass(frozen=True)
class HarnessSpec:
    """lm-eval tasks and how to run them."""

    tasks: tuple[str, ...]  # task names or .yaml paths
    include: tuple[str, ...] = ()  # extra folders of task files
    limit: int | None = None  # examples per task (None: all)
    batch_size: int = 1
    num_fewshot: int | None = None
    seed: int = 0

    def check(self) -> None:
        for task in self.tasks:
            if task.endswith((".yaml", ".yml")) and not Path(task).is_file():
                raise UserError(f"lm-eval task file {task} not found")
        for folder in self.include:
            if not Path(folder).is_dir():
                raise UserError(f"--lm-eval-include {folder}: no such folder")


@dataclass(frozen=True)
class ServerTarget:
    """A running OpenAI-compatible server that lm-eval's `local-completions` model talks to."""

    base_url: str  # http://host:port (with or without /v1/completions)
    model: str  # the served model name
    tokenizer: str  # a local tokenizer directory (the checkpoint) or a hub id
    api_key: str | None = None
    max_length: int = 2048
    extra: dict = field(default_factory=dict)

    @property
    def completions_url(self) -> str:
        url = self.base_url.rstrip("/")
        if url.endswith("/v1/completions"):
            return url
        return url + ("/completions" if url.endswith("/v1") else "/v1/completions")

    def model_args(self) -> dict:
        args = {
            "base_url": self.completions_url,
            "model": self.model,
            "tokenizer": self.tokenizer,
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "max_length": self.max_length,
            "num_concurrent": 1,
            "max_retries": 2,
            **self.extra,
        }
        if self.api_key:
            args["header"] = {"Authorization": f"Bearer {self.api_key}"}
        return args


def checkpoint_model_args(path: str, device: str, dtype: str = "float32") -> dict:
    """lm-eval `hf` model arguments for a checkpoint directory (hybrid or plain) or a hub id."""
    return {"pretrained": path, "trust_remote_code": True, "dtype": dtype, "device": device}


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm-eval tasks need the lm-evaluation-harness: pip install lm-eval") from None
    return lm_eval, TaskManager


def run_harness(model: str, model_args: dict, spec: HarnessSpec) -> dict[str, dict[str, float]]:
    """Run lm-eval and return {task: {metric: value}} (metric names as lm-eval writes them, e.g. 'acc,none')."""
    spec.check()
    lm_eval, TaskManager = _lm_eval()
    if model == "local-completions":
        missing = [name for name in API_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise UserError(f"lm-eval's local-completions model needs {', '.join(missing)}: pip install 'lm-eval[api]'")
    import distill  # noqa: F401  (registers the hybrid architecture for `hf` models in this process)

    only_files = all(t.endswith((".yaml", ".yml")) for t in spec.tasks)
    manager = TaskManager(include_path=list(spec.include) or None, include_defaults=not only_files)
    tasks = [str(Path(t).resolve()) if t.endswith((".yaml", ".yml")) else t for t in spec.tasks]
    try:
        results = lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=tasks, task_manager=manager, limit=spec.limit,
            batch_size=spec.batch_size, num_fewshot=spec.num_fewshot, log_samples=False,
            random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
            fewshot_random_seed=spec.seed,
        )
    except KeyError as err:
        detail = err.args[0] if err.args else err
        raise UserError(f"lm-eval: {detail} (pass a task name from `lm_eval ls tasks` or a .yaml file)") from None
    return numeric_results(results or {})


def numeric_results(results: dict) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        out[task] = values
    return out
