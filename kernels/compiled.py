"""One torch.compile wrapper per function, made once and shared (dynamo caches graphs per code object)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def compiled(fn):
    return torch.compile(fn)
