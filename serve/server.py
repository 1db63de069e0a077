"""`hybrid serve`: vLLM's OpenAI-compatible server for a hybrid (or a plain teacher) checkpoint.

The protocol (/v1/models, /v1/completions, /v1/chat/completions, streaming, logprobs, /health,
/metrics, ...) is vLLM's own server, built with vLLM's `build_app` and served by its uvicorn launcher.
This module adds only:
  - checkpoint resolution and validation, with one clear error line before vLLM starts;
  - CPU defaults: VLLM_TARGET_DEVICE=cpu when there is no CUDA, bfloat16 (vLLM's CPU GDN kernel
    requires it), float32 GDN recurrent state, VLLM_CPU_KVCACHE_SPACE from --kv-cache-space, a bounded
    oneDNN primitive cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY, below);
  - GET /v1/hybrid: the layer layout and the per-sequence KV / recurrent-state bytes;
  - API-key checks that answer OpenAI-style errors (vLLM's own answer is {"error": "Unauthorized"}).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.errors import UserError

SERVABLE_ARCHITECTURES = {
    "HybridForCausalLM": "hybrid",
    "LlamaForCausalLM": "teacher",
    "MistralForCausalLM": "teacher",
    "Qwen2ForCausalLM": "teacher",
    "Qwen3ForCausalLM": "teacher",
}
# vllm-cpu 0.32's GDN kernels accept these key/value head dims only; its attention takes these head dims.
CPU_GDN_HEAD_DIMS = (64, 128)
CPU_ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# The routes `hybrid serve` exposes: the OpenAI surface, tokenizer helpers, health, metrics, version,
# our /v1/hybrid and the API docs. vLLM's other routes (SageMaker's /invocations and /ping, Anthropic's
# /v1/messages, /v1/responses, /generative_scoring, elastic-EP scaling, /load, /kv_event_sources, ...)
# are removed from the app: what is not served cannot be reached without a key.
EXPOSED_PATHS = frozenset({
    "/health", "/metrics", "/version",
    "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/hybrid",
    "/tokenize", "/detokenize",
    "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
})
# With --api-key every path needs the key but these (and /metrics with --public-metrics).
OPEN_PATHS = frozenset({"/health"})
LAYOUT_CONTEXTS = (1024, 4096, 16384)


@dataclass
class ServeOptions:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_model_len: int | None = None
    dtype: str = "bfloat16"
    mamba_ssm_cache_dtype: str = "float32"
    kv_cache_space_gib: float | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    public_metrics: bool = False
    vllm_args: list[str] = field(default_factory=list)


# ---- checkpoint ------------------------------------------------------------------------------------
def resolve_checkpoint(spec: str) -> Path | str:
    """A local checkpoint directory, the alias smollm2-135m (cached teacher), or a Hugging Face id."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    from distill.model.teacher import SMOLLM2_ALIAS

    if spec == SMOLLM2_ALIAS:
        from distill.model.teacher import smollm2_checkpoint

        return smollm2_checkpoint()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith("."):
        return spec  # a Hugging Face id: vLLM downloads it
    raise UserError(f"checkpoint {spec!r} does not exist (expected a checkpoint directory with config.json)")


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """config.json of a servable checkpoint, or a UserError that says what is wrong."""
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file} is not valid JSON: {err}") from None
    architectures = config.get("architectures") or []
    servable = [a for a in architectures if a in SERVABLE_ARCHITECTURES]
    if not servable:
        raise UserError(
            f"{config_file}: architectures {architectures} cannot be served here "
            f"(supported: {', '.join(SERVABLE_ARCHITECTURES)})"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"{path} holds no weights (*.safetensors or *.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise UserError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    if servable[0] == "HybridForCausalLM":
        from distill.model.config import HybridConfig

        try:
            HybridConfig.from_pretrained(path)
        except (ValueError, TypeError) as err:
            raise UserError(f"{config_file} is not a valid hybrid config: {err}") from None
    return config


def check_cpu_support(config: dict[str, Any]) -> None:
    """Shapes vllm-cpu 0.32's kernels reject, named before the engine starts and dies on them."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim not in CPU_ATTENTION_HEAD_DIMS:
        raise UserError(f"attention head_dim {head_dim} is not supported by vLLM's CPU attention {CPU_ATTENTION_HEAD_DIMS}")
    if "linear_attention" in (config.get("layer_types") or []):
        for key in ("linear_key_head_dim", "linear_value_head_dim"):
            if config.get(key) not in CPU_GDN_HEAD_DIMS:
                raise UserError(f"{key}={config.get(key)} is not supported by vllm-cpu's GDN kernel {CPU_GDN_HEAD_DIMS}")


# ---- environment and vLLM's arguments ---------------------------------------------------------------
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 64

def configure_environment(opts: ServeOptions) -> str:
    """Set the variables vLLM reads at import; returns "cuda" or "cpu". Must run before importing vllm."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # else vLLM may guess wrong and load AVX-512 code
        # vllm-cpu 0.32 cannot load its own AOT compile cache ("'function' object has no attribute
        # 'finalize_loading'") and recompiles on every start; the older Inductor cache does get reused
        # (SmolLM2 hybrid start-up, warm: 171 s with AOT, 122 s without; serve/README.md).
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if opts.kv_cache_space_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{opts.kv_cache_space_gib:g}"
        # oneDNN keeps a compiled primitive per GEMM shape, and every new batch size is a new shape: with
        # its default capacity (1024) the worker grew ~190-430 MiB/h under mixed load for as long as we
        # watched; capped, the growth fell to 13-93 MiB/h at no measurable cost in throughput
        # (serve/README.md, "Soak").
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    return device


def vllm_argv(opts: ServeOptions, model: str) -> list[str]:
    argv = [
        "--model", model,
        "--host", opts.host,
        "--port", str(opts.port),
        "--dtype", opts.dtype,
        "--served-model-name", opts.served_model_name or Path(str(model)).name,
    ]
    if opts.max_model_len:
        argv += ["--max-model-len", str(opts.max_model_len)]
    if opts.max_num_seqs:
        argv += ["--max-num-seqs", str(opts.max_num_seqs)]
    if opts.enforce_eager:
        argv += ["--enforce-eager"]
    return argv + opts.vllm_args


def parse_vllm_args(argv: list[str]) -> argparse.Namespace:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="hybrid serve (vLLM options)"))
    args = parser.parse_args(argv)
    validate_parsed_serve_args(args)
    return args


# ---- GET /v1/hybrid -----------------------------------------------------------------------------------
def cache_layout(hf_config, kv_bytes: int, conv_bytes: int, state_bytes: int, contexts: list[int]) -> dict[str, Any]:
    """Layer layout and cache bytes per sequence, for a hybrid or a plain (all-softmax) teacher."""
    from distill.model.config import CacheShape, HybridConfig

    is_hybrid = getattr(hf_config, "model_type", None) == HybridConfig.model_type
    shape = CacheShape.from_config(hf_config)
    layout: dict[str, Any] = {
        "is_hybrid": is_hybrid,
        "num_layers": len(shape.layer_types),
        "layer_types": list(shape.layer_types),
        "softmax_layers": shape.softmax_layers,
        "linear_layers": shape.linear_layers,
        "kv_bytes_per_token": shape.kv_bytes_per_token(kv_bytes),
        "state_bytes_per_sequence": shape.state_bytes_per_sequence(state_bytes, conv_bytes),
        "cache_bytes_per_sequence": [
            {
                "context": ctx,
                "bytes": shape.cache_bytes_per_sequence(ctx, kv_bytes, state_bytes, conv_bytes),
                "all_softmax_bytes": shape.kv_bytes_per_token(kv_bytes, all_layers=True) * ctx,
            }
            for ctx in contexts
        ],
    }
    if is_hybrid:
        layout["gdn"] = {
            "heads": hf_config.linear_num_value_heads,
            "key_head_dim": hf_config.linear_key_head_dim,
            "value_head_dim": hf_config.linear_value_head_dim,
            "conv_kernel": hf_config.linear_conv_kernel_dim,
        }
        layout["teacher_model_type"] = hf_config.teacher_model_type
        layout["provenance"] = hf_config.provenance
    return layout


def hybrid_info(engine_client, served_model_name: str) -> dict[str, Any]:
    """The body of GET /v1/hybrid, from the running engine's own configuration."""
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator
    from vllm.utils.torch_utils import get_kv_cache_torch_dtype

    config = engine_client.vllm_config
    model_config, cache_config = config.model_config, config.cache_config
    kv_dtype = get_kv_cache_torch_dtype(cache_config.cache_dtype, model_config.dtype)
    conv_dtype, state_dtype = MambaStateDtypeCalculator.gated_delta_net_state_dtype(
        model_config.dtype, cache_config.mamba_cache_dtype, cache_config.mamba_ssm_cache_dtype
    )
    contexts = sorted({*LAYOUT_CONTEXTS, model_config.max_model_len})
    layout = cache_layout(
        model_config.hf_config, kv_dtype.itemsize, conv_dtype.itemsize, state_dtype.itemsize, contexts
    )
    return {
        "object": "hybrid.layout",
        "model": served_model_name,
        "checkpoint": str(model_config.model),
        "architecture": model_config.architectures[0],
        **layout,
        "dtypes": {
            "model": str(model_config.dtype).removeprefix("torch."),
            "kv_cache": str(kv_dtype).removeprefix("torch."),
            **({
                "conv_state": str(conv_dtype).removeprefix("torch."),
                "recurrent_state": str(state_dtype).removeprefix("torch."),
            } if layout["is_hybrid"] else {}),
        },
        "engine": {
            "max_model_len": model_config.max_model_len,
            "max_num_seqs": config.scheduler_config.max_num_seqs,
            "block_size": cache_config.block_size,
            "num_blocks": cache_config.num_gpu_blocks,
            "enable_prefix_caching": cache_config.enable_prefix_caching,
        },
    }


def add_hybrid_routes(app, served_model_name: str) -> None:
    from fastapi.responses import JSONResponse

    async def get_hybrid():
        return JSONResponse(hybrid_info(app.state.engine_client, served_model_name))

    app.add_api_route("/v1/hybrid", get_hybrid, methods=["GET"], summary="hybrid layout and cache bytes")


def keep_exposed_routes(app) -> None:
    """Drop every route of vLLM's app that is not in EXPOSED_PATHS (the OpenAPI schema follows)."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) in EXPOSED_PATHS]
    app.openapi_schema = None


class OpenAIAuthMiddleware:
    """Bearer-token check on every path but the open ones, answering 401 as OpenAI does.

    Deny by default: a route vLLM adds in a later version is guarded without anyone listing it.
    vLLM installs the middleware from its `--middleware` list (classes without arguments), so the
    accepted keys and open paths are set on the class by `configure` before the app is built.
    """

    token_hashes: list[bytes] = []
    open_paths: frozenset[str] = OPEN_PATHS

    @classmethod
    def configure(cls, tokens: list[str], open_paths: frozenset[str] = OPEN_PATHS) -> None:
        cls.token_hashes = [hashlib.sha256(t.encode()).digest() for t in tokens]
        cls.open_paths = open_paths

    def __init__(self, app) -> None:
        self.app = app

    def _authorized(self, headers) -> bool:
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        return any(secrets.compare_digest(digest, h) for h in self.token_hashes)

    async def __call__(self, scope, receive, send) -> None:
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse

        if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path not in self.open_paths and not self._authorized(Headers(scope=scope)):
                error = {
                    "message": "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
                    "type": "authentication_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
                await JSONResponse({"error": error}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- running ------------------------------------------------------------------------------------------
async def run_server(args: argparse.Namespace) -> None:
    """vLLM's run_server -> run_server_worker -> build_and_serve, with our routes and auth added to the app."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
    import vllm.envs as envs

    listen_address, sock = setup_server(args, reuse_port=False)
    uvicorn_kwargs: dict[str, Any] = {}
    if (log_config := get_uvicorn_log_config(args)) is not None:
        uvicorn_kwargs["log_config"] = log_config
    async with build_async_engine_client(args) as engine_client:
        stop = StopReason.watch(engine_client)
        supported_tasks = await engine_client.get_supported_tasks()
        app = build_app(args, supported_tasks, engine_client.model_config)
        add_hybrid_routes(app, args.served_model_name[0])
        keep_exposed_routes(app)
        await init_app_state(engine_client, app.state, args, supported_tasks)
        print(f"hybrid serve: listening on {listen_address} (model {args.served_model_name[0]})", flush=True)
        shutdown_task = await serve_http(
            app,
            sock=sock,
            enable_ssl_refresh=args.enable_ssl_refresh,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=args.ssl_ciphers,
            h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
            **uvicorn_kwargs,
        )
        engine_died = stop.engine_died()  # decided before the engine client is closed below
    try:
        await shutdown_task
    finally:
        sock.close()
    if engine_died:
        print("hybrid serve: the engine died (see the log above); exiting so a supervisor restarts the server", flush=True)
        raise SystemExit(ENGINE_DIED_EXIT_CODE)


ENGINE_DIED_EXIT_CODE = 3


@dataclass
class StopReason:
    """Why the HTTP server stopped: a requested shutdown (SIGTERM/SIGINT) or a dead engine.

    vLLM's watchdog stops the HTTP server within ~5 s of the engine core dying (instead of answering
    503 for ever), but the process then exits 0 like after a requested stop. A supervisor (systemd,
    Kubernetes) must see a failure, so `hybrid serve` exits ENGINE_DIED_EXIT_CODE then. A requested
    stop goes through the engine client's `shutdown` first, which marks the engine "errored" too; the
    wrapper records that it was asked for.
    """

    engine_client: Any
    shutdown_requested: bool = False

    @classmethod
    def watch(cls, engine_client) -> "StopReason":
        reason = cls(engine_client)
        shutdown = engine_client.shutdown

        def requested_shutdown(*args, **kwargs):
            reason.shutdown_requested = True
            return shutdown(*args, **kwargs)

        engine_client.shutdown = requested_shutdown
        return reason

    def engine_died(self) -> bool:
        return self.engine_client.errored and not self.shutdown_requested


def serve(opts: ServeOptions) -> None:
    """Validate the checkpoint, set up the environment, and run the server until it is stopped."""
    model = resolve_checkpoint(opts.checkpoint)
    device = configure_environment(opts)
    if isinstance(model, Path):
        config = inspect_checkpoint(model)
        has_gdn = "linear_attention" in (config.get("layer_types") or [])
        if device == "cpu":
            check_cpu_support(config)
            if has_gdn and opts.dtype != "bfloat16":
                raise UserError(f"--dtype {opts.dtype}: vLLM's CPU GDN kernel requires bfloat16")
        limit = config.get("max_position_embeddings")
        if opts.max_model_len and limit and opts.max_model_len > limit:
            raise UserError(f"--max-model-len {opts.max_model_len} exceeds the checkpoint's max_position_embeddings {limit}")
        if has_gdn:
            opts.vllm_args = ["--mamba-ssm-cache-dtype", opts.mamba_ssm_cache_dtype, *opts.vllm_args]
    args = parse_vllm_args(vllm_argv(opts, str(model)))
    if opts.api_key:
        OpenAIAuthMiddleware.configure([opts.api_key], OPEN_PATHS | ({"/metrics"} if opts.public_metrics else set()))
        args.middleware.append(f"{__name__}.{OpenAIAuthMiddleware.__name__}")

    import uvloop

    from vllm.logger import configure_logging_from_args

    configure_logging_from_args(args)
    uvloop.run(run_server(args))
