"""Soak test: hours-long mixed load on one `hybrid serve`, watching for errors and memory growth.

    hybrid bench soak runs/smollm2-demo --duration 1800 --users 4 --out bench/results/soak_cpu

Starts `hybrid serve CKPT` on 127.0.0.1, runs locust (bench/locustfile.py) for --duration seconds with
a mix of short and long prompts, completions and chat, streamed and not, and clients that hang up after
the first token, while sampling the server's process-tree memory (RSS and PSS) every --interval s.
The server passes when no request failed, it still answers /health at the end, and its memory after
the warm-up is flat: the later half of the run does not raise PSS's peak by more than
--max-growth-mib-per-hour allows over that time (`memory_verdict`).
If the server process exits during the run, the load stops at once and the report says when.
Writes soak.json, soak.md and soak_memory.png to --out.
"""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.compare import LOCUSTFILE
from bench.metrics import CUT_OFF, read_records, summarize
from bench.sampling import Sampler, process_tree_memory
from distill.provenance import cpu_description, package_versions
from serve.launch import free_port, spawn_server, stop_process_group, wait_healthy

MIB = 2**20


@dataclass
class SoakConfig:
    checkpoint: str
    out: Path
    duration_s: int = 1800
    users: int = 4
    prompt_tokens: str = "choice:1,8,64,512,1500"
    output_tokens: str = "uniform:1:64"
    endpoint: str = "mixed"
    stream_fraction: float = 0.6
    cancel_fraction: float = 0.25
    interval_s: float = 10.0
    warmup_s: float = 600.0
    max_model_len: int = 2048
    max_growth_mib_per_hour: float = 64.0
    server_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 900.0


@dataclass
class MemorySample:
    t: float  # seconds since the load started
    rss_bytes: int
    pss_bytes: int


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var_t * 3600 if var_t else 0.0


def memory_verdict(samples: list[MemorySample], warmup_s: float, max_growth_mib_per_hour: float) -> dict:
    """Flat means the memory stopped making new highs: the later half of the steady window (after the
    warm-up) peaks at most `max_growth_mib_per_hour` x (half the window) above the earlier half's peak.
    A leak keeps raising the peak; a cache that fills in a few steps and stops does not. A fitted slope
    is reported too, but does not decide: one step mid-run (a cache entry filled late) tilts it for good."""
    steady = [s for s in samples if s.t >= warmup_s]
    if len(steady) < 4:
        return {"flat": False, "reason": f"only {len(steady)} samples after the {warmup_s:.0f} s warm-up"}
    middle = (steady[0].t + steady[-1].t) / 2
    earlier = max(s.pss_bytes for s in steady if s.t < middle) / MIB
    later = max(s.pss_bytes for s in steady if s.t >= middle) / MIB
    allowed = max_growth_mib_per_hour * (steady[-1].t - steady[0].t) / 2 / 3600
    return {
        "flat": later - earlier <= allowed,
        "pss_peak_earlier_half_mib": round(earlier, 1),
        "pss_peak_later_half_mib": round(later, 1),
        "peak_growth_mib": round(later - earlier, 1),
        "allowed_growth_mib": round(allowed, 1),
        "pss_slope_mib_per_hour": round(slope_per_hour([(s.t, s.pss_bytes / MIB) for s in steady]), 1),
        "rss_slope_mib_per_hour": round(slope_per_hour([(s.t, s.rss_bytes / MIB) for s in steady]), 1),
        "pss_first_mib": round(steady[0].pss_bytes / MIB, 1),
        "pss_last_mib": round(steady[-1].pss_bytes / MIB, 1),
        "steady_samples": len(steady),
        "limit_mib_per_hour": max_growth_mib_per_hour,
    }


def locust_argv(cfg: SoakConfig, url: str, records: Path) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-H", url, "-u", str(cfg.users), "-r", str(cfg.users), "--run-time", f"{cfg.duration_s}s",
        "--stop-timeout", "0", "--records", str(records), "--tag", "soak",
        "--prompt-tokens", cfg.prompt_tokens, "--output-tokens", cfg.output_tokens, "--endpoint", cfg.endpoint,
        "--stream-fraction", str(cfg.stream_fraction), "--cancel-fraction", str(cfg.cancel_fraction),
    ]


def watch_load(locust: subprocess.Popen, server: subprocess.Popen, started: float, deadline_s: float) -> float | None:
    """Wait for locust to finish; stop it as soon as the server process exits (every later request would
    fail). Returns the seconds under load at which the server exited, or None."""
    while locust.poll() is None:
        if server.poll() is not None:
            died_at = time.monotonic() - started
            locust.terminate()
            locust.wait(timeout=60)
            return died_at
        if time.monotonic() - started > deadline_s:
            locust.kill()
        time.sleep(1)
    return None


def run_soak(cfg: SoakConfig) -> dict:
    cfg.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_argv = [sys.executable, "-m", "distill.cli", "serve", cfg.checkpoint, "--host", "127.0.0.1",
                   "--port", str(port), "--max-model-len", str(cfg.max_model_len), *cfg.server_args]
    proc = spawn_server(server_argv, cfg.out / "server.log")
    records = cfg.out / "records.jsonl"
    records.unlink(missing_ok=True)
    try:
        startup_s = wait_healthy(proc, url, cfg.startup_timeout_s, cfg.out / "server.log")
        sampler = Sampler(lambda: process_tree_memory(proc.pid), cfg.interval_s)
        sampler.start()
        with open(cfg.out / "locust.log", "w") as log:
            locust = subprocess.Popen(locust_argv(cfg, url, records), stdout=log, stderr=subprocess.STDOUT)
            server_died_at_s = watch_load(locust, proc, sampler.started, deadline_s=cfg.duration_s + 300)
        samples = [MemorySample(t, memory["rss_bytes"], memory["pss_bytes"]) for t, memory in sampler.stop()]
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
            healthy_after = proc.poll() is None and http.get("/health").status_code == 200
    finally:
        stop_process_group(proc)
    all_records = read_records(records) if records.is_file() else []
    # requests still in flight when locust stops at --run-time are cut off by the client, not failed
    cut_off = [r for r in all_records if r.error == CUT_OFF]
    answered = [r for r in all_records if r.error != CUT_OFF]
    kinds = {kind: sum(r.kind == kind for r in answered) for kind in ("stream", "unary", "cancelled")}
    summary = summarize(answered)
    memory = memory_verdict(samples, cfg.warmup_s, cfg.max_growth_mib_per_hour)
    result = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "date": datetime.date.today().isoformat(),
        "machine": cpu_description(),
        "versions": package_versions(),
        "server_command": shlex.join(server_argv),
        "locust_command": shlex.join(locust_argv(cfg, url, records)),
        "startup_s": round(startup_s, 1),
        "locust_exit_code": locust.returncode,
        "server_died_at_s": server_died_at_s,
        "server_exit_code": proc.returncode if server_died_at_s is not None else None,
        "requests": summary.requests,
        "requests_by_kind": kinds,
        "cut_off_at_the_end": len(cut_off),
        "errors": summary.errors,
        "error_kinds": summary.error_kinds,
        "output_tokens": summary.output_tokens,
        "healthy_after": healthy_after,
        "memory": memory,
        "memory_samples": [asdict(s) for s in samples],
        "passed": summary.errors == 0 and healthy_after and memory["flat"] and summary.requests > 0
                  and server_died_at_s is None,
    }
    (cfg.out / "soak.json").write_text(json.dumps(result, indent=2))
    plot_memory(samples, cfg, cfg.out / "soak_memory.png")
    (cfg.out / "soak.md").write_text(render(result))
    return result


def plot_memory(samples: list[MemorySample], cfg: SoakConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    minutes = [s.t / 60 for s in samples]
    ax.plot(minutes, [s.pss_bytes / MIB for s in samples], label="PSS (server process tree)")
    ax.plot(minutes, [s.rss_bytes / MIB for s in samples], label="RSS (sum, counts shared pages twice)", alpha=0.6)
    ax.axvline(cfg.warmup_s / 60, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes under load")
    ax.set_ylabel("MiB")
    ax.set_title(f"hybrid serve memory under {cfg.users} users of mixed load")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(result: dict) -> str:
    cfg, memory = result["config"], result["memory"]
    verdict = "PASS" if result["passed"] else "FAIL"
    return "\n".join([
        f"# Soak: {verdict}",
        "",
        f"- date: {result['date']}; machine: {result['machine']}",
        f"- server: `{result['server_command']}` (start-up {result['startup_s']} s)",
        f"- load: `{result['locust_command']}`",
        f"- {cfg['duration_s'] / 60:.0f} min, {cfg['users']} closed-loop users; prompts {cfg['prompt_tokens']} tokens, "
        f"outputs {cfg['output_tokens']}; completions and chat; {cfg['stream_fraction']:.0%} streamed, "
        f"{cfg['cancel_fraction']:.0%} of streams abandoned after the first token",
        "",
        "| requests | streamed | unary | cancelled | errors | output tokens | healthy after | cut off at the end |",
        "|---|---|---|---|---|---|---|---|",
        f"| {result['requests']} | {result['requests_by_kind']['stream']} | {result['requests_by_kind']['unary']} | "
        f"{result['requests_by_kind']['cancelled']} | {result['errors']} | {result['output_tokens']} | "
        f"{result['healthy_after']} | {result['cut_off_at_the_end']} |",
        "",
        *([f"**The server exited (code {result['server_exit_code']}) after {result['server_died_at_s'] / 60:.1f} min "
           "under load; the load stopped there.**", ""] if result.get("server_died_at_s") is not None else []),
        "Memory after the warm-up (PSS summed over the server's processes; flat = the later half's peak within "
        "the allowed growth of the earlier half's; the least-squares slope for information):",
        "",
        "```",
        json.dumps(memory, indent=2),
        "```",
        "",
        "![memory](soak_memory.png)",
        "",
    ])
