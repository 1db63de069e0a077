"""Fuzz a running server through its own OpenAPI schema (schemathesis + hypothesis), counting answers.

    hybrid bench fuzz http://127.0.0.1:8000 --api-key KEY --examples 200

For every operation in the server's /openapi.json, schemathesis generates requests that fit the
schema ("positive") and requests that break it ("negative"); each one is sent once, with the key.
The server passes when no answer is a 5xx and, afterwards, it is still healthy and still completes a
prompt. Target only servers you started yourself on loopback: a fuzz run sends thousands of requests.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

MODES = ("positive", "negative")
REQUEST_TIMEOUT_S = 300


@dataclass
class FuzzResult:
    base_url: str
    examples_per_operation: int
    seed: int
    requests: int = 0
    seconds: float = 0.0
    by_status: dict[int, int] = field(default_factory=dict)
    by_operation: dict[str, int] = field(default_factory=dict)
    server_errors: list[dict] = field(default_factory=list)  # the first few 5xx: method, path, body, answer
    alive_after: bool = False

    @property
    def passed(self) -> bool:
        return not self.server_errors and self.alive_after

    def summary(self) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.by_status.items()))
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: {self.requests} requests in {self.seconds:.0f} s over {len(self.by_operation)} operations "
                f"({statuses}); 5xx: {sum(n for c, n in self.by_status.items() if c >= 500)}; "
                f"server alive after: {self.alive_after}")


def fuzz(base_url: str, api_key: str | None, examples_per_operation: int, seed: int = 0,
         model: str | None = None, keep_errors: int = 10) -> FuzzResult:
    """Send `examples_per_operation` generated requests per operation and mode; never raises on answers."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=headers, timeout=30)
    result = FuzzResult(base_url, examples_per_operation, seed)
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    for operation in (op.ok() for op in schema.get_all_operations()):
        name = f"{operation.method.upper()} {operation.path}"
        for mode in MODES:

            @hypothesis_seed(seed)
            @settings(max_examples=examples_per_operation, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
            def send(case) -> None:
                response = case.call(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S)
                statuses[response.status_code] += 1
                result.by_operation[name] = result.by_operation.get(name, 0) + 1
                if response.status_code >= 500 and len(result.server_errors) < keep_errors:
                    result.server_errors.append({
                        "operation": name, "mode": mode, "status": response.status_code,
                        "body": _jsonable(case.body), "query": _jsonable(case.query), "answer": response.text[:500],
                    })

            try:
                send()
            except Unsatisfiable:  # nothing breaks the schema of an operation without inputs (GET /health)
                pass
    result.seconds = time.monotonic() - started
    result.by_status = dict(statuses)
    result.requests = sum(statuses.values())
    result.alive_after = still_serving(base_url, headers, model)
    return result


def still_serving(base_url: str, headers: dict[str, str], model: str | None) -> bool:
    """/health answers 200 and a two-token completion comes back."""
    with httpx.Client(base_url=base_url, headers=headers, timeout=120, trust_env=False) as http:
        try:
            if http.get("/health").status_code != 200:
                return False
            model = model or http.get("/v1/models").json()["data"][0]["id"]
            answer = http.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2})
            return answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        except httpx.HTTPError:
            return False


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)[:500]


def result_json(result: FuzzResult) -> str:
    return json.dumps({**asdict(result), "passed": result.passed}, indent=2)
