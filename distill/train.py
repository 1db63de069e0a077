"""The one training loop every stage uses: AdamW, LR schedule, clipping, resumable checkpoints, logs.

    for step in range(start, steps):
        lr = base_lr * schedule(step)
        for micro in range(grad_accum):                 # batch = micro_batch x grad_accum x processes
            loss = loss_fn(get_batch(step, micro)) / grad_accum
            loss.backward()
        average gradients across processes; clip to grad_clip; optimizer.step()
        log a JSONL record; evaluate every eval_every steps; checkpoint every save_every steps

A checkpoint (`ckpt.pt`, replaced atomically) holds the trainable parameters, the optimiser state,
the RNG states and the step; the batch of a step is a pure function of the step (see
`distill.data.batch_for_step`), so the step is the data position. The frozen parameters are not
saved: they come from the stage's input, which is itself a finished checkpoint. Rerunning a killed
stage therefore continues from its last checkpoint and ends with the same weights as a run that was
never interrupted.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from distill.atomic_io import atomic_file
from distill.distributed import Runtime
from distill.errors import UserError

CHECKPOINT = "ckpt.pt"
LOG = "log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    seq_len: int = 256
    batch: int = 8  # sequences per optimiser step, all processes and micro-batches together
    micro_batch: int = 2  # sequences per forward/backward on one process
    lr: float = 1e-3
    schedule: str = "cosine"  # "cosine": warmup then cosine to min_lr_ratio * lr; "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 25  # steps between resumable checkpoints (0: none, not even at the end)
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    seed: int = 0

    def grad_accum(self, world: int) -> int:
        per_step = self.micro_batch * world
        if self.batch % per_step:
            raise UserError(
                f"batch {self.batch} is not a multiple of micro_batch {self.micro_batch} x {world} processes; "
                "change batch or micro_batch"
            )
        return self.batch // per_step

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq_len

    def check(self, name: str) -> None:
        if self.schedule not in ("cosine", "constant"):
            raise UserError(f"{name}.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        for field in ("steps", "seq_len", "batch", "micro_batch", "save_every", "eval_every"):
            if getattr(self, field) < (1 if field in ("seq_len", "batch", "micro_batch") else 0):
                raise UserError(f"{name}.{field} must be positive, got {getattr(self, field)}")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of the base LR at `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(param_groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """param_groups: [{"params": [...], "lr": base_lr, "name": ...}]; the schedule scales each base LR."""
    groups = [dict(g, base_lr=g["lr"]) for g in param_groups if g["params"]]
    # one fused kernel per step instead of a dozen multi-tensor launches per parameter group on the GPU
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, eps=1e-8,
                             fused=fused or None)


# ---------------------------------------------------------------------------------------------
# Resumable state
# ---------------------------------------------------------------------------------------------


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: dict) -> None:
    state = {
        "step": step,
        "params": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(),
        **extra,
    }
    with atomic_file(path) as tmp:  # a kill leaves the previous checkpoint intact
        torch.save(state, tmp)


@torch.no_grad()
def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    for name, value in state["params"].items():
        params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return state


def read_log(work_dir: Path) -> list[dict]:
    path = Path(work_dir) / LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def _to_device(batch, device: torch.device):
    if isinstance(batch, tuple):
        return tuple(t.to(device, non_blocking=True) for t in batch)
    return batch.to(device, non_blocking=True)


LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]
BatchFn = Callable[[int, int], object]  # (step, micro) -> token ids [micro_batch, seq_len] (or a tuple of tensors)
EvalFn = Callable[[], dict]


def train(
    name: str,
    model: nn.Module,
    param_groups: list[dict],
    loss_fn: LossFn,
    get_batch: BatchFn,
    cfg: TrainConfig,
    work_dir: Path,
    runtime: Runtime,
    evaluate: EvalFn | None = None,
    show_progress: bool | None = None,
) -> list[dict]:
    """Train `model` for cfg.steps steps (resuming from work_dir/ckpt.pt if present); returns the log."""
    cfg.check(name)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    accum = cfg.grad_accum(runtime.world)
    optimizer = make_optimizer(param_groups, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    settings = asdict(cfg)

    start, elapsed = 0, 0.0
    log = read_log(work_dir)
    if (work_dir / CHECKPOINT).is_file():
        state = load_checkpoint(work_dir / CHECKPOINT, model, optimizer)
        if state.get("settings") != settings:
            raise UserError(
                f"{work_dir / CHECKPOINT} was written with other training settings "
                f"({state.get('settings')}); delete {work_dir} to start this stage again"
            )
        start, elapsed = state["step"], state["elapsed"]
    else:
        torch.manual_seed(cfg.seed)
    log = [r for r in log if r["step"] <= start]
    if runtime.is_main:
        (work_dir / LOG).write_text("".join(json.dumps(r) + "\n" for r in log))

    tokens_per_step = cfg.batch * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=start, desc=name, unit="step", dynamic_ncols=True,
               disable=not (runtime.is_main if show_progress is None else show_progress))
    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        factor = lr_factor(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        totals: dict[str, float] = {}
        loss_sum = torch.zeros((), device=runtime.device)
        for micro in range(accum):
            batch = _to_device(get_batch(step, micro), runtime.device)
            with runtime.autocast():
                loss, metrics = loss_fn(batch)
            (loss / accum).backward()
            loss_sum += loss.detach().float() / accum  # read once per step: no host sync per micro-batch
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / accum
        runtime.average_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals["loss"], grad_norm = (float(x) for x in torch.stack([loss_sum, grad_norm.to(loss_sum)]).tolist())

        done = step + 1
        seconds = time.perf_counter() - t0
        elapsed += seconds
        record = {key: runtime.all_reduce_mean(value) for key, value in totals.items()}
        record.update(step=done, lr=cfg.lr * factor, grad_norm=float(grad_norm), tokens=done * tokens_per_step,
                      tok_per_s=tokens_per_step / seconds, elapsed_s=round(elapsed, 3))
        if evaluate is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            model.eval()
            record.update(evaluate())
            model.train()
        log.append(record)
        if runtime.is_main:
            with open(work_dir / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
            if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
                save_checkpoint(work_dir / CHECKPOINT, model, optimizer, done, {"elapsed": elapsed, "settings": settings})
        runtime.barrier()
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tok_per_s']:.0f}")
    bar.close()
    model.eval()
    return log
