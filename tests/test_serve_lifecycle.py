"""How `hybrid serve` ends: a dead engine makes the process exit non-zero (so a supervisor restarts it)
instead of answering 503 for ever; a requested stop (SIGTERM) exits 0. Each test starts its own server
on 127.0.0.1 (~30-80 s on 2 CPU cores), because each ends it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import psutil
import pytest

pytest.importorskip("vllm")

from serve.launch import free_port, spawn_server, stop_process_group, wait_healthy  # noqa: E402
from serve.server import ENGINE_DIED_EXIT_CODE  # noqa: E402
from tests.conftest import API_KEY, STARTUP_TIMEOUT_S, serve_command  # noqa: E402

EXIT_TIMEOUT_S = 60  # vLLM's watchdog looks every 5 s; the rest is shutting down on busy cores


@pytest.fixture
def own_server(served_hybrid, tmp_path):
    """A server whose key comes from $HYBRID_API_KEY (as in deploy/), not from --api-key."""
    port = free_port()
    log_path = tmp_path / "server.log"
    cmd = [arg for arg in serve_command(served_hybrid, port) if arg not in ("--api-key", API_KEY)]
    proc = spawn_server(cmd, log_path, env={**os.environ, "HYBRID_API_KEY": API_KEY})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, STARTUP_TIMEOUT_S, log_path)
        yield {"proc": proc, "base": base, "log": log_path}
    finally:
        stop_process_group(proc)


def wait_exit(proc: subprocess.Popen, log_path) -> int:
    try:
        return proc.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {EXIT_TIMEOUT_S} s later; log:\n{log_path.read_text()[-3000:]}")


def engine_core(proc: subprocess.Popen) -> psutil.Process:
    cores = [p for p in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline())]
    assert len(cores) == 1, [p.cmdline() for p in psutil.Process(proc.pid).children(recursive=True)]
    return cores[0]


def test_a_dead_engine_makes_the_server_exit_non_zero(own_server):
    proc, log_path = own_server["proc"], own_server["log"]
    with httpx.Client(base_url=own_server["base"], trust_env=False, timeout=30) as http:
        assert http.get("/v1/models").status_code == 401  # $HYBRID_API_KEY is the key
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    engine_core(proc).kill()  # what the kernel's OOM killer or a crashing kernel does
    started = time.monotonic()
    assert wait_exit(proc, log_path) == ENGINE_DIED_EXIT_CODE, log_path.read_text()[-3000:]
    assert "the engine died" in log_path.read_text()
    print(f"exited {time.monotonic() - started:.1f} s after the engine was killed")


def test_a_requested_stop_exits_zero(own_server):
    proc, log_path = own_server["proc"], own_server["log"]
    proc.send_signal(signal.SIGTERM)  # as a supervisor stops a container: the main process only
    assert wait_exit(proc, log_path) == 0, log_path.read_text()[-3000:]
