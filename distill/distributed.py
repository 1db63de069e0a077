"""Where the work runs: one process, or several under `torchrun` (one per GPU, or gloo on CPU).

Training under several processes runs on FSDP2 (`torch.distributed.fsdp.fully_shard`, see
`distill.sharding`): the trained parameters, their gradients and the AdamW state are sharded over the
processes, each computes gradients on its own micro-batches, and FSDP reduce-scatters them. Selection
spreads its candidate runs over the processes instead (each candidate a one-process run).

    torchrun --nproc_per_node 8 -m distill.cli convert --teacher T --data D --ratio 0.25 --out OUT
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m distill.cli convert ...

Several nodes need a shared file system for the work directory: every process writes its shard of a
checkpoint there.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distill.errors import UserError


SWITCH_VALUES = ("auto", "on", "off")
_SWITCH_SYNONYMS = {"true": "on", "1": "on", "false": "off", "0": "off"}


@dataclass(frozen=True)
class ParallelConfig:
    """How training runs on the machine (`--set parallel.FIELD=VALUE`). None of it changes what is
    computed, only where and at what memory cost, so it is not part of a run's identity: a rerun may
    change it and still continue the run.

    The three speed switches are auto|on|off (true/false are read as on/off). "auto" turns a switch on for
    one CUDA process without activation checkpointing, where each was measured to pay
    (bench/results/train_throughput.md: together 3.5x Stage 1 and 2.5x Stage 2 on an H200), and off
    elsewhere (`Runtime.uses`)."""

    activation_checkpointing: bool = False  # recompute each decoder layer (Stage 1: each mixer) in backward
    compile: str = "auto"  # torch.compile the elementwise work (distill.model.compiled): less GPU time and memory
    cuda_graph: str = "auto"  # replay each optimiser step from a CUDA graph (distill.cuda_graph); one CUDA process
    stack_mixers: str = "auto"  # Stage 1 runs every mixer in one batched computation (distill.stages.stacks_mixers);
    # one process without activation checkpointing only; slower on a CPU
    gdn_backend: str = "auto"  # the GDN chunk path of training (kernels.gdn.GDN_BACKENDS); auto picks per device
    # and Triton version (kernels.gdn.resolve_gdn_backend), e.g. fla-torch-dqkwg keeps our Triton backward kernel out

    def __post_init__(self):
        from kernels.gdn import GDN_BACKENDS

        if self.gdn_backend not in GDN_BACKENDS:
            raise UserError(f"parallel.gdn_backend must be one of {', '.join(GDN_BACKENDS)}, got {self.gdn_backend!r}")
        for name in ("compile", "cuda_graph", "stack_mixers"):
            raw = getattr(self, name)
            value = _SWITCH_SYNONYMS.get(str(raw).lower(), str(raw).lower())
            if value not in SWITCH_VALUES:
                raise UserError(f"parallel.{name} must be one of {', '.join(SWITCH_VALUES)} (or true/false), "
                                f"got {raw!r}")
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype | None = None  # autocast dtype (bf16 on CUDA); None = full precision
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def uses(self, switch: str) -> bool:
        """Whether the parallel switch `switch` ("compile", "cuda_graph" or "stack_mixers") is on for this run."""
        value = getattr(self.parallel, switch)
        if value == "auto":
            return self.device.type == "cuda" and self.world == 1 and not self.parallel.activation_checkpointing
        return value == "on"

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def autocast(self, cache_weights: bool = True):
        """Mixed precision on CUDA. cache_weights=False for a step captured in a CUDA graph: autocast's cache
        of weight casts would be captured once and never refreshed."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, cache_enabled=cache_weights)

    def all_reduce_mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_runtime(device: str | None = None) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=60))
        if dev.type == "cpu":
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    amp = torch.bfloat16 if dev.type == "cuda" else None
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=dev, amp_dtype=amp)


def shutdown(runtime: Runtime) -> None:
    if runtime.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
