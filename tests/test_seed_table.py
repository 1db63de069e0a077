"""bench/seed_table.py: `hybrid eval` results of several seeds, grouped per hybrid, read from real JSON files."""

from __future__ import annotations

import json

import pytest

from bench.seed_table import main
from distill.eval_results import EvalReport, HeldoutScore, ModelReport, RecallScore


def run_results(path, seed: int, kl: float, exact: float, layers=(1, 5), tag: str = "") -> None:
    def model(name, kl_value, exact_value, softmax):
        return ModelReport(name=name, path=f"/runs/{name}", role="model" if softmax else "teacher",
                           softmax_layers=softmax, heldout=HeldoutScore(kl_value, 20.0 + kl_value, 4096, 1024),
                           recall=[RecallScore("passkey", 512, 100, exact_value, -1.0, -1.0 - 10 * exact_value)])

    report = EvalReport(date="2026-12-05", device="cpu", command="hybrid eval", settings={}, models=[
        model("teacher", 0.0, 1.0, None), model(f"ga-s2-k2-s{seed}{tag}", kl, exact, list(layers))])
    report.save(path)


def test_seeds_of_one_hybrid_become_one_row_with_mean_and_range(tmp_path):
    run_results(tmp_path / "a.json", 0, kl=0.10, exact=0.70)
    run_results(tmp_path / "b.json", 1, kl=0.14, exact=0.90)
    out = tmp_path / "seeds.md"
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert set(numbers) == {"teacher", "ga-s2-k2"}
    assert numbers["ga-s2-k2"]["seeds"] == ["0", "1"]
    assert numbers["ga-s2-k2"]["kl"]["mean"] == pytest.approx(0.12)
    assert (numbers["ga-s2-k2"]["passkey@512"]["min"], numbers["ga-s2-k2"]["passkey@512"]["max"]) == (0.70, 0.90)
    assert numbers["ga-s2-k2"]["passkey@512 delta"]["mean"] == pytest.approx(8.0)
    table = out.read_text()
    assert "| ga-s2-k2 | 1,5 | 0,1 | 0.1200 (0.1000–0.1400) |" in table
    assert "| teacher | all | — (2 runs) | 0.0000 |" in table  # the same teacher twice: one value, no range


def test_a_seed_that_kept_other_layers_is_refused(tmp_path, capsys):
    run_results(tmp_path / "a.json", 0, kl=0.10, exact=0.70)
    run_results(tmp_path / "b.json", 1, kl=0.14, exact=0.90, layers=(2, 5))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert "ga-s2-k2-s1 keeps softmax layers [2, 5]" in capsys.readouterr().err


def test_the_seed_of_a_tagged_run_is_found_before_its_tag(tmp_path):
    run_results(tmp_path / "a.json", 0, kl=0.10, exact=0.70, tag="-4k-lr2")
    run_results(tmp_path / "b.json", 1, kl=0.14, exact=0.90, tag="-4k-lr2")
    out = tmp_path / "seeds.md"
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert set(numbers) == {"teacher", "ga-s2-k2-4k-lr2"}  # the -s2 of the selector's name is not a seed
    assert numbers["ga-s2-k2-4k-lr2"]["seeds"] == ["0", "1"]


def test_heldout_numbers_of_different_texts_are_never_averaged(tmp_path):
    run_results(tmp_path / "a.json", 0, kl=0.10, exact=0.70)
    run_results(tmp_path / "b.json", 1, kl=0.14, exact=0.90)
    later = EvalReport.load(tmp_path / "b.json")  # the same hybrid scored on another held-out text
    later.models[0].heldout = HeldoutScore(0.0, 30.0, 4096, 1024)
    later.save(tmp_path / "b.json")
    out = tmp_path / "seeds.md"
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    numbers = json.loads(out.with_suffix(".json").read_text())["ga-s2-k2"]
    assert "kl" not in numbers
    assert numbers["kl on A"]["values"] == [0.10] and numbers["kl on B"]["values"] == [0.14]
    assert numbers["passkey@512"]["values"] == [0.70, 0.90]  # recall prompts do not come from the held-out text
    table = out.read_text()
    assert "| ga-s2-k2 | 1,5 | 0,1 | 0.1000 on A<br>0.1400 on B |" in table
    assert "- A: the teacher's perplexity 20.00" in table and "- B: the teacher's perplexity 30.00" in table
