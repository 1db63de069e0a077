"""lm-evaluation-harness both ways on the tiny servable hybrid: a local task through lm-eval's `hf` model
(the checkpoint loaded with trust_remote_code) and through its `local-completions` model against a real
`hybrid serve` on 127.0.0.1 (log-likelihoods via echo + logprobs, token ids sent, tokenizer read locally).
The two must agree per request up to bf16 serving noise.

The server is the session's (conftest.py); the lm-eval runs take seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("vllm")

from distill.cli import main as hybrid  # noqa: E402
from distill.eval_harness import ServerTarget, checkpoint_model_args  # noqa: E402
from distill.eval_results import EvalReport  # noqa: E402
from tests.conftest import API_KEY, MAX_MODEL_LEN, MODEL  # noqa: E402
from tests.lm_eval_tasks import write_choice_task  # noqa: E402

BF16_LOGLIK_TOLERANCE = 0.25  # nats per request (a few tokens, each within bf16 noise of the fp32 model)


@pytest.fixture(scope="module")
def eval_server(server) -> str:
    """The session's `hybrid serve` of the tiny hybrid (conftest.py)."""
    return server["base"]


def per_request_logliks(model: str, model_args: dict, task: Path) -> dict[tuple[int, int], float]:
    """{(doc, choice): log-likelihood} from lm-eval's logged samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[str(task)],
                                      task_manager=TaskManager(include_defaults=False), log_samples=True)
    out = {}
    for sample in results["samples"]["tiny_choice"]:
        for choice, resp in enumerate(sample["resps"]):
            out[(sample["doc_id"], choice)] = float(resp[0][0])
    return out


def test_lm_eval_hf_and_local_completions_agree_on_a_real_server(eval_server, served_hybrid, tmp_path, one_thread):
    server = eval_server
    task = write_choice_task(tmp_path / "task")
    out = tmp_path / "out"
    # through the CLI: the server row (model name found at /v1/models) beside the checkpoint itself
    assert hybrid(["eval", f"local={served_hybrid}", "--tasks", str(task), "--server", server,
                   "--server-tokenizer", str(served_hybrid), "--api-key", API_KEY, "--server-max-length",
                   str(MAX_MODEL_LEN), "--device", "cpu", "--out", str(out)]) == 0
    report = EvalReport.load(out / "results.json")
    local, served = {m.name: m for m in report.models}["local"], {m.name: m for m in report.models}[f"server:{MODEL}"]
    assert served.role == "server" and set(served.lm_eval) == set(local.lm_eval) == {"tiny_choice"}
    assert API_KEY not in (out / "results.json").read_text()

    # per request: the server's echo + logprobs log-likelihoods against the fp32 transformers model
    target = ServerTarget(server, MODEL, str(served_hybrid), API_KEY, MAX_MODEL_LEN)
    via_server = per_request_logliks("local-completions", target.model_args(), task)
    via_hf = per_request_logliks("hf", checkpoint_model_args(str(served_hybrid), "cpu"), task)
    assert set(via_server) == set(via_hf) and len(via_hf) == 8
    for key, expected in via_hf.items():
        assert via_server[key] == pytest.approx(expected, abs=BF16_LOGLIK_TOLERANCE), key
    spread = max(via_hf.values()) - min(via_hf.values())
    assert spread > 4 * BF16_LOGLIK_TOLERANCE  # the requests differ far more than the tolerance
