"""LLM serving metrics from per-request records: TTFT, TPOT, ITL, E2E, throughput, errors.

One `RequestRecord` per request (written by the locustfile as one JSON line). Percentiles are
computed here, from the raw records, with linear interpolation between order statistics (the same
rule as `numpy.percentile`'s default), not taken from locust's bucketed histograms.

Definitions (all times in seconds, measured at the client):
    TTFT  time from sending the request to receiving the first output token
    E2E   time from sending the request to receiving the last byte of the response
    TPOT  (E2E - TTFT) / (output_tokens - 1)      per request; undefined for 1-token outputs
    ITL   gaps between consecutive streamed chunks that carry output tokens (all requests pooled)
    output tokens/s = sum(output_tokens) / window,  requests/s = completed requests / window,
    where window = last end - first start over the records summarised (one closed-loop run).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PERCENTILES = (50, 90, 99)


CUT_OFF = "cut off at the run-time limit"  # the error of requests locust's run-time limit ended mid-flight


@dataclass
class RequestRecord:
    """What one request did, as seen by the client."""

    start: float  # wall-clock time.time() when the request was sent
    end: float  # wall-clock time when the response was complete (or failed)
    ttft: float | None  # seconds to the first output token; None if none arrived
    output_tokens: int  # from the server's usage block when it sends one, else counted chunks
    prompt_tokens: int | None = None  # from usage; None when the server does not report it
    itl: list[float] = field(default_factory=list)  # gaps between token-bearing chunks, seconds
    error: str | None = None  # None for success, else a short description
    endpoint: str = "completions"  # "completions" or "chat"
    tag: str = ""  # free label (run name, model, ...)
    # "stream" (timed token by token), "unary" (stream=false: one answer, TTFT = E2E) or "cancelled"
    # (the client hung up after the first token, on purpose); only streams enter TTFT/TPOT/ITL/E2E
    kind: str = "stream"

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None when it is undefined (failed, <= 1 token)."""
        if not self.ok or self.ttft is None or self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> RequestRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Distribution:
    """Summary of one latency metric, seconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(
            count=len(values),
            mean=sum(values) / len(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            max=max(values),
        )


@dataclass
class Summary:
    """Everything the report needs about one load run."""

    requests: int  # all records, failed ones included
    completed: int
    errors: int
    error_rate: float
    window_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    prompt_tokens_mean: float
    output_tokens_mean: float
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    error_kinds: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: Iterable[RequestRecord]) -> Summary:
    """Aggregate per-request records of one closed-loop run into the standard serving metrics."""
    records = list(records)
    ok = [r for r in records if r.ok]
    errors = [r for r in records if not r.ok]
    streams = [r for r in ok if r.kind == "stream"]
    if records:
        window = max(r.end for r in records) - min(r.start for r in records)
    else:
        window = 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    kinds: dict[str, int] = {}
    for r in errors:
        key = (r.error or "error").split(":")[0][:80]
        kinds[key] = kinds.get(key, 0) + 1
    return Summary(
        requests=len(records),
        completed=len(ok),
        errors=len(errors),
        error_rate=len(errors) / len(records) if records else 0.0,
        window_s=window,
        requests_per_s=len(ok) / window if window > 0 else 0.0,
        output_tokens=out_tokens,
        output_tokens_per_s=out_tokens / window if window > 0 else 0.0,
        prompt_tokens_mean=sum(prompt) / len(prompt) if prompt else math.nan,
        output_tokens_mean=out_tokens / len(ok) if ok else math.nan,
        ttft=Distribution.of([r.ttft for r in streams if r.ttft is not None]),
        tpot=Distribution.of([t for r in streams if (t := r.tpot) is not None]),
        itl=Distribution.of([gap for r in streams for gap in r.itl]),
        e2e=Distribution.of([r.e2e for r in streams]),
        error_kinds=kinds,
    )


def read_records(path: str | Path) -> list[RequestRecord]:
    """Read a JSONL file of records (blank lines and a truncated last line are skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(RequestRecord.from_dict(json.loads(line)))
        except json.JSONDecodeError:
            continue  # a writer killed mid-line (locust stopped at its run time)
    return records


def write_records(records: Iterable[RequestRecord], path: str | Path) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(r.to_json() + "\n")


def format_summary(s: Summary) -> str:
    """A few human-readable lines (milliseconds for latencies)."""

    def ms(d: Distribution) -> str:
        return f"p50 {d.p50 * 1e3:8.1f}  p90 {d.p90 * 1e3:8.1f}  p99 {d.p99 * 1e3:8.1f} ms  (n={d.count})"

    return "\n".join(
        [
            f"requests {s.requests} ({s.completed} ok, {s.errors} errors) over {s.window_s:.1f} s: "
            f"{s.requests_per_s:.2f} req/s, {s.output_tokens_per_s:.1f} output tok/s",
            f"  TTFT {ms(s.ttft)}",
            f"  TPOT {ms(s.tpot)}",
            f"  ITL  {ms(s.itl)}",
            f"  E2E  {ms(s.e2e)}",
        ]
    )


# ----------------------------------------------------------------------------------------------
# workload shapes: prompt and output length distributions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, parsed from a short spec:

        "512"                 always 512
        "uniform:128:1024"    uniform integer in [128, 1024]
        "normal:512:64"       normal(mean 512, std 64), rounded, clipped to >= 1
        "choice:128,512,2048" one of the values, equally likely
    """

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        text = str(spec).strip().lower()
        try:
            if text.isdigit():
                value = int(text)
                if value < 1:
                    raise ValueError
                return cls("fixed", (value,))
            kind, _, rest = text.partition(":")
            if kind == "uniform":
                lo, hi = (int(x) for x in rest.split(":"))
                if not 1 <= lo <= hi:
                    raise ValueError
                return cls("uniform", (lo, hi))
            if kind == "normal":
                mean, std = (float(x) for x in rest.split(":"))
                if mean < 1 or std < 0:
                    raise ValueError
                return cls("normal", (mean, std))
            if kind == "choice":
                values = tuple(int(x) for x in rest.split(",") if x)
                if not values or min(values) < 1:
                    raise ValueError
                return cls("choice", values)
        except ValueError:
            pass
        raise ValueError(
            f"bad length spec {spec!r}: use N, uniform:LO:HI, normal:MEAN:STD or choice:A,B,C (all >= 1)"
        )

    def sample(self, rng) -> int:
        """One length; rng is a `random.Random`."""
        if self.kind == "fixed":
            return int(self.params[0])
        if self.kind == "uniform":
            return rng.randint(int(self.params[0]), int(self.params[1]))
        if self.kind == "normal":
            return max(1, round(rng.gauss(self.params[0], self.params[1])))
        return int(rng.choice(self.params))

    @property
    def max(self) -> int | None:
        """The largest value it can produce (None for the unbounded normal)."""
        if self.kind == "normal":
            return None
        return int(max(self.params))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.params[0]))
        sep = "," if self.kind == "choice" else ":"
        return f"{self.kind}:" + sep.join(str(int(p)) if float(p).is_integer() else str(p) for p in self.params)


# Common English words that are one token each (with a leading space) in GPT-2/Llama-style BPE
# vocabularies, so a text prompt of N words is roughly N tokens; the server's usage block gives the
# exact count, which is what gets recorded.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this which had not are but have "
    "one were all their there been has more when will would who so no out up into than them can only other "
    "new some time could these two may first then do any like my now over such our man me even most made "
    "after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here both "
    "between life being under never day same another know while last might us great old year off come since "
    "against go came right used take three"
).split()


def text_prompt(n_words: int, rng) -> str:
    """A random sentence of n_words common words (random, so no two requests share a cached prefix)."""
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def token_prompt(n_tokens: int, rng, low: int = 1000, high: int = 20000) -> list[int]:
    """Random token ids for the completions API's token-array prompt (exact prompt length)."""
    return [rng.randrange(low, high) for _ in range(n_tokens)]


# ----------------------------------------------------------------------------------------------
# stream timing: from server-sent events to a RequestRecord
# ----------------------------------------------------------------------------------------------

DONE = "[DONE]"


def parse_sse_line(line: bytes | str) -> dict | str | None:
    """One line of an OpenAI-style event stream: a JSON payload dict, DONE, or None (comment/blank)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == DONE:
        return DONE
    return json.loads(data)


def iter_stream_lines(read1, size: int = 65536):
    """Lines of a streamed HTTP body as soon as they arrive.

    read1(n) must return whatever bytes are available (at most n; b"" at the end), like urllib3's
    `response.raw.read1`. (requests' `iter_lines()` reads fixed 512-byte blocks, which holds back
    small SSE events on bodies that are not chunk-encoded and would fake near-zero inter-token gaps.)
    """
    buf = b""
    while True:
        data = read1(size)
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        yield from lines
    if buf:
        yield buf


def chunk_text(payload: dict) -> str:
    """The generated text a streamed chunk carries (completions `text` or chat `delta.content`)."""
    out = []
    for choice in payload.get("choices") or []:
        if "text" in choice and choice["text"]:
            out.append(choice["text"])
        delta = choice.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            if delta.get(key):
                out.append(delta[key])
    return "".join(out)


class StreamTimer:
    """Timestamps of one streamed request; `finish` turns them into a RequestRecord.

    A chunk counts as a token event when it carries generated text. The output token count is the
    server's `usage.completion_tokens` when the stream includes usage, else the number of token events.
    """

    def __init__(self, start: float, endpoint: str = "completions", tag: str = "", kind: str = "stream"):
        self.start = start
        self.endpoint, self.tag, self.kind = endpoint, tag, kind
        self.token_times: list[float] = []
        self.usage: dict | None = None

    def on_payload(self, now: float, payload: dict) -> None:
        if payload.get("usage"):
            self.usage = payload["usage"]
        if chunk_text(payload) or (self.kind == "unary" and payload.get("choices")):  # one whole answer
            self.token_times.append(now)

    def finish(self, end: float, error: str | None = None) -> RequestRecord:
        times = self.token_times
        usage = self.usage or {}
        if error is None and not times and not usage.get("completion_tokens"):
            error = "no output tokens in the stream"  # (tokens whose text is empty, e.g. partial UTF-8, still count)
        return RequestRecord(
            start=self.start,
            end=end,
            ttft=times[0] - self.start if times else None,
            output_tokens=int(usage.get("completion_tokens") or len(times)),
            prompt_tokens=usage.get("prompt_tokens"),
            itl=[b - a for a, b in zip(times, times[1:])],
            error=error,
            endpoint=self.endpoint,
            tag=self.tag,
            kind=self.kind,
        )


def main(argv: list[str] | None = None) -> int:
    """python -m bench.metrics RECORDS.jsonl [...]: print the summary of each file (or --json)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.metrics", description=main.__doc__)
    p.add_argument("records", nargs="+", type=Path)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for path in args.records:
        if not path.is_file():
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
        s = summarize(read_records(path))
        print(json.dumps(s.to_dict(), indent=2) if args.json else f"{path}:\n{format_summary(s)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
