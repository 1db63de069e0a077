"""Teacher vs hybrid through the whole served path (vLLM, OpenAI API, locust), side by side in one run.

    hybrid bench compare --teacher T --hybrid H --out DIR [--contexts 128,512] [--concurrency 1,2,4,8]
                         [--capacity-contexts 2048,8192,32768] [--budget-gib 1]

What it does, in order:
1. Starts both servers on 127.0.0.1 with the same KV/state memory budget (VLLM_CPU_KVCACHE_SPACE on CPU,
   or --server-arg --kv-cache-memory-bytes=... on a GPU) and --max-model-len = --load-max-model-len;
   parses vLLM's own capacity line from each start-up log ("KV cache size: N tokens, Maximum concurrency
   for L tokens per request: Xx").
2. For every prompt length and concurrency, runs locust headless (bench/locustfile.py; closed loop,
   `concurrency` users, `requests-per-user` requests each, bounded by --max-run-time) against the
   teacher and then the hybrid (the order alternates from point to point, so slow drift of a shared
   machine does not favour one model), while sampling /metrics (KV-cache usage, running and waiting
   requests, preemptions, generated tokens) and the server's process-tree memory (psutil).
3. Restarts each model with --max-model-len at every capacity context (2K, 8K, 32K) only to read
   vLLM's capacity line; no load is sent at those lengths (on CPU, bf16 prefill of such prompts
   under load does not finish in reasonable time).
4. Writes results.json, per-request records, server and locust logs, report.md and PNG plots.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from bench.metrics import read_records, summarize
from bench.report import command_line
from bench.sampling import Sampler, process_tree_memory
from distill.model.config import CacheShape
from distill.provenance import cpu_description, package_versions
from serve.launch import ServerFailed, spawn_server, stop_process_group, wait_healthy

log = logging.getLogger("bench.compare")

LOOPBACK = "127.0.0.1"
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CAPACITY_RE = re.compile(
    r"(?P<pool>[\w +]+?) KV cache size: (?P<tokens>[\d,]+) tokens, "
    r"Maximum concurrency for (?P<len>[\d,]+) tokens per request: (?P<conc>[\d.]+)x"
)
# vLLM Prometheus samples the report uses (counters end in _total in the exposition).
METRIC_NAMES = {
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "preemptions": "vllm:num_preemptions_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
}


class CompareError(RuntimeError):
    """A server or load run failed in a way the comparison cannot recover from."""


@dataclass
class CompareConfig:
    """Settings of one `bench compare` run."""

    teacher: str
    hybrid: str
    out: Path
    contexts: list[int] = field(default_factory=lambda: [128, 512])  # prompt tokens of the load runs
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    output_tokens: int = 32
    requests_per_user: int = 2
    max_run_time_s: int = 300  # hard bound of one load point
    endpoint: str = "completions"  # completions | chat | mixed
    capacity_contexts: list[int] = field(default_factory=lambda: [2048, 8192, 32768])
    budget_gib: float = 1.0
    load_max_model_len: int = 2048
    port: int = 18400
    server: str = "auto"  # auto | hybrid-serve | vllm
    server_cmd: str | None = None  # template with {model} {host} {port} {max_model_len}; overrides `server`
    server_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 900.0
    sample_interval_s: float = 1.0
    skip_load: bool = False

    def check(self) -> None:
        if self.endpoint not in ("completions", "chat", "mixed"):
            raise CompareError(f"--endpoint must be completions, chat or mixed, got {self.endpoint!r}")
        longest = max(self.contexts, default=0) + self.output_tokens
        if not self.skip_load and longest > self.load_max_model_len:
            raise CompareError(f"prompt {max(self.contexts)} + output {self.output_tokens} tokens exceed "
                               f"--load-max-model-len {self.load_max_model_len}")
        if min(self.concurrency, default=1) < 1:
            raise CompareError("--concurrency values must be >= 1")
        for name in ("teacher", "hybrid"):
            path = Path(getattr(self, name))
            if not (path / "config.json").is_file():
                raise CompareError(f"--{name} {path}: not a checkpoint directory (no config.json)")


# ----------------------------------------------------------------------------------------------
# server processes
# ----------------------------------------------------------------------------------------------


def has_hybrid_serve() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("serve.cli") is not None
    except ImportError:
        return False


def default_server_argv(kind: str, model: str, port: int, max_model_len: int, budget_gib: float) -> list[str]:
    """kind "hybrid-serve": our `hybrid serve`; "vllm": vLLM's OpenAI server module with the same settings
    (bf16, fp32 GDN state, eager); "auto": the first when the serving package provides it."""
    if kind == "auto":
        kind = "hybrid-serve" if has_hybrid_serve() else "vllm"
    if kind == "hybrid-serve":
        return [sys.executable, "-m", "distill.cli", "serve", model, "--host", LOOPBACK, "--port", str(port),
                "--max-model-len", str(max_model_len), "--enforce-eager", "--kv-cache-space", f"{budget_gib:g}"]
    if kind == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "bfloat16",
                "--mamba-ssm-cache-dtype", "float32", "--enforce-eager", "--host", LOOPBACK, "--port", str(port),
                "--max-model-len", str(max_model_len)]
    raise CompareError(f"--server must be auto, hybrid-serve or vllm; got {kind!r}")


def parse_capacity(text: str) -> dict | None:
    """vLLM's start-up capacity line -> {pool, kv_cache_tokens, max_model_len, max_concurrency}."""
    m = None
    for m in CAPACITY_RE.finditer(text):
        pass
    if m is None:
        return None
    return {
        "pool": m["pool"].strip(),
        "kv_cache_tokens": int(m["tokens"].replace(",", "")),
        "max_model_len": int(m["len"].replace(",", "")),
        "max_concurrency": float(m["conc"]),
    }


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum each sample name over its label sets (e.g. one value per model name)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


class Server:
    """One vLLM server process group on the loopback interface, its log in a file."""

    def __init__(self, name: str, model: str, port: int, max_model_len: int, cfg: CompareConfig, log_path: Path):
        self.name, self.model, self.port, self.max_model_len = name, model, port, max_model_len
        self.cfg, self.log_path = cfg, log_path
        self.url = f"http://{LOOPBACK}:{port}"
        if cfg.server_cmd:
            argv = shlex.split(cfg.server_cmd.format(model=model, host=LOOPBACK, port=port, max_model_len=max_model_len))
        else:
            argv = default_server_argv(cfg.server, model, port, max_model_len, cfg.budget_gib)
        self.argv = argv + list(cfg.server_args)
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{self.cfg.budget_gib:g}"
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # capacity at 32K for a teacher trained to 8K
        return env

    def start(self) -> None:
        log.info("starting %s: %s", self.name, " ".join(self.argv))
        self.proc = spawn_server(self.argv, self.log_path, self.env())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = "\n".join(self.log_text().splitlines()[-25:])
            raise CompareError(f"{self.name} server exited with code {self.proc.returncode}; "
                               f"log {self.log_path}:\n{tail}")

    def wait_capacity(self) -> dict:
        deadline = time.time() + self.cfg.startup_timeout_s
        while time.time() < deadline:
            cap = parse_capacity(self.log_text())
            if cap is not None:
                return cap
            self._check_alive()
            time.sleep(1.0)
        raise CompareError(f"{self.name}: no capacity line within {self.cfg.startup_timeout_s:.0f} s ({self.log_path})")

    def wait_healthy(self) -> None:
        try:
            wait_healthy(self.proc, self.url, self.cfg.startup_timeout_s, self.log_path)
        except ServerFailed as err:
            raise CompareError(f"{self.name}: {err}") from None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)

    def metrics(self) -> dict[str, float]:
        resp = requests.get(f"{self.url}/metrics", timeout=10)
        resp.raise_for_status()
        flat = parse_prometheus(resp.text)
        return {key: flat[name] for key, name in METRIC_NAMES.items() if name in flat}

    def memory(self) -> dict[str, int]:
        return process_tree_memory(self.proc.pid) if self.proc is not None else {}

    def sample(self) -> dict:
        """/metrics (when it answers) and the process tree's memory, for the sampler."""
        sample: dict = {"t": time.time()}
        try:
            sample.update(self.metrics())
        except (requests.RequestException, ValueError):
            pass
        sample.update(self.memory())
        return sample

    def get_json(self, path: str) -> dict | None:
        try:
            resp = requests.get(f"{self.url}{path}", timeout=10)
            return resp.json() if resp.status_code == 200 else None
        except (requests.RequestException, ValueError):
            return None

    def warm_up(self) -> None:
        """One short request, so first-call costs stay out of the first measured point."""
        model = (self.get_json("/v1/models") or {}).get("data", [{}])[0].get("id", self.model)
        body = {"model": model, "prompt": "Hello, my name is", "max_tokens": 4, "temperature": 0.0}
        resp = requests.post(f"{self.url}/v1/completions", json=body, timeout=600)
        if resp.status_code != 200:
            raise CompareError(f"{self.name}: warm-up request failed: HTTP {resp.status_code} {resp.text[:300]}")


def summarize_samples(samples: list[dict]) -> dict:
    def col(key):
        return [s[key] for s in samples if key in s]

    def delta(key):
        values = col(key)
        return values[-1] - values[0] if len(values) >= 2 else None

    kv = col("kv_cache_usage")
    return {
        "samples": len(samples),
        "kv_cache_usage_max": max(kv) if kv else None,
        "kv_cache_usage_mean": sum(kv) / len(kv) if kv else None,
        "running_max": max(col("running"), default=None),
        "waiting_max": max(col("waiting"), default=None),
        "preemptions": delta("preemptions"),
        "server_generation_tokens": delta("generation_tokens"),
        "server_prompt_tokens": delta("prompt_tokens"),
        "rss_peak_bytes": max(col("rss_bytes"), default=None),
        "pss_peak_bytes": max(col("pss_bytes"), default=None),
    }


# ----------------------------------------------------------------------------------------------
# load runs
# ----------------------------------------------------------------------------------------------


def run_locust(server: Server, cfg: CompareConfig, context: int, users: int, records: Path, log_path: Path) -> int:
    """One closed-loop locust run; returns locust's exit code (1 when some requests failed)."""
    argv = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "-H", server.url, "-u", str(users), "-r", str(users), "--run-time", f"{cfg.max_run_time_s}s",
        "--stop-timeout", "0", "--records", str(records), "--tag", f"{server.name}/p{context}/c{users}",
        "--prompt-tokens", str(context), "--output-tokens", str(cfg.output_tokens),
        "--prompt-mode", "tokens" if cfg.endpoint == "completions" else "text",
        "--endpoint", cfg.endpoint, "--max-requests", str(users * cfg.requests_per_user),
    ]
    records.unlink(missing_ok=True)
    with open(log_path, "w") as logf:
        logf.write("# " + shlex.join(argv) + "\n")
        logf.flush()
        proc = subprocess.run(argv, stdout=logf, stderr=subprocess.STDOUT, timeout=cfg.max_run_time_s + 120)
    return proc.returncode


def load_point(server: Server, cfg: CompareConfig, context: int, users: int) -> dict:
    tag = f"{server.name}_p{context}_c{users}"
    records = cfg.out / "records" / f"{tag}.jsonl"
    records.parent.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(server.sample, cfg.sample_interval_s)
    sampler.start()
    t0 = time.time()
    rc = run_locust(server, cfg, context, users, records, cfg.out / "logs" / f"locust_{tag}.log")
    wall = time.time() - t0
    server_stats = summarize_samples([sample for _, sample in sampler.stop()])
    recs = read_records(records) if records.exists() else []
    summary = summarize(recs).to_dict()
    log.info("%-7s prompt %5d  users %2d: %3d ok / %d err, %.2f out tok/s, TTFT p50 %.2f s, TPOT p50 %.0f ms",
             server.name, context, users, summary["completed"], summary["errors"], summary["output_tokens_per_s"],
             summary["ttft"]["p50"], summary["tpot"]["p50"] * 1e3)
    return {"model": server.name, "context": context, "concurrency": users, "locust_exit_code": rc,
            "wall_s": wall, "records": str(records.relative_to(cfg.out)), "summary": summary, "server": server_stats,
            "loadavg_1m_after": os.getloadavg()[0]}  # other work on a shared machine shows here


# ----------------------------------------------------------------------------------------------
# the whole comparison
# ----------------------------------------------------------------------------------------------


def cache_layout(model_dir: str) -> dict:
    """Per-sequence cache bytes from the checkpoint's config (bf16 KV, fp32 GDN state)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    shape = CacheShape.from_config(cfg)
    return {"model_type": cfg.get("model_type"), "layers": len(shape.layer_types),
            "softmax_layers": len(shape.softmax_layers), "linear_layers": len(shape.linear_layers),
            "kv_bytes_per_token_bf16": shape.kv_bytes_per_token(2), "state_bytes_per_sequence": shape.state_bytes_per_sequence(4, 2)}


def resolve_models(cfg: CompareConfig) -> None:
    """Expand the conveniences: --teacher smollm2-135m (the cached real teacher) and --hybrid ratio:R
    (an untrained Stage-0 hybrid of the teacher with a fraction R of softmax layers, written under --out;
    enough for speed and memory, whose costs do not depend on trained weights)."""
    if cfg.teacher == "smollm2-135m":
        from distill.model.teacher import smollm2_checkpoint

        cfg.teacher = str(smollm2_checkpoint())
    if cfg.hybrid.startswith("ratio:"):
        ratio = cfg.hybrid.split(":", 1)[1]
        target = cfg.out / f"hybrid-r{ratio}"
        if not (target / "config.json").is_file():
            argv = [sys.executable, "-m", "distill.cli", "init", "--teacher", cfg.teacher, "--ratio", ratio,
                    "--out", str(target)]
            log.info("writing the Stage-0 hybrid: %s", shlex.join(argv))
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CompareError(f"hybrid init failed:\n{proc.stderr[-2000:]}")
        cfg.hybrid = str(target)


def run_compare(cfg: CompareConfig) -> dict:
    cfg.out.mkdir(parents=True, exist_ok=True)
    resolve_models(cfg)
    cfg.check()
    cfg.out.mkdir(parents=True, exist_ok=True)
    models = {"teacher": cfg.teacher, "hybrid": cfg.hybrid}
    result: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "command": command_line(),
        "machine": cpu_description(),
        "versions": package_versions(),
        "date": datetime.date.today().isoformat(),
        "layout": {name: cache_layout(path) for name, path in models.items()},
        "capacity": [],
        "idle_memory": {},
        "hybrid_endpoint": None,
        "load": [],
        "server_argv": {},
    }

    def save() -> None:
        (cfg.out / "results.json").write_text(json.dumps(result, indent=2))

    # 1 + 2: both servers up at the load length; capacity at that length; load points side by side
    servers = {name: Server(name, path, cfg.port + i, cfg.load_max_model_len, cfg,
                            cfg.out / "logs" / f"server_{name}_{cfg.load_max_model_len}.log")
               for i, (name, path) in enumerate(models.items())}
    try:
        for name, server in servers.items():  # one at a time: start-up is CPU-heavy
            server.start()
            cap = server.wait_capacity()
            server.wait_healthy()
            server.warm_up()
            result["server_argv"][name] = server.argv
            result["capacity"].append({"model": name, "context": cfg.load_max_model_len, **cap})
            result["idle_memory"][name] = server.memory()
            if name == "hybrid":
                result["hybrid_endpoint"] = server.get_json("/v1/hybrid")
            log.info("%s up: %s", name, cap)
            save()
        if not cfg.skip_load:
            flip = False
            for context in cfg.contexts:
                for users in cfg.concurrency:
                    order = ["hybrid", "teacher"] if flip else ["teacher", "hybrid"]
                    flip = not flip
                    for name in order:
                        result["load"].append(load_point(servers[name], cfg, context, users))
                        save()
    finally:
        for server in servers.values():
            server.stop()

    # 3: capacity at the other context lengths, read from the start-up log only
    for context in cfg.capacity_contexts:
        if context == cfg.load_max_model_len:
            continue
        for i, (name, path) in enumerate(models.items()):
            server = Server(name, path, cfg.port + i, context, cfg, cfg.out / "logs" / f"server_{name}_{context}.log")
            try:
                server.start()
                cap = server.wait_capacity()
            except CompareError as err:  # e.g. not even one sequence of this length fits the budget
                cap = {"max_concurrency": 0.0, "kv_cache_tokens": None, "max_model_len": context,
                       "error": str(err).splitlines()[0] + " ... " + _last_error_line(server.log_text())}
            finally:
                server.stop()
            result["capacity"].append({"model": name, "context": context, **cap})
            log.info("%s capacity at %d: %s", name, context, cap)
            save()
    save()
    return result


def _last_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "Error" in ln or "error" in ln]
    return lines[-1].strip()[:300] if lines else ""


def config_from_args(args) -> CompareConfig:
    def ints(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise CompareError(f"expected comma-separated integers, got {text!r}") from None

    return CompareConfig(
        teacher=args.teacher, hybrid=args.hybrid, out=args.out, contexts=ints(args.contexts),
        concurrency=ints(args.concurrency), output_tokens=args.output_tokens,
        requests_per_user=args.requests_per_user, max_run_time_s=args.max_run_time, endpoint=args.endpoint,
        capacity_contexts=ints(args.capacity_contexts), budget_gib=args.budget_gib,
        load_max_model_len=args.load_max_model_len, port=args.port, server=args.server, server_cmd=args.server_cmd,
        server_args=list(args.server_arg or []), startup_timeout_s=args.startup_timeout, skip_load=args.skip_load,
    )


def run_cli(args) -> None:
    from bench.report import render_compare_report

    cfg = config_from_args(args)
    result = run_compare(cfg)
    print(render_compare_report(result, cfg.out))
