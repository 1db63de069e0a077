"""Locust load test for any OpenAI-compatible LLM endpoint, streaming completions and/or chat.

    locust -f bench/locustfile.py --headless -H http://127.0.0.1:8000 -u 8 -r 8 --run-time 60s \\
        --prompt-tokens uniform:256:1024 --output-tokens 64 --endpoint mixed --records run.jsonl

Every user sends one request at a time, back to back (closed loop: users = concurrency). Each request
streams; the client times the first token (TTFT), every later token (ITL) and the end (E2E), and
appends one JSON line per request to --records (see bench/metrics.py: RequestRecord). Percentiles are
computed from those records by `bench.metrics.summarize` — `python -m bench.metrics run.jsonl` prints
them. Locust's own statistics also show "e2e" and "ttft" rows per endpoint.

Options (command line, or the environment variable in brackets):
  --model NAME            model to ask for; default: the first id from GET /v1/models   [BENCH_MODEL]
  --endpoint E            completions | chat | mixed (half each)                       [BENCH_ENDPOINT]
  --prompt-tokens SPEC    prompt length distribution: N, uniform:LO:HI, normal:MEAN:STD,
                          choice:A,B,C                                                 [BENCH_PROMPT_TOKENS]
  --output-tokens SPEC    max_tokens distribution, same syntax                          [BENCH_OUTPUT_TOKENS]
  --prompt-mode M         tokens (random token ids, exact length; completions only) or
                          text (random common words, ~1 token each)                    [BENCH_PROMPT_MODE]
  --ignore-eos / --no-ignore-eos  ask the server (vLLM) to generate exactly max_tokens   [BENCH_IGNORE_EOS]
  --api-key KEY           sent as a Bearer token                                        [BENCH_API_KEY]
  --records PATH          JSONL file of per-request records (appended)                 [BENCH_RECORDS]
  --tag TEXT              label stored in every record                                 [BENCH_TAG]
  --request-timeout S     seconds before a request counts as failed                     [BENCH_REQUEST_TIMEOUT]
  --seed N                seed of the prompt generator (each user offsets it)           [BENCH_SEED]
  --max-requests N        stop (quit locust) once N requests have been sent and answered;
                          0 = until --run-time                                          [BENCH_MAX_REQUESTS]
  --stream-fraction F     share of requests sent with stream=true; the rest wait for one
                          JSON answer (recorded as kind "unary")                         [BENCH_STREAM_FRACTION]
  --cancel-fraction F     share of streamed requests the client abandons after the first
                          token (kind "cancelled": a hang-up on purpose, not an error)   [BENCH_CANCEL_FRACTION]

Requests still in flight when locust stops at --run-time are recorded with the error
"cut off at the run-time limit", so a point that did not finish shows it.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time

import gevent
import requests
from locust import User, constant, events, task
from locust.exception import StopUser

from bench.metrics import CUT_OFF, DONE, LengthDist, StreamTimer, iter_stream_lines, parse_sse_line, text_prompt, token_prompt

_records_lock = threading.Lock()
_records_file = None
_user_ids = itertools.count()
_issued = 0  # requests sent by this locust process
_inflight: dict[int, StreamTimer] = {}  # id -> timer of requests not answered yet
_quitting = False


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    group = parser  # locust's parser (configargparse): env_var= works; is_secret only on the parser itself
    group.add_argument("--model", default="", env_var="BENCH_MODEL", help="model name (default: first from /v1/models)")
    group.add_argument("--endpoint", default="completions", choices=["completions", "chat", "mixed"],
                       env_var="BENCH_ENDPOINT", help="which API to load")
    group.add_argument("--prompt-tokens", default="256", env_var="BENCH_PROMPT_TOKENS",
                       help="prompt length: N | uniform:LO:HI | normal:MEAN:STD | choice:A,B,C")
    group.add_argument("--output-tokens", default="64", env_var="BENCH_OUTPUT_TOKENS",
                       help="max_tokens, same syntax as --prompt-tokens")
    group.add_argument("--prompt-mode", default="text", choices=["text", "tokens"], env_var="BENCH_PROMPT_MODE",
                       help="tokens: random token-id prompts of exact length (completions only)")
    group.add_argument("--ignore-eos", default="true", env_var="BENCH_IGNORE_EOS",
                       help="true/false: send vLLM's ignore_eos so every request generates max_tokens")
    group.add_argument("--api-key", default="", env_var="BENCH_API_KEY", help="Bearer token", is_secret=True)
    group.add_argument("--records", default="", env_var="BENCH_RECORDS", help="append per-request JSONL here")
    group.add_argument("--tag", default="", env_var="BENCH_TAG", help="label stored in each record")
    group.add_argument("--request-timeout", type=float, default=600.0, env_var="BENCH_REQUEST_TIMEOUT")
    group.add_argument("--seed", type=int, default=0, env_var="BENCH_SEED")
    group.add_argument("--max-requests", type=int, default=0, env_var="BENCH_MAX_REQUESTS",
                       help="quit after this many requests (0: run until --run-time)")
    group.add_argument("--stream-fraction", type=float, default=1.0, env_var="BENCH_STREAM_FRACTION",
                       help="share of requests streamed (the rest: stream=false)")
    group.add_argument("--cancel-fraction", type=float, default=0.0, env_var="BENCH_CANCEL_FRACTION",
                       help="share of streamed requests abandoned after their first token")


@events.test_start.add_listener
def _open_records(environment, **kwargs) -> None:
    global _records_file
    opts = environment.parsed_options
    # validate once, before any user starts, so a typo fails loudly instead of as N errors
    LengthDist.parse(opts.prompt_tokens)
    LengthDist.parse(opts.output_tokens)
    if opts.records and _records_file is None:
        _records_file = open(opts.records, "a", buffering=1)


@events.quitting.add_listener
def _close_records(environment, **kwargs) -> None:
    global _records_file
    end = time.time()
    for timer in list(_inflight.values()):  # killed by the run-time limit mid-stream
        _write_record(timer.finish(end, error=CUT_OFF))
    _inflight.clear()
    if _records_file is not None:
        _records_file.close()
        _records_file = None


def _write_record(record) -> None:
    if _records_file is None:
        return
    with _records_lock:
        _records_file.write(record.to_json() + "\n")


def _truthy(text: str) -> bool:
    return str(text).strip().lower() in {"1", "true", "yes", "on"}


class OpenAIStreamingUser(User):
    """One closed-loop client: one streaming request at a time, no think time."""

    wait_time = constant(0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.base = self.host.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[: -len("/v1")]
        self.session = requests.Session()
        if opts.api_key:
            self.session.headers["Authorization"] = f"Bearer {opts.api_key}"
        self.prompt_dist = LengthDist.parse(opts.prompt_tokens)
        self.output_dist = LengthDist.parse(opts.output_tokens)
        self.rng = random.Random(opts.seed * 1_000_003 + next(_user_ids))
        self.ignore_eos = _truthy(opts.ignore_eos)
        self.model = opts.model or self._discover_model()
        self.endpoints = ["completions", "chat"] if opts.endpoint == "mixed" else [opts.endpoint]
        if opts.prompt_mode == "tokens" and "chat" in self.endpoints:
            raise ValueError("--prompt-mode tokens works with --endpoint completions only")

    def _discover_model(self) -> str:
        resp = self.session.get(f"{self.base}/v1/models", timeout=30)
        resp.raise_for_status()
        models = resp.json().get("data") or []
        if not models:
            raise RuntimeError(f"{self.base}/v1/models lists no model; pass --model")
        return models[0]["id"]

    def _body(self, endpoint: str, stream: bool) -> dict:
        opts = self.environment.parsed_options
        n_prompt = self.prompt_dist.sample(self.rng)
        body: dict = {"model": self.model, "max_tokens": self.output_dist.sample(self.rng), "temperature": 0.0}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        if self.ignore_eos:
            body["ignore_eos"] = True
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text_prompt(n_prompt, self.rng)}]
        elif opts.prompt_mode == "tokens":
            body["prompt"] = token_prompt(n_prompt, self.rng)
        else:
            body["prompt"] = text_prompt(n_prompt, self.rng)
        return body

    def _maybe_quit(self) -> None:
        """With --max-requests: once all were sent and none is in flight, stop the whole run."""
        global _quitting
        limit = self.environment.parsed_options.max_requests
        if limit and _issued >= limit and not _inflight and not _quitting and self.environment.runner:
            _quitting = True
            gevent.spawn(self.environment.runner.quit)

    @task
    def generate(self) -> None:
        global _issued
        opts = self.environment.parsed_options
        if opts.max_requests and _issued >= opts.max_requests:
            self._maybe_quit()
            raise StopUser()
        _issued += 1
        endpoint = self.rng.choice(self.endpoints)
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        stream = self.rng.random() < opts.stream_fraction
        kind = "unary" if not stream else "cancelled" if self.rng.random() < opts.cancel_fraction else "stream"
        body = self._body(endpoint, stream)
        wall0, t0 = time.time(), time.perf_counter()

        def now() -> float:  # wall-clock timestamps with perf_counter resolution
            return wall0 + (time.perf_counter() - t0)

        timer = StreamTimer(wall0, endpoint=endpoint, tag=opts.tag, kind=kind)
        key = id(timer)
        _inflight[key] = timer
        error = None
        try:
            with self.session.post(f"{self.base}{path}", json=body, stream=stream, timeout=opts.request_timeout) as resp:
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                elif not stream:
                    timer.on_payload(now(), resp.json())
                else:
                    for line in iter_stream_lines(resp.raw.read1):
                        payload = parse_sse_line(line)
                        if payload is None:
                            continue
                        if payload == DONE:
                            break
                        if "error" in payload:
                            error = f"stream error: {json.dumps(payload['error'])[:200]}"
                            break
                        timer.on_payload(now(), payload)
                        if kind == "cancelled" and timer.token_times:
                            break  # leaving the `with` closes the connection mid-stream
        except (requests.RequestException, ValueError) as err:
            error = f"{type(err).__name__}: {str(err)[:200]}"
        record = timer.finish(now(), error=error)
        del _inflight[key]
        _write_record(record)
        events_fire = self.environment.events.request.fire
        exc = RuntimeError(record.error) if record.error else None
        events_fire(request_type=endpoint, name="e2e", response_time=record.e2e * 1e3,
                    response_length=record.output_tokens, exception=exc, context={})
        if record.ttft is not None:
            events_fire(request_type=endpoint, name="ttft", response_time=record.ttft * 1e3,
                        response_length=0, exception=None, context={})
        self._maybe_quit()
