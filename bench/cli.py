"""`hybrid bench ...`: the benchmark subcommands. Light to import: runners load on use.

    hybrid bench compare --teacher T --hybrid H --out DIR     served teacher vs hybrid (vLLM + locust), CPU or GPU
    hybrid bench decode  --out DIR                             model-level decode tokens/s on a GPU
    hybrid bench report  RESULT.json --out DIR                 re-render a report from a saved result
"""

from __future__ import annotations

import argparse
import json
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
    add_decode_arguments(p)
    p.set_defaults(func=_run_decode)

    p = sub.add_parser("report", help="re-render report.md / plots from a results JSON (compare or decode)")
    p.add_argument("result", type=Path, help="results.json (compare) or decode.json (decode)")
    p.add_argument("--out", type=Path, help="output directory (default: the JSON's directory)")
    p.add_argument("--prefix", default=None, help="file-name prefix of a decode report (default: decode)")
    p.add_argument("--extra", type=Path, nargs="*", default=[], help="decode: other decode JSONs to summarise")
    p.set_defaults(func=_run_report)


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


def add_decode_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default="smollm2-135m",
                   help="shape preset (smollm2-135m, tiny) or a teacher checkpoint dir (its config only)")
    p.add_argument("--hybrid", default=None, help="hybrid checkpoint dir (config only); default: teacher at --ratio")
    p.add_argument("--ratio", type=float, default=0.25, help="softmax fraction of the derived hybrid (default 0.25)")
    p.add_argument("--contexts", default="128,2048,8192,32768", help="comma-separated context lengths")
    p.add_argument("--batches", default="1,max", help="comma-separated batch sizes or 'max' (largest in budget)")
    p.add_argument("--budget-gib", type=float, default=40.0, help="cache memory budget per model, GiB (default 40)")
    p.add_argument("--max-batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20, help="graph replays per timing repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--gdn-step", default="auto", choices=["auto", "triton", "model", "torch"],
                   help="GDN decode kernel: triton = kernels.gdn_decode (in place), model = the mixer's dispatch (fla)")
    p.add_argument("--no-graphs", action="store_true", help="eager timing only")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-context", type=int, default=None,
                   help="also profile one eager step's kernels at this context (largest batch)")
    p.add_argument("--note", default=None, help="free text stored with the result (how/where it was run)")
    p.add_argument("--out", type=Path, required=True, help="directory for decode.json, report and plots")


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
