"""Two CPU processes (torchrun, gloo): data-parallel stages match one process; scoring spreads candidates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import save_teacher, write_word_corpus

SETTINGS = [
    "eval_tokens=64", "eval_batch=2",
    "stage1.seq_len=32", "stage1.steps=6", "stage1.batch=2", "stage1.micro_batch=1", "stage1.lr=0.01",
    "score.candidate.train.seq_len=32", "score.candidate.train.steps=2", "score.eval_batch=2",
    "stage2.train.seq_len=32", "stage2.train.steps=6", "stage2.train.batch=2", "stage2.train.micro_batch=1",
    "stage2.train.lr=0.001",
]


def convert(root: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
    cmd = launcher + ["distill.cli", "convert", "--teacher", str(root / "teacher"), "--data", str(root / "corpus.txt"),
                      "--k", "2", "--out", str(out), "--device", "cpu"]
    for item in SETTINGS:
        cmd += ["--set", item]
    environ = dict(os.environ, OMP_NUM_THREADS="1", HYBRID_CACHE=str(root / "cache"),
                   PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=400)


def test_two_processes_match_one(tmp_path):
    save_teacher(tmp_path / "teacher", "qwen3", num_layers=4, hidden=48, heads=4, kv_heads=2, seed=2)
    write_word_corpus(tmp_path / "corpus.txt", "sun moon star sky sea land rain snow wind fire", docs=50, words_per_doc=60)

    one = convert(tmp_path, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = convert(tmp_path, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]

    # candidates were spread: each process wrote its own layers' results
    r1 = json.loads((tmp_path / "one" / "ranking.json").read_text())
    r2 = json.loads((tmp_path / "two" / "ranking.json").read_text())
    assert r1["order"] == r2["order"]
    for layer, score in r1["scores"].items():
        assert r2["scores"][layer] == pytest.approx(score, rel=1e-4, abs=1e-7)

    # 2 processes x 1 sequence with averaged gradients == 1 process x 2 micro-batches
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=2e-5, rtol=1e-4, msg=name)
    s1 = [json.loads(x)["loss"] for x in (tmp_path / "one" / "logs" / "stage1.jsonl").read_text().splitlines()]
    s2 = [json.loads(x)["loss"] for x in (tmp_path / "two" / "logs" / "stage1.jsonl").read_text().splitlines()]
    assert s2 == pytest.approx(s1, rel=1e-4)
