"""A training stage's resumable state on disk, in one of two forms:

    ckpt.pt     one process: the trainable parameters, the optimiser state, the RNG states, the step
    ckpt.dcp/   several processes (`torch.distributed.checkpoint`): every process writes its own shard
                of the parameters and optimiser state and its RNG state (rng_RANK.pt); process 0 adds
                the metadata and meta.json (step, settings, number of processes)

Both are replaced atomically: a file by one rename, the directory by writing `.ckpt.dcp.tmp` and
renaming it into place, so a kill at any moment leaves the previous checkpoint whole. A checkpoint
resumes only with the number of processes that wrote it (the other form is refused with a message).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from distill.atomic_io import atomic_file, recover_directory, replace_directory, write_json_atomic
from distill.distributed import Runtime
from distill.errors import UserError

CHECKPOINT = "ckpt.pt"
DIST_CHECKPOINT = "ckpt.dcp"


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


def _refuse_other_form(work_dir: Path, runtime: Runtime) -> None:
    single, sharded = work_dir / CHECKPOINT, work_dir / DIST_CHECKPOINT
    found, expected = (sharded, "one process") if runtime.world == 1 else (single, f"{runtime.world} processes")
    if found.exists():
        writer = ("one process (or by a torchrun run before FSDP2)" if found == single
                  else "several processes (torchrun)")
        raise UserError(f"{found} was written by {writer}; this run has {expected}. Rerun with the number of "
                        f"processes that wrote it, or delete {found} to restart this stage")


def remove_checkpoints(work_dir: Path) -> None:
    """Delete a finished stage's resumable state (either form)."""
    (work_dir / CHECKPOINT).unlink(missing_ok=True)
    shutil.rmtree(work_dir / DIST_CHECKPOINT, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------------


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


def load_single(work_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime) -> dict | None:
    _refuse_other_form(work_dir, runtime)
    path = work_dir / CHECKPOINT
    return load_checkpoint(path, model, optimizer) if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------


def save_sharded(work_dir: Path, state: dict, meta: dict, runtime: Runtime) -> None:
    """Every process calls this with its shard of `state` (DTensors from get_state_dict)."""
    target = work_dir / DIST_CHECKPOINT
    tmp = target.with_name(f".{target.name}.tmp")
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    runtime.barrier()
    dcp.save(state, checkpoint_id=tmp)
    torch.save(_rng_state(), tmp / f"rng_{runtime.rank}.pt")
    if runtime.is_main:
        write_json_atomic(tmp / "meta.json", dict(meta, world=runtime.world))
    runtime.barrier()  # every shard is on disk before the directory takes the checkpoint's name
    if runtime.is_main:
        replace_directory(tmp, target)
    runtime.barrier()


def sharded_meta(work_dir: Path, runtime: Runtime) -> dict | None:
    """meta.json of the sharded checkpoint in `work_dir` (None: there is none), checked against this run."""
    _refuse_other_form(work_dir, runtime)
    target = work_dir / DIST_CHECKPOINT
    if runtime.is_main:
        recover_directory(target)
    runtime.barrier()
    if not (target / "meta.json").is_file():
        return None
    meta = json.loads((target / "meta.json").read_text())
    if meta["world"] != runtime.world:
        raise UserError(f"{target} was written by {meta['world']} processes, this run has {runtime.world}; rerun "
                        f"with --nproc_per_node x --nnodes = {meta['world']}, or delete {target} to restart this stage")
    return meta


def load_sharded(work_dir: Path, state: dict, runtime: Runtime) -> None:
    """Fill `state` (this process's shards, as get_state_dict gives them) in place, and restore the RNG."""
    target = work_dir / DIST_CHECKPOINT
    dcp.load(state, checkpoint_id=target)
    _set_rng_state(torch.load(target / f"rng_{runtime.rank}.pt", weights_only=False))
