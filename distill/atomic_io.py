"""Writing files and directories so that a crash or a kill never leaves a half-written one, and the
one check every command makes before it writes an output directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from distill.errors import UserError


def check_output_dir(target: Path, overwrite: bool = False) -> None:
    """Refuse to replace a non-empty `target` unless the user passed --overwrite."""
    target = Path(target)
    if target.exists() and not overwrite and any(target.iterdir()):
        raise UserError(f"output directory {target} already exists and is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, obj, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent))


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `target` in one rename.

    On any exception the temporary directory is removed and `target` is left as it was.
    """
    target = Path(target)
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, target)


def _displaced(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def replace_directory(new: Path, target: Path) -> None:
    """Put the finished directory `new` in place of `target`: two renames, and a kill between them
    leaves the previous `target` aside, where `recover_directory` finds it."""
    old = _displaced(target)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_directory(target: Path) -> None:
    """Undo a `replace_directory` killed between its two renames."""
    old = _displaced(Path(target))
    if old.exists() and not Path(target).exists():
        os.replace(old, target)
