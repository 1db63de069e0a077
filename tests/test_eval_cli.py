"""`hybrid eval` end to end on real files: a tiny teacher, a hybrid made by `hybrid init`, a local lm-eval task;
the CLI in-process and as a process that is interrupted with Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from distill.cli import main as hybrid
from distill.eval_results import EvalReport
from tests.lm_eval_tasks import write_choice_task
from tests.tiny_models import save_teacher, write_word_corpus

WORDS = "alpha beta gamma delta hello world"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    teacher = save_teacher(root / "teacher", "llama", num_layers=4)
    assert hybrid(["init", "--teacher", str(teacher), "--ratio", "0.5", "--out", str(root / "hyb")]) == 0
    corpus = write_word_corpus(root / "val.md", WORDS, docs=200, words_per_doc=80)
    return {"root": root, "teacher": teacher, "hybrid": root / "hyb", "corpus": corpus}


def test_eval_writes_table_json_and_plot_for_teacher_and_hybrid(files, tmp_path, capsys, one_thread):
    task = write_choice_task(tmp_path / "task")
    out = tmp_path / "out"
    argv = ["eval", f"init={files['hybrid']}", "--teacher", str(files["teacher"]), "--data", str(files["corpus"]),
            "--seq-len", "64", "--eval-tokens", "256", "--tasks", "heldout", "passkey", "vartrack", str(task),
            "--lengths", "256", "400", "--samples", "3", "--device", "cpu", "--out", str(out)]
    assert hybrid(argv) == 0
    report = EvalReport.load(out / "results.json")
    assert [m.name for m in report.models] == ["teacher", "init"] and not report.interrupted
    teacher, hyb = report.models
    assert teacher.softmax_layers is None and hyb.softmax_layers == [1, 3] and hyb.num_layers == 4
    assert teacher.heldout.kl == pytest.approx(0.0, abs=1e-5)  # the teacher against itself
    assert hyb.heldout.kl > 1e-4 and hyb.heldout.tokens == 256
    for m in report.models:
        assert 1 < m.heldout.perplexity < 2 * 384  # a random model is near uniform over the 384-token vocabulary
        assert [(r.task, r.context) for r in m.recall] == [("passkey", 256), ("passkey", 400),
                                                         ("vartrack", 256), ("vartrack", 400)]
        for r in m.recall:
            assert r.samples == 3 and 0 <= r.exact <= 1 and r.logprob < 0 and math.isfinite(r.delta)
            assert sum(r.depth_samples) == 3 and sum(r.depth_hits) == round(r.exact * 3)
        assert set(m.lm_eval) == {"tiny_choice"} and 0 <= m.lm_eval["tiny_choice"]["acc,none"] <= 1
    table = (out / "results.md").read_text()
    assert "| init | 2/4: 1,3 |" in table and "passkey@400" in table and "tiny_choice acc" in table
    assert "## Where the misses are" in table and "| init | vartrack@400 |" in table
    assert "trained_tokens" in json.loads((out / "results.json").read_text())["models"][1]
    assert "| init | 2/4: 1,3 |" in capsys.readouterr().out
    assert (out / "results.png").stat().st_size > 20_000
    raw = json.loads((out / "results.json").read_text())
    assert raw["models"][1]["recall"][0]["delta"] == pytest.approx(hyb.recall[0].delta)


def test_teacher_comes_from_the_checkpoints_provenance(files, tmp_path, one_thread):
    out = tmp_path / "out"
    assert hybrid(["eval", str(files["hybrid"]), "--tasks", "passkey", "--lengths", "512", "1024", "--samples", "2",
                   "--device", "cpu", "--out", str(out)]) == 0
    report = EvalReport.load(out / "results.json")
    assert [m.name for m in report.models] == ["teacher", "hyb"]
    assert report.models[0].path == str(files["teacher"])
    # the tiny models' max_position_embeddings is 512: longer lengths are listed, not run
    assert report.models[1].skipped == {"passkey@1024": "longer than max_position_embeddings 512"}
    assert "Not measured: teacher: passkey@1024" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "needles"], "--tasks 'needles': expected one of heldout, passkey"),
        (["--tasks", "missing.yaml"], "--tasks missing.yaml: no such task file"),
        (["--needles", "passkey=3"], "--needles 'passkey=3': expected KIND=N"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--lengths", "32"], "--lengths: 32 is too short"),
        (["--tasks", "passkey", "--server", "http://127.0.0.1:9"], "--server answers lm-eval tasks only"),
    ],
)
def test_bad_input_is_one_clear_error(files, tmp_path, capsys, argv, message):
    code = hybrid(["eval", str(files["hybrid"]), "--out", str(tmp_path / "out"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_checkpoint_and_missing_teacher_are_clear_errors(files, tmp_path, capsys):
    assert hybrid(["eval", str(tmp_path / "nope"), "--teacher", str(files["teacher"]), "--tasks", "passkey",
                   "--out", str(tmp_path / "o1")]) == 2
    assert f"{tmp_path / 'nope'}: no config.json" in capsys.readouterr().err
    plain = save_teacher(tmp_path / "plain", "llama", num_layers=2)  # no provenance: no teacher to find
    assert hybrid(["eval", str(plain), "--tasks", "heldout", "--out", str(tmp_path / "o2")]) == 2
    assert "held-out KL needs the teacher: pass --teacher" in capsys.readouterr().err


def test_ctrl_c_stops_cleanly_and_keeps_what_was_measured(files, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "distill.cli", "eval", str(files["hybrid"]), "--teacher", str(files["teacher"]),
           "--tasks", "passkey", "--lengths", "256", "512", "--samples", "5000", "--batch-tokens", "256",
           "--device", "cpu", "--threads", "1", "--out", str(out)]
    # a runner started in the background (nohup, `cmd &`) ignores SIGINT, and the child would inherit that
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not (out / "results.json").is_file():  # written as soon as the teacher's row starts
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no results.json after 240 s"
            time.sleep(0.5)
        time.sleep(3)  # well inside the first (long) passkey task
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted: what was measured is in" in err
    assert "Traceback" not in err
    report = EvalReport.load(out / "results.json")
    assert report.interrupted and [m.name for m in report.models] == ["teacher"]
    assert report.models[0].recall == []  # the task in flight is not half-reported
    assert "**Interrupted**" in (out / "results.md").read_text()


def test_heldout_beyond_the_conversions_split_is_flagged(files, tmp_path, one_thread):
    """A demo-preset conversion held out 512 tokens of its --data; scoring 1024 may score trained-on text."""
    import shutil

    converted = shutil.copytree(files["hybrid"], tmp_path / "converted")
    config = json.loads((converted / "config.json").read_text())
    config["provenance"]["preset"] = "demo"
    (converted / "config.json").write_text(json.dumps(config))
    common = ["eval", str(converted), "--data", str(files["corpus"]), "--seq-len", "64", "--tasks", "heldout",
              "--device", "cpu"]
    assert hybrid([*common, "--eval-tokens", "1024", "--out", str(tmp_path / "wide")]) == 0
    flagged = EvalReport.load(tmp_path / "wide" / "results.json").models[1]
    assert len(flagged.warnings) == 1 and "held out 512 tokens" in flagged.warnings[0]
    assert "Warning (converted): converted with preset 'demo'" in (tmp_path / "wide" / "results.md").read_text()
    assert hybrid([*common, "--eval-tokens", "512", "--out", str(tmp_path / "inside")]) == 0
    assert EvalReport.load(tmp_path / "inside" / "results.json").models[1].warnings == []
