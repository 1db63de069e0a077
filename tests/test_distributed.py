"""Several CPU processes (torchrun, gloo) train FSDP2-sharded: they match one process, a killed run
resumes from its sharded checkpoint to the same weights, the multi-node launch line runs, and
scoring spreads its candidates.

Tolerance: 2 processes x 1 sequence per step against 1 process x 2 micro-batches, the gradients
averaged in another order: weights within atol 2e-5 / rtol 1e-4 and losses within rtol 1e-4. On
this machine (torch 2.13 CPU, one thread per process) the difference measured 0: the weights are
bit-identical. A resumed run against an uninterrupted one with the same processes: bit-identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.errors import UserError
from tests.tiny_models import save_teacher, write_word_corpus

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [
    "eval_tokens=64", "eval_batch=2",
    "stage1.seq_len=32", "stage1.steps=6", "stage1.batch=2", "stage1.micro_batch=1", "stage1.lr=0.01",
    "score.candidate.train.seq_len=32", "score.candidate.train.steps=2", "score.eval_batch=2",
    "stage2.train.seq_len=32", "stage2.train.steps=6", "stage2.train.batch=2", "stage2.train.micro_batch=1",
    "stage2.train.lr=0.001", "stage2.train.save_every=2",
]


def convert_args(root: Path, out: Path, *extra: str, command: tuple[str, ...] = ("convert", "--k", "2")) -> list[str]:
    args = [*command, "--teacher", str(root / "teacher"), "--data", str(root / "corpus.txt"), "--out", str(out),
            "--device", "cpu"]
    for item in SETTINGS + list(extra):
        args += ["--set", item]
    return args


def environ(root: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HYBRID_CACHE=str(root / "cache"), PYTHONPATH=str(REPO))


def torchrun(root: Path, launch: list[str], module_args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", *module_args]
    return subprocess.Popen(cmd, env=environ(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out[-3000:]


def convert(root: Path, out: Path, processes: int, *extra: str) -> None:
    code, log = finish(torchrun(root, ["--standalone", f"--nproc_per_node={processes}"],
                                ["distill.cli", *convert_args(root, out, *extra)]))
    assert code == 0, log


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def losses(out: Path, stage: str) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "logs" / f"{stage}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny teacher, and its conversion by one process and by two."""
    root = tmp_path_factory.mktemp("dist")
    # llama ties lm_head to the embeddings (as SmolLM2): one parameter in the FSDP root, two names
    save_teacher(root / "teacher", "llama", num_layers=4, hidden=48, heads=4, kv_heads=2, seed=2)
    write_word_corpus(root / "corpus.txt", "sun moon star sky sea land rain snow wind fire", docs=50, words_per_doc=60)
    convert(root, root / "one", 1)
    convert(root, root / "two", 2)
    return root


def test_two_processes_match_one(runs):
    one, two = runs / "one", runs / "two"
    # candidates were spread: each process ran its own layers, each a one-process run
    r1, r2 = (json.loads((d / "ranking.json").read_text()) for d in (one, two))
    assert r1["order"] == r2["order"]
    for layer, score in r1["scores"].items():
        assert r2["scores"][layer] == pytest.approx(score, rel=1e-4, abs=1e-7)

    # FSDP2 over 2 processes x 1 sequence == 1 process x 2 micro-batches, in Stage 1 and Stage 2
    for stage in ("stage1", "stage2"):
        assert losses(two, stage) == pytest.approx(losses(one, stage), rel=1e-4), stage
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=2e-5, rtol=1e-4, msg=name)


def test_killed_rank_resumes_to_the_same_weights(runs):
    """Rank 1 is SIGKILLed right after the second sharded Stage-2 checkpoint (step 4 of 6); torchrun
    stops rank 0; the same command again resumes from the checkpoint and ends bit-identical."""
    out = runs / "killed"
    crash = ["tests.crash_after_checkpoint", "stage2", "1", "2", *convert_args(runs, out)]
    code, _ = finish(torchrun(runs, ["--standalone", "--nproc_per_node=2"], crash))
    assert code != 0 and not out.exists()
    ckpt = runs / "killed.work" / "stage2" / "ckpt.dcp"
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 4
    assert sorted(p.name for p in ckpt.glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]

    convert(runs, out, 2)
    expected, got = weights(runs / "two"), weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert [json.loads(x)["step"] for x in (out / "logs" / "stage2.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert not ckpt.exists()  # a finished stage keeps no resumable state


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_with_activation_checkpointing(runs):
    """The multi-node launch line, two one-process "nodes" on this machine meeting at a c10d rendezvous,
    runs Stage 1 (`hybrid align`) with activation checkpointing on: not part of the run's identity,
    and it changes no number."""
    out = runs / "nodes"
    launch = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
              "--rdzv-id=test-two-nodes"]
    # each "node" would take all the cores; they share them here
    args = ["distill.cli", *convert_args(runs, out, "parallel.activation_checkpointing=true", command=("align",)),
            "--threads", "1"]
    nodes = [torchrun(runs, launch, args) for _ in range(2)]
    for code, log in map(finish, nodes):
        assert code == 0, log
    expected = load_file(runs / "two.work" / "stage1" / "model" / "model.safetensors")
    got = weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=2e-5, rtol=1e-4, msg=name)


def test_checkpoint_of_another_process_count_is_refused(tmp_path):
    from distill.distributed import Runtime
    from distill.train_state import CHECKPOINT, DIST_CHECKPOINT, load_single, sharded_meta

    (tmp_path / DIST_CHECKPOINT).mkdir()
    with pytest.raises(UserError, match="written by several processes"):
        load_single(tmp_path, torch.nn.Linear(1, 1), None, Runtime())
    (tmp_path / DIST_CHECKPOINT).rmdir()
    (tmp_path / CHECKPOINT).write_bytes(b"")
    with pytest.raises(UserError, match="written by one process"):
        sharded_meta(tmp_path, Runtime(world=2))


def test_directory_replacement_survives_a_kill_between_renames(tmp_path):
    from distill.atomic_io import recover_directory, replace_directory

    target, new = tmp_path / "ckpt.dcp", tmp_path / ".ckpt.dcp.tmp"
    target.mkdir()
    (target / "step").write_text("1")
    new.mkdir()
    (new / "step").write_text("2")
    os.replace(target, tmp_path / ".ckpt.dcp.old")  # what replace_directory does before it is killed
    recover_directory(target)
    assert (target / "step").read_text() == "1"
    replace_directory(new, target)
    assert (target / "step").read_text() == "2" and not new.exists() and not (tmp_path / ".ckpt.dcp.old").exists()
