"""bench/quality_summary.py: every hybrid of an experiment directory in one table, from real files on disk."""

from __future__ import annotations

import json

import pytest

from bench.quality_summary import main
from distill.eval_results import EvalReport, HeldoutScore, ModelReport, RecallScore


def model(name: str, *, teacher_ppl: float, kl: float | None = None, recall=(), lm_eval=None) -> ModelReport:
    softmax = None if name == "teacher" else [1, 5]
    heldout = None if kl is None else HeldoutScore(kl, teacher_ppl + 10 * kl, 4096, 1024)
    return ModelReport(name=name, path=f"/runs/{name}", role="teacher" if softmax is None else "model",
                       softmax_layers=softmax, num_layers=8, heldout=heldout,
                       recall=[RecallScore(task, context, 100, exact, -1.0, -1.0 - gain)
                               for task, context, exact, gain in recall],
                       lm_eval=lm_eval or {})


def save(path, *models: ModelReport, device: str = "NVIDIA H100 80GB HBM3") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    EvalReport(date="2026-12-06", device=device, command="hybrid eval", settings={}, models=list(models)).save(path)


def training_logs(run_dir, name: str, tokens: int, seconds: float) -> None:
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    steps = [{"step": s, "tokens": tokens * s // 2} for s in (1, 2)]
    (run_dir / "logs" / f"log-hybrid-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (run_dir / f"metrics-hybrid-{name}.json").write_text(json.dumps({"seconds": {"stage 2 (distill)": seconds}}))


def test_every_hybrid_of_every_run_in_one_table_grouped_by_held_out_text(tmp_path):
    root = tmp_path / "experiment"
    # run A: passkey in one file, associative recall of the same models in another
    save(root / "results.json",
         model("teacher", teacher_ppl=26.16, kl=0.0, recall=[("passkey", 512, 1.0, 15.0)]),
         model("ga-s2-k2-s0", teacher_ppl=26.16, kl=0.14, recall=[("passkey", 512, 0.7, 13.0)]))
    save(root / "results_recall.json",
         model("teacher", teacher_ppl=26.16, recall=[("assoc", 512, 0.6, 9.0)]),
         model("ga-s2-k2-s0", teacher_ppl=26.16, recall=[("assoc", 512, 0.2, 8.0)]))
    training_logs(root, "ga-s2-k2-s0", tokens=5_900_000, seconds=120.0)
    # run B, other held-out text (another teacher perplexity), an lm-eval task, no training logs
    save(root / "later" / "results.json",
         model("teacher", teacher_ppl=21.88, kl=0.0, recall=[("passkey", 512, 1.0, 15.0)],
               lm_eval={"recall_cloze": {"acc,none": 0.30, "acc_stderr,none": 0.05}}),
         model("ga-s2-k2-s0-4k", teacher_ppl=21.88, kl=0.11, recall=[("passkey", 512, 0.9, 14.0)],
               lm_eval={"recall_cloze": {"acc,none": 0.21, "acc_stderr,none": 0.04}}),
         device="NVIDIA H200")
    out = tmp_path / "summary.md"
    assert main([str(root), "--out", str(out)]) == 0

    groups = json.loads(out.with_suffix(".json").read_text())
    assert [g["teacher_perplexity"] for g in groups] == [26.16, 21.88]
    first = {m["name"]: m for m in groups[0]["models"]}
    assert set(first) == {"teacher", "ga-s2-k2-s0"}  # one row per model although two files measured it
    assert set(first["ga-s2-k2-s0"]["recall"]) == {"passkey@512", "assoc@512"}
    assert first["ga-s2-k2-s0"]["recall"]["assoc@512"] == {"exact": 0.2, "delta": pytest.approx(8.0)}
    assert (first["ga-s2-k2-s0"]["stage2_tokens"], first["ga-s2-k2-s0"]["stage2_seconds"]) == (5_900_000, 120.0)
    later = {m["name"]: m for m in groups[1]["models"]}
    assert later["ga-s2-k2-s0-4k"]["stage2_tokens"] is None and later["ga-s2-k2-s0-4k"]["device"] == "H200"

    table = out.read_text()
    assert "| . | 2026-12-06, H100 | ga-s2-k2-s0 | 2/8: 1,5 | 5.9M | 2.0 | 0.1400 | 27.56 | 0.20 [8.0] | 0.70 [13.0] |" in table
    assert "| later | 2026-12-06, H200 | ga-s2-k2-s0-4k | 2/8: 1,5 | — | — | 0.1100 | 22.98 | 0.90 [14.0] | 0.210 |" in table
    assert "teacher's perplexity is 26.16" in table and "teacher's perplexity is 21.88" in table

    # the budget plot: every hybrid with a known Stage-2 budget (run B kept no logs), and the picture itself
    from bench.quality_summary import budget_points, group_rows, load_rows

    points = budget_points(group_rows(load_rows(root)), "passkey", 512)
    assert [(p.selector, p.label, p.stage2_tokens, p.kl, p.exact) for p in points] == [
        ("ga-s2-k2", "top", 5_900_000, 0.14, 0.7)]
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_a_json_file_that_is_not_an_eval_result_is_named(tmp_path, capsys):
    (tmp_path / "results-old.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert "results-old.json: not a `hybrid eval` results file" in capsys.readouterr().err

def test_stage2_time_of_a_resumed_run_counts_every_attempt(tmp_path):
    """The metrics file holds the time of the attempt that finished only; the log's clocks run across resumes."""
    from bench.quality_summary import training_cost

    training_logs(tmp_path, "older", tokens=1000, seconds=368.0)  # a log without wall_s: the metrics' figure...
    assert training_cost(tmp_path, "older") == (1000, 368.0)
    log = tmp_path / "logs" / "log-hybrid-older.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 3, "tokens": 1500, "elapsed_s": 798.5}) + "\n")
    assert training_cost(tmp_path, "older") == (1500, 798.5)  # ...unless the resumed steps' own clock is longer
    log.write_text(log.read_text() + json.dumps({"step": 4, "tokens": 2000, "elapsed_s": 800.0, "wall_s": 845.0}) + "\n")
    assert training_cost(tmp_path, "older") == (2000, 845.0)


def test_a_continued_hybrid_counts_the_tokens_and_time_of_every_stage2_it_had(tmp_path):
    """`hybrid distill --from` starts a new log; the checkpoint's provenance (recorded by `hybrid eval`) has the
    whole count. The time is the parents' too where their logs (named PARENT-TAG by the script) add up to it."""
    from bench.quality_summary import training_cost

    training_logs(tmp_path, "ga-s2-k8-more", tokens=1000, seconds=60.0)
    continued = model("ga-s2-k8-more", teacher_ppl=20.0, kl=0.1)
    continued.trained_tokens = {"stage1": 500, "stage2": 3000}
    assert training_cost(tmp_path, "ga-s2-k8-more", continued) == (3000, 60.0)  # no parent log: this Stage 2's time
    assert training_cost(tmp_path, "ga-s2-k8-more", model("m", teacher_ppl=20.0, kl=0.1)) == (1000, 60.0)
    training_logs(tmp_path, "ga-s2-k8", tokens=1500, seconds=90.0)  # a parent whose tokens do not add up: ignored
    assert training_cost(tmp_path, "ga-s2-k8-more", continued) == (3000, 60.0)
    training_logs(tmp_path, "ga-s2-k8", tokens=2000, seconds=90.0)
    assert training_cost(tmp_path, "ga-s2-k8-more", continued) == (3000, 150.0)
    save(tmp_path / "results.json", continued)  # the field survives the results file
    assert EvalReport.load(tmp_path / "results.json").models[0].trained_tokens == {"stage1": 500, "stage2": 3000}


def test_exact_match_by_needle_depth_reaches_the_summary(tmp_path):
    hybrid = model("ga-s2-k2-s0", teacher_ppl=20.0, kl=0.1, recall=[("passkey", 2048, 0.5, 12.0)])
    hybrid.recall[0].depth_samples, hybrid.recall[0].depth_hits = [2, 2, 0, 4], [0, 1, 0, 3]
    save(tmp_path / "run" / "results.json", model("teacher", teacher_ppl=20.0, kl=0.0), hybrid)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "summary.md")]) == 0
    cell = json.loads((tmp_path / "summary.json").read_text())[0]["models"][1]["recall"]["passkey@2048"]
    assert cell["exact_by_depth"] == [0.0, 0.5, None, 0.75]
