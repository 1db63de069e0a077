"""`hybrid convert` end to end in real processes: output, report, SIGKILL + rerun, errors before training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import save_teacher, write_word_corpus

LAYERS = 4
SETTINGS = [
    "eval_tokens=64", "eval_batch=2",
    "stage1.seq_len=32", "stage1.steps=30", "stage1.batch=2", "stage1.micro_batch=1", "stage1.save_every=1",
    "stage1.lr=0.01",
    "score.candidate.train.seq_len=32", "score.candidate.train.steps=2", "score.candidate.train.lr=0.001",
    "score.eval_batch=2",
    "stage2.train.seq_len=32", "stage2.train.steps=40", "stage2.train.save_every=1", "stage2.train.lr=0.001",
    "stage2.other_lr=0.0001", "stage2.min_doc_tokens=8",  # every document of the corpus is longer
    "stage2.copies.per_sequence=1", "stage2.copies.tokens=4", "stage2.copies.min_distance=8",  # resumed alike
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    # a bf16 teacher, as SmolLM2: the output is stored in bf16, while the work directory must keep float32
    # (a rerun that continued from bf16-rounded stage weights would not reproduce the uninterrupted run)
    save_teacher(root / "teacher", "llama", dtype=torch.bfloat16, num_layers=LAYERS, hidden=48, heads=4, kv_heads=2, seed=5)
    write_word_corpus(root / "corpus.md", "apple banana cherry grape lemon mango olive peach plum", docs=60, words_per_doc=60)
    environ = dict(os.environ, OMP_NUM_THREADS="1", HYBRID_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return root, environ


def command(root: Path, out: Path, data: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "distill.cli", "convert", "--teacher", str(root / "teacher"),
           "--data", data or str(root / "corpus.md"), "--ratio", "0.5", "--out", str(out), "--seed", "7"]
    for item in SETTINGS:
        cmd += ["--set", item]
    return cmd


def run(cmd, environ, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=300, **kw)


def log_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def killed_after_checkpoint(cmd, environ, stage: str, count: int) -> None:
    """Run `cmd`, SIGKILLed by itself right after writing its `count`th checkpoint of `stage`
    (tests/crash_after_checkpoint.py): the same kill on every machine, however loaded."""
    crashing = [sys.executable, "-m", "tests.crash_after_checkpoint", stage, "0", str(count), *cmd[3:]]
    result = run(crashing, environ)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


@pytest.fixture(scope="module")
def uninterrupted(env):
    root, environ = env
    out = root / "straight"
    result = run(command(root, out), environ)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_output_loads_and_report_lists_every_layer(uninterrupted):
    out = uninterrupted
    code = ("import distill, sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r});"
            "ids = t('apple banana', return_tensors='pt').input_ids;"
            "print(type(m).__name__, m.config.softmax_layers, m(ids).logits.shape[-1] == len(t))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("HybridForCausalLM") and result.stdout.strip().endswith("True")

    ranking = json.loads((out / "ranking.json").read_text())
    # the default selector: the reach layers (the teacher's far-needle recall, clipped one layer at a time) first
    assert ranking["selector"] == "ga-s2+reach"
    assert ranking["order"][:len(ranking["details"]["kept_for_reach"])] == ranking["details"]["kept_for_reach"]
    assert sorted(p.name for p in (out.parent / "straight.work" / "score" / "reach").iterdir()) == [
        f"layer_{layer:03d}.json" for layer in range(LAYERS)]
    chosen = sorted(ranking["order"][:2])
    config = json.loads((out / "config.json").read_text())
    assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == chosen
    report = (out / "report.md").read_text()
    for layer in range(LAYERS):
        score = ranking["scores"][str(layer)]
        row = f"| {layer} | {score:.5f} | {ranking['order'].index(layer) + 1} | {'yes' if layer in chosen else ''} |"
        assert row in report
    assert f"`{chosen}`" in report
    assert "training blocks from documents of at least 8 tokens" in report
    for png in ("layer_scores.png", "score_curves.png", "loss_curves.png", "memory.png"):
        assert (out / "plots" / png).stat().st_size > 1000
        assert f"plots/{png}" in report
    kl = json.loads((out / "metrics.json").read_text())["kl"]
    assert kl["stage 0 (chosen layers softmax)"] > kl["stage 1 (chosen layers softmax)"] > kl["stage 2"]
    assert config["provenance"]["stages"] == ["stage0_transfer", "stage1_align", "stage2_distill"]


def test_sigkill_and_rerun_gives_the_same_weights(env, uninterrupted):
    root, environ = env
    out = root / "killed"
    work = root / "killed.work"
    cmd = command(root, out)
    killed_after_checkpoint(cmd, environ, "stage1", 4)  # killed in Stage 1, at step 4 of 30
    assert not (work / "stage1" / "model").exists() and (work / "stage1" / "ckpt.pt").is_file()
    killed_after_checkpoint(cmd, environ, "candidates", 2)  # rerun, killed while scoring (after 2 of 4 candidates)
    assert (work / "stage1" / "model").is_dir() and not (work / "score" / "ranking.json").exists()
    killed_after_checkpoint(cmd, environ, "stage2", 5)  # rerun, killed in Stage 2, at step 5 of 40
    assert not (work / "stage2" / "model").exists() and (work / "stage2" / "ckpt.pt").is_file()
    assert not out.exists()
    result = run(cmd, environ)  # rerun to the end
    assert result.returncode == 0, result.stderr[-3000:]

    expected = load_file(uninterrupted / "model.safetensors")
    got = load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    ranked, expected_ranking = (json.loads((d / "ranking.json").read_text()) for d in (out, uninterrupted))
    for key in ("order", "scores", "curves"):  # (details hold wall times, which differ)
        assert ranked[key] == expected_ranking[key]
    steps = [json.loads(line)["step"] for line in (out / "logs" / "stage2.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # the log has each step once, however often it was killed


def test_bad_data_fails_before_training(env, tmp_path, monkeypatch, capsys):
    from distill.cli import main

    root, environ = env
    monkeypatch.setenv("HYBRID_CACHE", environ["HYBRID_CACHE"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "out"
    assert main(command(root, out, data=str(empty))[3:]) == 2
    err = capsys.readouterr().err
    assert "error: --data" in err and "need at least" in err
    assert not (tmp_path / "out.work" / "stage1").exists() and not out.exists()

    assert main(command(root, out, data=str(tmp_path / "nope.jsonl"))[3:]) == 2
    assert "no such file or folder" in capsys.readouterr().err

    assert main(command(root, out)[3:] + ["--set", "stage2.copies.min_distance=30"]) == 2
    assert "stage2.copies: two spans of 4 tokens 30 apart do not fit in a sequence of 32" in capsys.readouterr().err
    assert not (tmp_path / "out.work" / "stage1").exists() and not out.exists()


def test_rerun_with_other_settings_is_refused(env, uninterrupted, tmp_path, monkeypatch, capsys):
    from distill.cli import main

    root, environ = env
    monkeypatch.setenv("HYBRID_CACHE", environ["HYBRID_CACHE"])
    cmd = command(root, tmp_path / "new") + ["--work-dir", str(root / "straight.work"), "--set", "stage1.lr=0.02"]
    assert main(cmd[3:]) == 2
    assert "belongs to another run: preset" in capsys.readouterr().err


def test_distill_from_a_hybrid_reads_the_batches_one_longer_run_reads_next(env, tmp_path, monkeypatch, capsys):
    """`hybrid distill --from`: with every LR 0 no weight moves, so a step's loss names its batch. Two steps,
    then two more from that output, log the losses of steps 3 and 4 of one four-step run, and the provenance
    counts all four steps' tokens."""
    from distill.cli import main

    root, environ = env
    monkeypatch.setenv("HYBRID_CACHE", environ["HYBRID_CACHE"])
    torch.set_num_threads(1)
    common = ["--teacher", str(root / "teacher"), "--data", str(root / "corpus.md"), "--set", "eval_tokens=64",
              "--set", "stage1.seq_len=32", "--set", "stage1.steps=2", "--set", "stage2.train.seq_len=32",
              "--set", "stage2.train.lr=0", "--set", "stage2.other_lr=0", "--set", "stage3.seq_len=32",
              "--set", "score.candidate.train.seq_len=32"]
    assert main(["align", *common, "--out", str(tmp_path / "s1")]) == 0

    def distill(out: str, steps: int, *start: str) -> list[float]:
        assert main(["distill", *common, "--set", f"stage2.train.steps={steps}", *start, "--out",
                     str(tmp_path / out)]) == 0
        return [json.loads(x)["loss"] for x in (tmp_path / out / "log.jsonl").read_text().splitlines()]

    straight = distill("straight", 4, "--stage1", str(tmp_path / "s1"), "--softmax-layers", "1")
    distill("half", 2, "--stage1", str(tmp_path / "s1"), "--softmax-layers", "1")
    more = distill("more", 2, "--from", str(tmp_path / "half"))
    assert more == pytest.approx(straight[2:], rel=1e-6)
    assert more[0] != pytest.approx(straight[0], rel=1e-3) and more[1] != pytest.approx(straight[1], rel=1e-3)
    config = json.loads((tmp_path / "more" / "config.json").read_text())
    prov = config["provenance"]
    assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == prov["softmax_layers"] == [1]
    assert prov["tokens"]["stage2"] == 4 * 2 * 32 and prov["stage2_sequences"] == 8
    assert prov["stages"].count("stage2_distill") == 2
    # the hybrid keeps its layers: choosing others is a user error, as is a model that never had a Stage 2
    assert main(["distill", *common, "--from", str(tmp_path / "half"), "--softmax-layers", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["distill", *common, "--from", str(tmp_path / "s1"), "--out", str(tmp_path / "y")]) == 2
    other = save_teacher(tmp_path / "other", "llama", num_layers=LAYERS + 1, hidden=48, heads=4, kv_heads=2, seed=5)
    other_teacher = ["--teacher", str(other)] + common[2:]
    assert main(["distill", *other_teacher, "--from", str(tmp_path / "half"), "--out", str(tmp_path / "z")]) == 2
    assert "was not made from this teacher" in capsys.readouterr().err


def test_stage_subcommands_chain(env, tmp_path, monkeypatch, capsys):
    """align -> score (ga-s1) -> distill (top of the ranking) -> finetune, in-process through the CLI."""
    from distill.cli import main

    root, environ = env
    monkeypatch.setenv("HYBRID_CACHE", environ["HYBRID_CACHE"])
    torch.set_num_threads(1)
    common = ["--teacher", str(root / "teacher"), "--data", str(root / "corpus.md")]
    small = ["--set", "eval_tokens=64", "--set", "stage1.seq_len=32", "--set", "stage1.steps=3",
             "--set", "stage2.train.seq_len=32", "--set", "stage2.train.steps=2", "--set", "stage3.seq_len=32",
             "--set", "score.candidate.train.seq_len=32"]
    assert main(["align", *common, *small, "--out", str(tmp_path / "s1")]) == 0
    assert main(["score", *common, *small, "--stage1", str(tmp_path / "s1"), "--selector", "ga-s1", "--k", "1",
                 "--out", str(tmp_path / "rank")]) == 0
    ranking = json.loads((tmp_path / "rank" / "ranking.json").read_text())
    assert ranking["selector"] == "ga-s1" and (tmp_path / "rank" / "layer_scores.png").is_file()
    assert main(["distill", *common, *small, "--stage1", str(tmp_path / "s1"), "--ranking", str(tmp_path / "rank"),
                 "--k", "1", "--set", "stage2.min_doc_tokens=8", "--set", "stage2.copies.per_sequence=2",
                 "--set", "stage2.copies.tokens=4", "--set", "stage2.copies.min_distance=8", "--out", str(tmp_path / "s2")]) == 0
    config = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert config["provenance"]["stage2_min_doc_tokens"] == 8
    assert config["provenance"]["stage2_copies"] == {"per_sequence": 2, "tokens": 4, "min_distance": 8}
    assert [i for i, t in enumerate(config["layer_types"]) if t == "full_attention"] == ranking["order"][:1]
    assert main(["finetune", "--model", str(tmp_path / "s2"), "--data", str(root / "corpus.md"), *small,
                 "--steps", "2", "--out", str(tmp_path / "s3")]) == 0
    log = [json.loads(x) for x in (tmp_path / "s3" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    # a missing --stage1 for a selector that needs it is a user error (exit 2), not a traceback
    assert main(["score", *common, "--selector", "ga-s2", "--out", str(tmp_path / "x")]) == 2
    # the retrieval selector reads only the teacher; a context too short for its prompt names the setting
    assert main(["score", *common, "--selector", "retrieval", "--set", "score.retrieval_context=64",
                 "--out", str(tmp_path / "short")]) == 2
    assert "score.retrieval_context=64: recall task passkey@64" in capsys.readouterr().err
    assert main(["score", *common, "--selector", "retrieval", "--set", "score.retrieval_context=128",
                 "--set", "score.recall_samples=3", "--out", str(tmp_path / "retrieval")]) == 0
    retrieval = json.loads((tmp_path / "retrieval" / "ranking.json").read_text())
    assert retrieval["selector"] == "retrieval" and sorted(retrieval["order"]) == list(range(len(config["layer_types"])))
    assert retrieval["details"]["context"] == 128 and retrieval["details"]["samples"] == 3
    # so does reach; a window too long for the prompt names the setting
    assert main(["score", *common, "--selector", "reach", "--set", "score.retrieval_context=128",
                 "--set", "score.reach_window=64", "--out", str(tmp_path / "wide")]) == 2
    assert "score.reach_window=64 must be at most a quarter of the passkey prompt (128 tokens" in capsys.readouterr().err
    assert main(["score", *common, "--selector", "reach", "--set", "score.retrieval_context=128",
                 "--set", "score.reach_window=16", "--set", "score.recall_samples=2", "--out", str(tmp_path / "reach")]) == 0
    reach = json.loads((tmp_path / "reach" / "ranking.json").read_text())
    assert reach["selector"] == "reach" and sorted(reach["order"]) == list(range(len(config["layer_types"])))
    assert reach["details"]["window"] == 16 and reach["details"]["samples"] == 2
    # a KL ranking with the reach layers in front; a threshold below every score keeps them all, in reach's order
    assert main(["score", *common, *small, "--stage1", str(tmp_path / "s1"), "--selector", "kl-restore+reach",
                 "--set", "score.retrieval_context=128", "--set", "score.reach_window=16", "--set", "score.recall_samples=2",
                 "--set", "score.reach_threshold=-100", "--out", str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both" / "ranking.json").read_text())
    assert both["selector"] == "kl-restore+reach" and both["order"] == both["details"]["kept_for_reach"] == reach["order"]
    assert main(["score", *common, "--selector", "ga-s2+reach", "--out", str(tmp_path / "y")]) == 2  # needs --stage1
    # the ablation probe with the reach layers in front reads only the teacher: no --stage1; a threshold at reach's
    # top score keeps that one layer in front of the probe's own order
    top = reach["order"][0]
    assert main(["score", *common, "--selector", "ablation+reach", "--set", "score.retrieval_context=128",
                 "--set", "score.reach_window=16", "--set", "score.recall_samples=2",
                 "--set", f"score.reach_threshold={reach['scores'][str(top)]}", "--out", str(tmp_path / "probe")]) == 0
    assert main(["score", *common, "--selector", "ablation", "--set", "score.recall_samples=2",
                 "--out", str(tmp_path / "ablation")]) == 0
    probe = json.loads((tmp_path / "probe" / "ranking.json").read_text())
    ablation = json.loads((tmp_path / "ablation" / "ranking.json").read_text())
    assert probe["selector"] == "ablation+reach" and probe["details"]["kept_for_reach"] == [top]
    assert probe["order"] == [top] + [layer for layer in ablation["order"] if layer != top]
