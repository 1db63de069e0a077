"""Writing checkpoints so that a crash never leaves a half-written output directory."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from distill.errors import UserError


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one rename.

    On any exception the temporary directory is removed and `target` is left as it was.
    """
    target = Path(target)
    if target.exists() and not overwrite and any(target.iterdir()):
        raise UserError(f"output directory {target} already exists and is not empty (pass --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def save_hybrid(model, tokenizer, out_dir: Path, overwrite: bool = False) -> Path:
    """save_pretrained (safetensors + config.json with layer_types) and the tokenizer, atomically."""
    with atomic_directory(Path(out_dir), overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
