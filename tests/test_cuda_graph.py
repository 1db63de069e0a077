"""A training step replayed from a CUDA graph (`--set parallel.cuda_graph=true`, distill.cuda_graph) trains
as the launched step does. The replay itself needs a GPU (run this file on the GPU machine:
`python3 -m pytest -q tests/test_cuda_graph.py`); on a CPU only the refusal is checked."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.cuda_graph import WARMUP
from distill.data import PackedData
from distill.distributed import ParallelConfig, Runtime
from distill.errors import UserError
from distill.model.config import FULL_ATTENTION, LINEAR_ATTENTION
from distill.model.transfer import hybrid_from_teacher
from distill.stages import Stage2Config, run_stage2
from distill.train import TrainConfig, train
from tests.test_hybrid_model import perturb_gdn
from tests.tiny_models import make_teacher

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_a_cuda_graph_on_the_cpu_is_refused_with_the_setting_named(tmp_path):
    model = torch.nn.Linear(4, 4)

    def loss_fn(m, batch):
        return m(batch).pow(2).mean(), {}

    runtime = Runtime(parallel=ParallelConfig(cuda_graph="on"))
    groups = [{"params": list(model.parameters()), "lr": 1e-3, "name": "all"}]
    with pytest.raises(UserError, match="parallel.cuda_graph needs one process on a CUDA device"):
        train("t", model, groups, loss_fn, lambda step, micro: torch.randn(2, 4), TrainConfig(steps=2), tmp_path,
              runtime, show_progress=False)


@needs_cuda
def test_replayed_stage2_steps_train_as_launched_steps(tmp_path: Path):
    """Same data, same start: the replayed run logs the same losses and ends at the same weights (within
    bf16 noise, judged against how far training moved them), with a cosine LR and two micro-batches."""
    cuda = torch.device("cuda")
    teacher, _ = make_teacher("llama", num_layers=4, hidden=128, heads=2, kv_heads=1)
    start = perturb_gdn(hybrid_from_teacher(teacher, [FULL_ATTENTION] + [LINEAR_ATTENTION] * 3))
    teacher = teacher.to(cuda).requires_grad_(False)
    rng = np.random.default_rng(0)
    data = PackedData(train=rng.integers(0, teacher.config.vocab_size, size=(64, 128)),
                      eval=rng.integers(0, teacher.config.vocab_size, size=(2, 128)), meta={}, path=tmp_path)
    steps = WARMUP + 4
    cfg = Stage2Config(TrainConfig(steps=steps, seq_len=128, batch=4, micro_batch=2, lr=3e-3, schedule="cosine",
                                   warmup_steps=2, save_every=0), other_lr=1e-3)
    logs, weights = {}, {}
    for graphed in (False, True):
        student = copy.deepcopy(start).to(cuda)
        parallel = ParallelConfig(cuda_graph="on" if graphed else "off")
        runtime = Runtime(device=cuda, amp_dtype=torch.bfloat16, parallel=parallel)
        logs[graphed] = run_stage2(teacher, student, data, cfg, tmp_path / f"graph-{graphed}", runtime)
        weights[graphed] = {n: p.detach().float().cpu() for n, p in student.named_parameters()}

    # the capture step (index WARMUP) and every later one came from the graph
    assert [r["replayed"] for r in logs[True]] == [False] * WARMUP + [True] * (steps - WARMUP)
    launched, replayed = (np.array([r["loss"] for r in logs[g]]) for g in (False, True))
    np.testing.assert_allclose(replayed, launched, rtol=2e-2)
    assert launched[-1] < launched[0]  # it trained: the comparison is not of two idle runs
    initial = {n: p.detach().float() for n, p in start.named_parameters()}
    moved = sum((weights[False][n] - initial[n]).norm() ** 2 for n in initial) ** 0.5
    apart = sum((weights[True][n] - weights[False][n]).norm() ** 2 for n in initial) ** 0.5
    assert apart < 0.05 * moved, (float(apart), float(moved))
    assert all(torch.isfinite(w).all() for w in weights[True].values())


@needs_cuda
def test_a_graphed_step_out_of_memory_captures_again_in_smaller_forwards(tmp_path: Path):
    """A loss that "runs out of memory" above 3 rows a forward, micro-batches of 8: the first warm-up step
    fails, the loop halves the forwards twice, then warms up and captures at the new shapes. The run ends
    replayed, at the weights of micro-batches of 2 launched step by step."""
    cuda = torch.device("cuda")
    data = torch.randn(WARMUP * 3 + 6, 8, 16, device=cuda)
    weights = {}
    for micro, graphed, max_rows in ((2, False, None), (8, True, 3)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(cuda)

        def loss_fn(m, batch, max_rows=max_rows):
            if max_rows is not None and batch.shape[0] > max_rows:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return (m(batch) - batch.sum(-1, keepdim=True)).pow(2).mean(), {}

        def batch(step, i, micro=micro):
            return data[step, i * micro : (i + 1) * micro]

        runtime = Runtime(device=cuda, parallel=ParallelConfig(cuda_graph="on" if graphed else "off"))
        cfg = TrainConfig(steps=len(data), seq_len=1, batch=8, micro_batch=micro, lr=1e-2, save_every=0)
        log = train("t", model, [{"params": list(model.parameters()), "lr": 1e-2, "name": "all"}], loss_fn, batch,
                    cfg, tmp_path / f"m{micro}", runtime, show_progress=False)
        weights[graphed] = torch.cat([p.detach().flatten() for p in model.parameters()])
        if graphed:
            assert log[-1]["replayed"] and log[-1]["pieces"] == 4
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-4, atol=1e-5)


@needs_cuda
def test_a_failed_capture_continues_eagerly_and_leaves_random_numbers_working(tmp_path: Path):
    """A loss that reads a value on the host (legal eagerly, not while capturing): the capture fails, the
    stage continues launched step by step to the weights of a run without graphs, back on the default stream,
    and the device's generator works afterwards (torch leaves both in the failed capture)."""
    cuda = torch.device("cuda")
    data = torch.randn(WARMUP + 4, 4, 16, device=cuda)
    weights = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(cuda)

        def loss_fn(m, batch):
            loss = (m(batch) - batch.sum(-1, keepdim=True)).pow(2).mean()
            loss.item()  # a host sync: legal eagerly, refused while capturing
            return loss, {}

        runtime = Runtime(device=cuda, parallel=ParallelConfig(cuda_graph="on" if graphed else "off"))
        cfg = TrainConfig(steps=len(data), seq_len=1, batch=4, micro_batch=4, lr=1e-2, save_every=0)
        log = train("t", model, [{"params": list(model.parameters()), "lr": 1e-2, "name": "all"}], loss_fn,
                    lambda step, micro: data[step], cfg, tmp_path / f"g{graphed}", runtime, show_progress=False)
        weights[graphed] = torch.cat([p.detach().flatten() for p in model.parameters()])
        if graphed:
            assert not any(r["replayed"] for r in log)
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-4, atol=1e-5)
    assert torch.cuda.current_stream() == torch.cuda.default_stream()  # not the failed capture's stream
    assert torch.isfinite(torch.randn(1000, device=cuda)).all()


ENDED_THEN_ABANDONED = """
import gc, torch
from distill.cuda_graph import _abandon_capture
x = torch.ones(1024, device="cuda")
graph, pool, stream = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle(), torch.cuda.current_stream()
with torch.cuda.graph(graph, pool=pool):
    y = x * 2
_abandon_capture(graph, pool, stream)  # as after a capture that failed only while instantiating
del graph, y
gc.collect()
torch.cuda.synchronize()
print("alive", float((x * 3).sum()), float(torch.rand(4, device="cuda").sum() >= 0))
"""


@needs_cuda
def test_a_capture_that_ended_before_failing_is_released_once_and_the_process_lives():
    """A capture that ends and then fails (out of memory while instantiating) owns its pool: abandoning it must not
    release the pool a second time, which the graph's destructor would turn into an abort."""
    run = subprocess.run([sys.executable, "-c", ENDED_THEN_ABANDONED], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0 and "alive 3072.0 1.0" in run.stdout, run.stderr[-3000:]
