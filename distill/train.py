"""The one training loop every stage uses: AdamW, LR schedule, clipping, resumable checkpoints, logs.

    for step in range(start, steps):
        lr = base_lr * schedule(step)
        for micro in range(grad_accum):                 # batch = micro_batch x grad_accum x processes
            loss = loss_fn(model, get_batch(step, micro)) / grad_accum
            loss.backward()                             # several processes: FSDP2 reduce-scatters at the last micro
        clip to grad_clip; optimizer.step()
        log a JSONL record; evaluate every eval_every steps; checkpoint every save_every steps

On one process, a step that runs out of GPU memory is run again with each micro-batch in two pieces (then four,
...), down to one sequence per forward: the optimiser step is the same, only its activations are smaller. The
log line says so, and each later record carries `pieces`. Several processes stop with advice instead (one
rank cannot retry alone).

The model is held whole by one process and FSDP2-sharded by several (`distill.sharding`). A
checkpoint (`ckpt.pt`, or the sharded `ckpt.dcp/` of several processes, both replaced atomically:
`distill.train_state`) holds the trainable parameters, the optimiser state, the RNG states and the
step; the batch of a step is a pure function of the step (see `distill.data.batch_for_step`), so the
step is the data position. The frozen parameters are not saved: they come from the stage's input,
which is itself a finished checkpoint. Rerunning a killed stage (with as many processes) therefore
continues from its last checkpoint and ends with the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from distill.cuda_graph import GraphedStep
from distill.distributed import Runtime
from distill.errors import UserError
from distill.sharding import LossFn, trainee_for

LOG = "log.jsonl"
logger = logging.getLogger(__name__)


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


def make_optimizer(param_groups: list[dict], cfg: TrainConfig, capturable: bool = False) -> torch.optim.AdamW:
    """param_groups: [{"params": [...], "lr": base_lr, "name": ...}]; the schedule scales each base LR.
    capturable: for a step replayed from a CUDA graph (step counts and LRs live on the GPU)."""
    groups = [dict(g, base_lr=g["lr"]) for g in param_groups if g["params"]]
    # one fused kernel per step instead of a dozen multi-tensor launches per parameter group on the GPU
    fused = all(p.is_cuda for g in groups for p in g["params"])
    if capturable:
        groups = [dict(g, lr=torch.tensor(g["lr"], device=g["params"][0].device)) for g in groups]
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, eps=1e-8,
                             fused=fused or None, capturable=capturable)


def _set_lr(group: dict, lr: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)  # in place: a captured step reads this tensor
    else:
        group["lr"] = lr


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


BatchFn = Callable[[int, int], object]  # (step, micro) -> token ids [micro_batch, seq_len] (or a tuple of tensors)
EvalFn = Callable[[], dict]


def _pieces(batch, n: int) -> list:
    """A micro-batch ([rows, seq_len] ids, or a tuple of such tensors) as n row slices (views)."""
    if n == 1:
        return [batch]
    if isinstance(batch, tuple):
        return list(zip(*(t.tensor_split(n) for t in batch)))
    return list(batch.tensor_split(n))


def _rows(batch) -> int:
    return (batch[0] if isinstance(batch, tuple) else batch).shape[0]


def _clip(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm (over all shards); returns the norm before clipping."""
    if not max_norm:
        return torch.zeros((), device=params[0].device)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


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
    units: list[nn.Module] = (),
    after_step: Callable[[int], None] | None = None,
) -> list[dict]:
    """Train `model` for cfg.steps steps (resuming from work_dir's checkpoint if present); returns the log.

    loss_fn(model, batch) computes the loss on the model it is given (under several processes, the
    sharded copy); `units` are the submodules FSDP shards one by one (and activation checkpointing
    recomputes). `evaluate` runs on `model`, which holds the trained weights whenever it is called.
    `after_step(steps_done)` runs after each optimiser step (e.g. `torch.profiler.profile.step`).
    """
    cfg.check(name)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    accum = cfg.grad_accum(runtime.world)
    graphed = runtime.uses("cuda_graph")
    if graphed and (runtime.device.type != "cuda" or runtime.world > 1):
        raise UserError("parallel.cuda_graph needs one process on a CUDA device")
    trainee = trainee_for(model, loss_fn, list(units), runtime)
    optimizer = make_optimizer(trainee.param_groups(param_groups), cfg, capturable=graphed)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    pieces = 1  # forwards per micro-batch: doubled after each out-of-memory error (one process)

    def one_step(batches: list, zero_grads: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Forward and backward of every micro-batch (in `pieces` row slices), clipping, AdamW: (mean loss,
        gradient norm) on the device — read once per step, no host sync per forward — and the loss's metrics.
        A slice's loss counts by its share of the step's rows: every row has seq_len tokens, so the step's
        loss and gradient are the same however the rows are cut."""
        totals: dict[str, float] = {}
        loss_sum = torch.zeros((), device=runtime.device)
        # (a slice of rows, what its mean loss is divided by)
        forwards = [(piece, accum * _rows(batch) / _rows(piece))
                    for batch in batches for piece in _pieces(batch, pieces)]
        for i, (piece, divisor) in enumerate(forwards):
            trainee.sync_gradients(i == len(forwards) - 1)
            with runtime.autocast(cache_weights=not graphed):
                loss, metrics = trainee.loss(piece)
            (loss / divisor).backward()
            loss_sum += loss.detach().float() / divisor
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / divisor
        grad_norm = _clip(params, cfg.grad_clip).to(loss_sum)
        optimizer.step()
        if zero_grads:
            optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm, totals

    step_fn = GraphedStep(one_step, optimizer) if graphed else one_step

    def run_step(batches: list) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """step_fn, run again in smaller forwards while the GPU runs out of memory."""
        nonlocal pieces
        while True:
            try:
                return step_fn(batches)
            except torch.OutOfMemoryError as error:
                rows = -(-cfg.micro_batch // pieces)
                if runtime.world > 1 or rows == 1:
                    advice = "lower micro_batch, " if runtime.world > 1 else ""
                    raise UserError(
                        f"{name}: out of GPU memory at {rows} sequence(s) of {cfg.seq_len} tokens per forward on "
                        f"{runtime.world} process(es); {advice}turn on parallel.activation_checkpointing, or lower "
                        "seq_len") from error
            # out of the except block: the error's traceback no longer pins the failed step's activations
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            pieces = min(2 * pieces, cfg.micro_batch)
            if graphed:
                step_fn.restart()  # new shapes: warm up and capture again
            logger.warning("%s: out of GPU memory at %d x %d tokens per forward; running each micro-batch of %d as %d "
                         "forwards of %d (the same optimiser step, smaller activations)", name, rows, cfg.seq_len,
                         cfg.micro_batch, pieces, -(-cfg.micro_batch // pieces))

    settings = asdict(cfg)

    start, elapsed, wall_before = 0, 0.0, 0.0
    log = read_log(work_dir)
    state = trainee.load(work_dir, optimizer)
    if state is not None:
        if state.get("settings") != settings:
            raise UserError(
                f"the checkpoint in {work_dir} was written with other training settings "
                f"({state.get('settings')}); delete {work_dir} to start this stage again"
            )
        start, elapsed = state["step"], state["elapsed"]
        wall_before = state.get("wall", elapsed)  # checkpoints before 2026-12-06 kept only the steps' time
        if graphed:  # a resumed group's LR is whatever was saved (a float, or a tensor loaded to the CPU)
            for group in optimizer.param_groups:
                group["lr"] = torch.tensor(float(group["lr"]), device=runtime.device)
    else:
        torch.manual_seed(cfg.seed)
    log = [r for r in log if r["step"] <= start]
    if runtime.is_main:
        (work_dir / LOG).write_text("".join(json.dumps(r) + "\n" for r in log))

    tokens_per_step = cfg.batch * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=start, desc=name, unit="step", dynamic_ncols=True,
               disable=not (runtime.is_main if show_progress is None else show_progress))
    trainee.module.train()
    loop_start = time.perf_counter()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        factor = lr_factor(cfg, step)
        for group in optimizer.param_groups:
            _set_lr(group, group["base_lr"] * factor)
        batches = [_to_device(get_batch(step, micro), runtime.device) for micro in range(accum)]
        loss_sum, grad_norm, totals = run_step(batches)
        totals = dict(totals)
        totals["loss"], grad_norm = (float(x) for x in torch.stack([loss_sum, grad_norm]).tolist())

        done = step + 1
        seconds = time.perf_counter() - t0
        elapsed += seconds
        record = {key: runtime.all_reduce_mean(value) for key, value in totals.items()}
        record.update(step=done, lr=cfg.lr * factor, grad_norm=float(grad_norm), tokens=done * tokens_per_step,
                      tok_per_s=tokens_per_step / seconds, elapsed_s=round(elapsed, 3))
        if graphed:
            record["replayed"] = step_fn.replayed
        if pieces > 1:
            record["pieces"] = pieces
        if evaluate is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            trainee.publish()
            model.eval()
            record.update(evaluate())
            model.train()
        # wall_s: the stage's time so far with its evals, across resumes (to each attempt's last checkpoint)
        record["wall_s"] = round(wall_before + time.perf_counter() - loop_start, 3)
        log.append(record)
        if runtime.is_main:
            with open(work_dir / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
            trainee.save(work_dir, optimizer, done,
                         {"elapsed": elapsed, "wall": record["wall_s"], "settings": settings})
        runtime.barrier()
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tok_per_s']:.0f}")
        if after_step is not None:
            after_step(done)
    bar.close()
    trainee.publish()
    trainee.close()
    model.eval()
    return log
