"""bench/selection_report: the selector table from ranking files, selection wall times and `hybrid eval` JSON."""

from __future__ import annotations

import json

import pytest

from bench.selection_report import main
from distill.selection import ranking_from_scores


def _model(name: str, kl: float, exact: float) -> dict:
    return {"name": name, "heldout": {"kl": kl},
            "recall": [{"task": "passkey", "context": 512, "exact": exact, "delta": 10 * exact}]}


def test_selector_table_compares_with_ga_s2_and_reads_costs(tmp_path):
    ga_s2 = ranking_from_scores("ga-s2", {i: float(i) for i in range(6)}, True, "kl",
                                details={"candidate_tokens": 1000})
    cheap = ranking_from_scores("kl-restore", {0: 0.1, 1: 0.3, 2: 0.2, 3: 0.4, 4: 0.5, 5: 0.6}, True, "kl",
                                details={"candidate_tokens": 0})
    ga_s2.save(tmp_path / "ranking-ga-s2.json")
    cheap.save(tmp_path / "ranking-kl-restore.json")
    (tmp_path / "metrics-rank-ga-s2.json").write_text(json.dumps({"seconds": {"layer selection (ga-s2)": 120.0}}))
    (tmp_path / "results.json").write_text(json.dumps({"models": [
        {"name": "teacher", "heldout": {"kl": 0.0}, "recall": []},
        _model("ga-s2-k2-s0", 0.14, 0.9), _model("uniform-k2-s0", 0.2, 0.3), _model("ga-s2-k2-s1", 0.15, 0.8)]}))
    assert main([str(tmp_path), "--k", "2"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in (tmp_path / "selection.md").read_text().splitlines()[2:]}
    assert set(rows) == {"ga-s2", "kl-restore", "uniform"}
    assert "| 0,1 | 1.00 | 1.00 | 6,000 | 120 | 0.1400 | 0.90 (+9.0) |" in rows["ga-s2"]  # first seed only
    assert "| 0,2 | 0.94 | 0.33 | 0 | — | not trained | — |" in rows["kl-restore"]
    assert "| 0.2000 | 0.30 (+3.0) |" in rows["uniform"]
    assert (tmp_path / "selection.png").stat().st_size > 0


def test_more_results_files_fill_the_rows_the_first_lacks_and_say_when_the_text_differs(tmp_path):
    ga_s2 = ranking_from_scores("ga-s2", {i: float(i) for i in range(6)}, True, "kl")
    probe = ranking_from_scores("ablation", {i: float(-i) for i in range(6)}, False, "recall drop")
    ga_s2.save(tmp_path / "ranking-ga-s2.json")
    probe.save(tmp_path / "ranking-ablation.json")
    teacher = {"name": "teacher", "heldout": {"kl": 0.0, "perplexity": 26.16}, "recall": []}
    (tmp_path / "results.json").write_text(json.dumps({"models": [teacher, _model("ga-s2-k2-s0", 0.14, 0.9)]}))
    (tmp_path / "more").mkdir()
    other_text = {**teacher, "heldout": {"kl": 0.0, "perplexity": 21.88}}
    (tmp_path / "more" / "results.json").write_text(json.dumps({"models": [
        other_text, _model("ga-s2-k2-s2", 0.13, 0.5), _model("ablation-k2-s2", 0.16, 1.0)]}))
    assert main([str(tmp_path), "--k", "2", "--results", "results.json", "more/results.json"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in (tmp_path / "selection.md").read_text().splitlines()[2:]}
    assert "| 0.1400 | 0.90 (+9.0) |" in rows["ga-s2"]  # the first file's
    assert "| 0.1600 on another text (teacher perplexity 21.88) | 1.00 (+10.0) |" in rows["ablation"]


def test_a_ranking_kept_elsewhere_joins_under_its_own_name(tmp_path, capsys):
    ga_s2 = ranking_from_scores("ga-s2", {i: float(i) for i in range(6)}, True, "kl")
    on_passkey = ranking_from_scores("ablation", {i: float(i % 3) for i in range(6)}, False, "passkey drop")
    ga_s2.save(tmp_path / "ranking-ga-s2.json")
    (tmp_path / "probe").mkdir()
    on_passkey.save(tmp_path / "probe" / "ranking.json")
    (tmp_path / "results.json").write_text(json.dumps({"models": [
        _model("ga-s2-k2-s0", 0.14, 0.9), _model("pk-ablation-k2-s2", 0.15, 1.0)]}))
    assert main([str(tmp_path), "--k", "2", "--ranking", "pk-ablation=probe/ranking.json"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in (tmp_path / "selection.md").read_text().splitlines()[2:]}
    assert set(rows) == {"ga-s2", "pk-ablation", "uniform"}
    assert "| 2,5 |" in rows["pk-ablation"] and "| 0.1500 | 1.00 (+10.0) |" in rows["pk-ablation"]

    with pytest.raises(SystemExit):
        main([str(tmp_path), "--ranking", "probe/ranking.json"])
    assert "expected NAME=FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="already has a ranking named ga-s2"):
        main([str(tmp_path), "--ranking", "ga-s2=probe/ranking.json"])
