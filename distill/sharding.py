"""How the training loop holds the model it trains: whole in one process, FSDP2-sharded in several.

The rule, `trainee_for`:
  * one process (a run without torchrun, and every GA-S2 candidate, a one-process run on each
    rank): the model trains as it is, in place; its state resumes from `ckpt.pt`. There is nothing
    to shard, and DDP would add nothing either.
  * several processes: FSDP2 (`fully_shard`), always; there is no DDP path. Gradients cross the
    wire as a reduce-scatter and parameters come back as an all-gather per unit, the same bytes as
    DDP's all-reduce, while each process keeps 1/N of the trained parameters, their gradients and
    the fp32 AdamW moments (DDP: all of them, 16 bytes per trained parameter on every process).

What is sharded: one FSDP unit per decoder layer (Stage 1: per GDN mixer, the only modules it
runs), and the root holds the rest (embeddings, final norm, lm_head). Only trained parameters are
sharded; frozen ones (everything but the mixers in Stage 1, a fixed conv, the teacher) stay whole on
every process: they have no gradient or optimiser state to shard, and gathering them at every
forward would cost traffic to save only their bf16/fp32 bytes. The teacher is therefore replicated.

Mixed precision: on CUDA the units compute in bf16 (`MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)`) over fp32 master shards and fp32 AdamW state; on CPU everything stays
float32 (these CPUs emulate bf16 slowly).

The loss runs inside the root's forward (`LossModule`), so FSDP gathers the root's parameters
around it: the fused KL sees whole lm_head weights, and its gradient for them is reduce-scattered
like any other. The sharded model is a copy of the caller's; `publish` gathers the trained weights
back into the caller's model (all processes) before every evaluation and at the end, so everything
after training (held-out KL, selection, saving) runs on an ordinary module, as with one process.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from distill.distributed import Runtime
from distill.model.compiled import set_compiled
from distill.model.gdn_mixer import set_gdn_backend
from distill.train_state import CHECKPOINT, load_sharded, load_single, save_checkpoint, save_sharded, sharded_meta

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, object], tuple[torch.Tensor, dict]]  # (model, batch) -> (loss, metrics)


def checkpoint_activations(units: Iterable[nn.Module]) -> Callable[[], None]:
    """Recompute each unit's forward in backward instead of keeping its activations (inside FSDP's
    gather, so a unit's parameters are whole when it is recomputed). Returns the undo."""
    units = list(units)
    for unit in units:
        unit.forward = functools.partial(checkpoint, unit.forward, use_reentrant=False)

    def undo() -> None:
        for unit in units:
            del unit.forward

    return undo


class WholeModel:
    """One process: the caller's model itself."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, units: list[nn.Module], runtime: Runtime):
        self.module, self.loss_fn, self.runtime = model, loss_fn, runtime
        self.close = checkpoint_activations(units if runtime.parallel.activation_checkpointing else [])
        set_compiled(model, runtime.uses("compile"))
        set_gdn_backend(model, runtime.parallel.gdn_backend)

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        return self.loss_fn(self.module, batch)

    def param_groups(self, groups: list[dict]) -> list[dict]:
        return groups

    def sync_gradients(self, on: bool) -> None:
        pass

    def publish(self) -> None:
        pass

    def save(self, work_dir: Path, optimizer: torch.optim.Optimizer, step: int, extra: dict) -> None:
        if self.runtime.is_main:
            save_checkpoint(work_dir / CHECKPOINT, self.module, optimizer, step, extra)

    def load(self, work_dir: Path, optimizer: torch.optim.Optimizer) -> dict | None:
        return load_single(work_dir, self.module, optimizer, self.runtime)


class LossModule(nn.Module):
    """The stage's loss as the forward of the FSDP root."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch) -> tuple[torch.Tensor, dict]:
        return self.loss_fn(self.model, batch)


def mixed_precision(runtime: Runtime) -> MixedPrecisionPolicy:
    if runtime.device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class ShardedModel:
    """Several processes: an FSDP2-sharded copy of the caller's model, wrapped with the loss."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, units: list[nn.Module], runtime: Runtime):
        self.model, self.runtime = model, runtime
        module_names = {id(m): name for name, m in model.named_modules()}
        self.param_names = {id(p): name for name, p in model.named_parameters()}
        self.module = LossModule(copy.deepcopy(model), loss_fn)
        copies = dict(self.module.model.named_modules())
        mesh = init_device_mesh(runtime.device.type, (runtime.world,))
        frozen = {p for p in self.module.parameters() if not p.requires_grad}
        shard = functools.partial(fully_shard, mesh=mesh, mp_policy=mixed_precision(runtime), ignored_params=frozen)
        copied_units = [copies[module_names[id(unit)]] for unit in units]
        set_compiled(self.module.model, runtime.uses("compile"))
        set_gdn_backend(self.module.model, runtime.parallel.gdn_backend)
        if runtime.parallel.activation_checkpointing:
            checkpoint_activations(copied_units)  # for the copy's lifetime: nothing else runs it
        for unit in copied_units:
            shard(unit)
        shard(self.module)
        log.info("FSDP2: %d units + root over %d processes, %s compute, activation checkpointing %s", len(units),
                 runtime.world, mixed_precision(runtime).param_dtype or "float32",
                 "on" if runtime.parallel.activation_checkpointing else "off")

    @property
    def root(self) -> FSDPModule:
        return self.module  # type: ignore[return-value]

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        return self.module(batch)

    def close(self) -> None:
        pass

    def param_groups(self, groups: list[dict]) -> list[dict]:
        """The caller's parameter groups, pointing at the sharded copy's parameters."""
        sharded = dict(self.module.model.named_parameters())
        return [dict(g, params=[sharded[self.param_names[id(p)]] for p in g["params"]]) for g in groups]

    def sync_gradients(self, on: bool) -> None:
        """Off for all micro-batches but the last: gradients accumulate locally, one reduce-scatter per step."""
        self.root.set_requires_gradient_sync(on)

    @torch.no_grad()
    def publish(self) -> None:
        """Gather the trained weights into the caller's model on every process (collective)."""
        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                p.copy_(full[f"model.{name}"])

    def save(self, work_dir: Path, optimizer: torch.optim.Optimizer, step: int, extra: dict) -> None:
        model_state, optim_state = get_state_dict(self.module, optimizer)
        save_sharded(work_dir, {"model": model_state, "optimizer": optim_state}, dict(extra, step=step), self.runtime)

    def load(self, work_dir: Path, optimizer: torch.optim.Optimizer) -> dict | None:
        meta = sharded_meta(work_dir, self.runtime)
        if meta is None:  # before get_state_dict: on a fresh optimiser it takes a zero-gradient step
            return None
        model_state, optim_state = get_state_dict(self.module, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        load_sharded(work_dir, state, self.runtime)
        set_state_dict(self.module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return meta


def trainee_for(model: nn.Module, loss_fn: LossFn, units: list[nn.Module],
                runtime: Runtime) -> WholeModel | ShardedModel:
    """The rule in this module's docstring."""
    if runtime.world == 1:
        return WholeModel(model, loss_fn, units, runtime)
    return ShardedModel(model, loss_fn, units, runtime)
