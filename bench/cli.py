"""`hybrid bench ...`: the benchmark subcommands. Runners load on use; each benchmark owns its arguments
where it has a `python -m bench.X` entry point of its own (decode).

    hybrid bench compare --teacher T --hybrid H --out DIR     served teacher vs hybrid (vLLM + locust), CPU or GPU
    hybrid bench decode  --out DIR                             model-level decode tokens/s on a GPU
    hybrid bench report  RESULT.json --out DIR                 re-render a report from a saved result
    hybrid bench fuzz    URL --api-key KEY --examples N        fuzz a server you started through its OpenAPI schema
    hybrid bench soak    CKPT --duration S --out DIR           long mixed load on one server: errors, memory growth
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from distill.errors import UserError


def register(subparsers) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: served teacher-vs-hybrid comparison, GPU decode throughput, report rendering",
        description="Benchmarks. `compare` serves both models with vLLM and loads them with locust; "
        "`decode` times model-level decode on a GPU; `report` re-renders a saved result.",
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)

    p = sub.add_parser(
        "compare",
        help="teacher vs hybrid served by vLLM, same KV/state budget, locust load, capacity at 2K/8K/32K",
        description="Start both models behind vLLM's OpenAI server on 127.0.0.1 with the same KV/state memory "
        "budget, run locust (streaming) at each prompt length and concurrency, sample /metrics and process "
        "memory, read vLLM's capacity figure at each capacity context, and write report.md with plots.",
    )
    add_compare_arguments(p)
    p.set_defaults(func=_run_compare)

    p = sub.add_parser(
        "decode",
        help="decode tokens/s and memory of teacher vs hybrid (preallocated caches, CUDA graphs) on a GPU",
        description="Model-level decode benchmark in our transformers implementation at each context, at batch 1 "
        "and at the largest batch whose cache fits one memory budget. Random weights of the teacher's shape.",
    )
    from bench.decode import add_arguments as add_decode_arguments

    add_decode_arguments(p)
    p.set_defaults(func=_run_decode)

    p = sub.add_parser("report", help="re-render report.md / plots from a results JSON (compare or decode)")
    p.add_argument("result", type=Path, help="results.json (compare) or decode.json (decode)")
    p.add_argument("--out", type=Path, help="output directory (default: the JSON's directory)")
    p.add_argument("--prefix", default=None, help="file-name prefix of a decode report (default: decode)")
    p.add_argument("--extra", type=Path, nargs="*", default=[], help="decode: other decode JSONs to summarise")
    p.set_defaults(func=_run_report)

    p = sub.add_parser(
        "fuzz",
        help="fuzz a running server (yours, on loopback) through its own OpenAPI schema; fails on any 5xx",
        description="Generate requests from the server's /openapi.json with schemathesis (schema-valid and "
        "schema-breaking), send each once, and count answers. Passes when no answer is a 5xx and the server "
        "still completes a prompt afterwards. Bounded: --examples per operation and mode.",
    )
    p.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--examples", type=int, default=50, help="requests per operation and mode (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    p.set_defaults(func=_run_fuzz)

    p = sub.add_parser(
        "soak",
        help="long mixed load (locust) on one `hybrid serve`: no errors, memory flat after warm-up",
        description="Serve CKPT on 127.0.0.1 and load it for --duration seconds with short and long prompts, "
        "completions and chat, streamed and not, and clients that hang up mid-stream, sampling the server's "
        "memory. Fails on any failed request, an unhealthy server at the end, or memory that keeps rising after "
        "--warmup: the later half's PSS peak above the earlier half's by more than --max-growth-mib-per-hour "
        "allows over that time. Writes soak.json, soak.md and soak_memory.png.",
    )
    p.add_argument("checkpoint", help="checkpoint directory to serve")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--duration", type=int, default=1800, help="seconds of load (default 1800)")
    p.add_argument("--users", type=int, default=4, help="closed-loop users (default 4)")
    p.add_argument("--prompt-tokens", default="choice:1,8,64,512,1500", help="prompt length distribution")
    p.add_argument("--output-tokens", default="uniform:1:64", help="max_tokens distribution")
    p.add_argument("--stream-fraction", type=float, default=0.6)
    p.add_argument("--cancel-fraction", type=float, default=0.25)
    p.add_argument("--interval", type=float, default=10.0, help="memory sampling period, s")
    p.add_argument("--warmup", type=float, default=600.0,
                   help="seconds of load before memory must be flat (default 600: new batch shapes fill caches early)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-growth-mib-per-hour", type=float, default=64.0,
                   help="growth of the PSS peak from the earlier to the later half of the run still called flat")
    p.add_argument("--server-arg", action="append", default=[], help="extra `hybrid serve` argument (repeatable)")
    p.set_defaults(func=_run_soak)


# ---- compare ---------------------------------------------------------------------------------


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True,
                   help="teacher checkpoint directory (Hugging Face format), or smollm2-135m (the cached real one)")
    p.add_argument("--hybrid", required=True,
                   help="hybrid checkpoint directory, or ratio:R for an untrained Stage-0 hybrid of the teacher "
                   "with a fraction R of softmax layers (written under --out; speed and memory only)")
    p.add_argument("--out", type=Path, required=True, help="output directory (results.json, report.md, logs)")
    p.add_argument("--contexts", default="128,512", help="prompt lengths of the load runs, tokens (default 128,512)")
    p.add_argument("--concurrency", default="1,2,4,8", help="concurrent users per load run (default 1,2,4,8)")
    p.add_argument("--output-tokens", type=int, default=32, help="generated tokens per request (default 32)")
    p.add_argument("--requests-per-user", type=int, default=2, help="requests each user sends per run (default 2)")
    p.add_argument("--max-run-time", type=int, default=300, help="hard bound of one load run, seconds (default 300)")
    p.add_argument("--endpoint", default="completions", choices=["completions", "chat", "mixed"])
    p.add_argument("--capacity-contexts", default="2048,8192,32768",
                   help="context lengths at which vLLM's capacity figure is read (default 2048,8192,32768)")
    p.add_argument("--budget-gib", type=float, default=1.0,
                   help="KV/state pool per server, GiB (VLLM_CPU_KVCACHE_SPACE; default 1)")
    p.add_argument("--load-max-model-len", type=int, default=2048, help="--max-model-len of the load servers")
    p.add_argument("--port", type=int, default=18400, help="first loopback port (teacher; hybrid gets port+1)")
    p.add_argument("--server", default="auto", choices=["auto", "hybrid-serve", "vllm"],
                   help="hybrid-serve: `hybrid serve --enforce-eager`; vllm: vLLM's OpenAI server module with the "
                   "same settings (bf16, fp32 GDN state, eager); auto (default): hybrid-serve when installed")
    p.add_argument("--server-cmd", default=None,
                   help="custom server command template with {model} {host} {port} {max_model_len} (overrides --server)")
    p.add_argument("--server-arg", action="append", help="extra argument for every server (repeatable)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for a server")
    p.add_argument("--skip-load", action="store_true", help="capacity figures only")


def _run_compare(args: argparse.Namespace) -> None:
    from bench.compare import CompareError, run_cli

    try:
        run_cli(args)
    except CompareError as err:
        raise UserError(str(err)) from None


# ---- decode ----------------------------------------------------------------------------------


def _run_decode(args: argparse.Namespace) -> None:
    from bench.decode import run_cli

    run_cli(args)


# ---- report ----------------------------------------------------------------------------------


def _run_report(args: argparse.Namespace) -> None:
    from bench.report import render_compare_report, render_decode_report

    if not args.result.is_file():
        raise UserError(f"{args.result} does not exist")
    result = json.loads(args.result.read_text())
    out = args.out or args.result.parent
    out.mkdir(parents=True, exist_ok=True)
    if "points" in result:  # a decode result
        extra = [json.loads(p.read_text()) for p in args.extra]
        text = render_decode_report(result, out, prefix=args.prefix or "decode", extra=extra)
    elif "load" in result:
        text = render_compare_report(result, out)
    else:
        raise UserError(f"{args.result}: neither a compare results.json nor a decode.json")
    print(text)


# ---- fuzz ------------------------------------------------------------------------------------


def _run_fuzz(args: argparse.Namespace) -> None:
    from urllib.parse import urlparse

    from bench.fuzz import fuzz, result_json

    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise UserError(f"{args.url}: fuzz only servers you started on loopback (127.0.0.1)")
    result = fuzz(args.url.rstrip("/"), args.api_key, args.examples, args.seed)
    if args.out:
        args.out.write_text(result_json(result))
    print(result.summary())
    for error in result.server_errors:
        print(json.dumps(error)[:1000])
    if not result.passed:
        raise SystemExit(1)


# ---- soak ------------------------------------------------------------------------------------


def _run_soak(args: argparse.Namespace) -> None:
    from bench.soak import SoakConfig, run_soak

    cfg = SoakConfig(
        checkpoint=args.checkpoint, out=args.out, duration_s=args.duration, users=args.users,
        prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens, stream_fraction=args.stream_fraction,
        cancel_fraction=args.cancel_fraction, interval_s=args.interval, warmup_s=args.warmup,
        max_model_len=args.max_model_len, max_growth_mib_per_hour=args.max_growth_mib_per_hour,
        server_args=[a for arg in args.server_arg for a in shlex.split(arg)],
    )
    result = run_soak(cfg)
    print((args.out / "soak.md").read_text())
    if not result["passed"]:
        raise SystemExit(1)
