"""Start-up time and memory of `hybrid serve` (the numbers in serve/README.md).

    python scripts/serve_measure.py CHECKPOINT [--enforce-eager] [--kv-cache-space 1] [--max-model-len 2048]

Starts `hybrid serve` on a free 127.0.0.1 port in its own process group, times it until /health
answers 200, sends a few completions, then sums the memory of every process in the group (API
server, engine core, worker): PSS (shared pages split between processes, so the sum is the real
footprint) and RSS (shared pages counted in each process). Prints one JSON object; stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

from distill.provenance import cpu_description
from serve.launch import free_port, spawn_server, stop_process_group, wait_healthy


def group_memory(pgid: int) -> dict:
    """PSS and RSS (MiB) summed over the live processes of a process group, and their names."""
    pss = rss = 0
    names = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except (OSError, ProcessLookupError):
            continue
        fields = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:]}
        pss += fields.get("Pss", 0)
        rss += fields.get("Rss", 0)
    return {"pss_mib": round(pss / 1024), "rss_mib": round(rss / 1024), "processes": sorted(names)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-space", type=float, default=1.0, help="GiB (VLLM_CPU_KVCACHE_SPACE)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--log", type=Path, default=Path("serve_measure.log"))
    args = parser.parse_args()

    port = free_port()
    cmd = [
        sys.executable, "-m", "distill.cli", "serve", args.checkpoint, "--port", str(port),
        "--served-model-name", "m", "--max-model-len", str(args.max_model_len),
        "--kv-cache-space", f"{args.kv_cache_space:g}",
    ] + (["--enforce-eager"] if args.enforce_eager else [])
    load_before = os.getloadavg()[0]
    proc = spawn_server(cmd, args.log)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"command": " ".join(["hybrid", *cmd[3:]]), "checkpoint": args.checkpoint}
    try:
        with httpx.Client(base_url=base, trust_env=False, timeout=300) as http:
            result["startup_s"] = round(wait_healthy(proc, base, args.timeout, args.log), 1)
            result["memory_idle"] = group_memory(proc.pid)
            t0 = time.monotonic()
            for i in range(4):
                r = http.post("/v1/completions", json={
                    "model": "m", "prompt": f"Request {i}: once upon a time", "max_tokens": 32,
                    "temperature": 0, "ignore_eos": True,
                })
                r.raise_for_status()
            result["four_requests_32_tokens_s"] = round(time.monotonic() - t0, 1)
            result["memory_after_requests"] = group_memory(proc.pid)
            result["hybrid_layout"] = {
                k: v for k, v in http.get("/v1/hybrid").json().items()
                if k in ("softmax_layers", "kv_bytes_per_token", "state_bytes_per_sequence", "engine", "dtypes")
            }
    finally:
        stop_process_group(proc)
    result["machine"] = cpu_description()
    result["load_average_at_start"] = round(load_before, 2)
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
