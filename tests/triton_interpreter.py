"""Triton kernels tested on CPU: tests marked `interpreted_only` run in a pytest subprocess with
TRITON_INTERPRET=1 (the variable must be set before triton is imported), started by one driver test
per module."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted_only = pytest.mark.skipif(not INTERPRETED, reason="runs under TRITON_INTERPRET=1 (see the driver test)")
driver_only = pytest.mark.skipif(INTERPRETED, reason="this is the driver")


def run_interpreted_tests(test_file: str) -> None:
    """Run `test_file`'s tests named *interpreted* under the interpreter; all must pass, none skip."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", "interpreted"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
