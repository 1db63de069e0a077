"""Run a server as a child process: its own process group, wait for /health, stop the whole group.
The one launcher of servers for bench/ (compare, soak), scripts/ and the tests.

vLLM's API server spawns an engine-core process and a worker; killing only the leader leaves them
holding memory and the port. Starting the server in a new session makes its pid the group id, so
the group can be signalled as one.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


class ServerFailed(RuntimeError):
    """The server exited or did not answer /health in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` in a new session with stdout and stderr going to `log_path` (its first line: the command)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("# " + shlex.join(argv) + "\n")
        log.flush()
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _log_tail(log_path: Path, chars: int = 5000) -> str:
    try:
        return log_path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def wait_healthy(proc: subprocess.Popen, base_url: str, timeout_s: float, log_path: Path) -> float:
    """Poll `base_url`/health until it answers 200; returns the seconds waited."""
    started = time.monotonic()
    with httpx.Client(trust_env=False) as http:
        while True:
            if proc.poll() is not None:
                raise ServerFailed(f"server exited with {proc.returncode}; log {log_path}:\n{_log_tail(log_path)}")
            if time.monotonic() - started > timeout_s:
                raise ServerFailed(f"server not healthy after {timeout_s:.0f} s; log {log_path}:\n{_log_tail(log_path)}")
            try:
                if http.get(f"{base_url}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server, engine core, worker), SIGKILL what remains."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the engine's children too, even if the leader is gone
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
