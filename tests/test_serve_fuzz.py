"""A short fuzz run against the session's real server (conftest.py) through its own OpenAPI schema:
schemathesis generates schema-valid and schema-breaking requests for every served route (bench/fuzz.py).
No answer may be a 5xx, and the server must still complete a prompt afterwards. The long run and its
numbers: serve/README.md ("Robustness")."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("schemathesis")

from bench.fuzz import fuzz  # noqa: E402
from tests.conftest import API_KEY, MODEL  # noqa: E402

EXAMPLES_PER_OPERATION = 20  # x 2 modes x 9 operations: ~170 requests (hypothesis drops repeats), under a minute


def test_fuzzing_the_openapi_schema_finds_no_server_error(server):
    result = fuzz(server["base"], API_KEY, EXAMPLES_PER_OPERATION, seed=0, model=MODEL)
    print(result.summary())
    assert not result.server_errors, result.server_errors
    assert result.alive_after and server["proc"].poll() is None
    assert {"POST /v1/completions", "POST /v1/chat/completions"} <= set(result.by_operation)
    assert result.requests >= 4 * EXAMPLES_PER_OPERATION  # generation ran: both modes on the two big routes
