"""Checkpoint files: saving a hybrid atomically, and the dtype its weights are stored in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from distill.atomic_io import atomic_directory
from distill.errors import UserError

SAVE_DTYPES = ("float32", "bfloat16", "float16")
SAVE_DTYPE_ENV = "HYBRID_SAVE_DTYPE"  # overrides the teacher's dtype for every checkpoint a process writes


def save_hybrid(model, tokenizer, out_dir: Path, overwrite: bool = False, dtype: str | None = None) -> Path:
    """save_pretrained (safetensors + config.json with layer_types) and the tokenizer, atomically.

    The weights are stored in `dtype`, by default the teacher's (see `storage_dtype`)."""
    with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, save_dtype=dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------
# Storage dtype: checkpoints keep the teacher's dtype (training runs in float32; a bf16 teacher
# gains nothing from fp32 weights on disk but twice the size)
# ---------------------------------------------------------------------------------------------


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16 or 'bfloat16'; float32 when unknown."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in SAVE_DTYPES else "float32"


def storage_dtype(provenance: dict | None, requested: str | None = None) -> torch.dtype:
    """`requested` ('auto' or None: $HYBRID_SAVE_DTYPE, else the teacher's dtype from the provenance, else float32)."""
    if requested in (None, "auto"):
        requested = os.environ.get(SAVE_DTYPE_ENV) or (provenance or {}).get("teacher_dtype") or "float32"
    if requested not in SAVE_DTYPES:
        raise UserError(f"checkpoint dtype {requested!r}: expected auto or one of {', '.join(SAVE_DTYPES)}")
    return getattr(torch, requested)


def cast_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors in `dtype`; tied tensors stay one tensor."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            key = tensor.data_ptr()
            if key not in cast:
                cast[key] = tensor.detach().to(dtype)
            tensor = cast[key]
        out[name] = tensor
    return out


def set_config_dtype(checkpoint_dir: Path, dtype: torch.dtype) -> None:
    """config.json's `dtype` names the dtype the weights are stored in (transformers writes the model's)."""
    path = Path(checkpoint_dir) / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = dtype_name(dtype)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
