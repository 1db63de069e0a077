"""One optimiser step captured in a CUDA graph and replayed (`--set parallel.cuda_graph=true`).

A small model's training step is host-bound: on an H100 the SmolLM2 Stage-1 step's kernels take ~70 ms
and the host ~300 ms to launch them (bench/results/train_throughput.md). Replaying a captured graph
launches the whole step — every micro-batch's forward and backward, clipping and the fused AdamW — at
once. What that needs from the step, and how it is met:

- fixed shapes: a stage's micro-batches all have one shape; each batch is copied into static buffers;
- no host syncs inside: the loop reads the loss and the gradient norm once per step, after the replay;
- AdamW capturable (its step count on the GPU) with a tensor LR that the schedule fills in place;
- gradients that stay put: captured from None, the first backward writes them and replays rewrite them;
- kernels warmed up before capture (fla's autotuning, torch.compile): the first `WARMUP` steps run eager,
  the last of them on a side stream as the capture will;
- autocast without its weight-cast cache (a cached cast would be captured once and never refreshed).

One process only (FSDP's collectives are not captured here). If capture fails, the stage logs why, gives back
what the failed capture held (its memory pool, stream and random-number generator: `_abandon_capture`), and
continues eagerly (a capture that runs out of memory then leaves the eager step the room it had in the warm-up).
On by default for one CUDA process (`parallel.cuda_graph=auto`): with `parallel.compile` it took the SmolLM2
Stage 1 from 64.9K to 160.7K tokens/s and Stage 2 from 42.5K to 104.6K on an H200
(bench/results/train_throughput.md, 2026-12-06).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

WARMUP = 3  # eager steps before capture


def _static_copy(batch):
    return tuple(t.clone() for t in batch) if isinstance(batch, tuple) else batch.clone()


def _copy_into(static, batch) -> None:
    if isinstance(static, tuple):
        for s, b in zip(static, batch):
            s.copy_(b, non_blocking=True)
    else:
        static.copy_(batch, non_blocking=True)


def _abandon_capture(graph: torch.cuda.CUDAGraph, pool: tuple, stream: torch.cuda.Stream) -> None:
    """Undo what a capture that never ended leaves behind. torch cleans up in `capture_end` only when the capture
    ends well (`torch.cuda.graph.__exit__`); otherwise the process keeps running on the capture's stream, the
    capture's memory pool (a step's activations' worth) is never released, and the device's random-number
    generator stays in the capture, so every later random op fails: "Offset increment outside graph capture
    encountered unexpectedly" (H100, torch 2.11, 2026-12-06). Each repair is best effort: a torch that cleaned up
    already refuses it.

    The pool is released once, by whoever owns it then. A capture that failed while instantiating its graph (out
    of memory, a large model's step) has already marked itself ended, and the graph's destructor releases the pool
    again: released here as well, that second release throws inside a C++ destructor and aborts the process (the
    likely end of the Qwen2.5-1.5B-shape Stage 1 at 32 x 512 on an H100, 2026-12-07: an abort in `~CUDAGraph` ->
    `reset`). `graph.pool()` answers only for such an ended capture; then `graph.reset()` releases the pool, once,
    and the destructor finds nothing left."""
    device = torch.cuda.current_device()
    torch.cuda.set_stream(stream)
    generator = torch.cuda.default_generators[device]
    try:
        graph.pool()
        ended = True
    except RuntimeError:  # "without a preceding successful capture": the pool is ours to release
        ended = False
    repairs = {
        "stop allocating into the capture's pool": lambda: torch._C._cuda_endAllocateToPool(device, pool),
        "release the capture's pool": graph.reset if ended else lambda: torch._C._cuda_releasePool(device, pool),
        # a clone of the generator's state (same seed and offset) belongs to no capture
        "take the generator out of the capture": lambda: generator.graphsafe_set_state(generator.clone_state()),
    }
    for what, repair in repairs.items():
        try:
            repair()
        except (RuntimeError, AttributeError) as error:
            log.debug("after the failed capture, could not %s: %s", what, error)


class GraphedStep:
    """Runs `eager_step(batches)` for the first WARMUP steps, then captures it once and replays it.

    eager_step(batches, zero_grads=True) -> (loss_sum, grad_norm, metrics): the loop's own step (forward
    and backward of every micro-batch, clipping, optimizer.step), the first two device tensors; it sets
    the gradients to None after the step unless told not to (the captured step keeps them in place)."""

    def __init__(self, eager_step: Callable, optimizer: torch.optim.Optimizer):
        self.eager_step, self.optimizer = eager_step, optimizer
        self.steps_seen = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.static_batches: list | None = None
        self.outputs: tuple | None = None

    def restart(self) -> None:
        """Forget the warm-up and any capture: the step's shapes change (the loop's smaller forwards after an
        out-of-memory error), so it warms up and captures again."""
        self.steps_seen, self.graph, self.failed, self.static_batches, self.outputs = 0, None, False, None, None

    @property
    def replayed(self) -> bool:
        """Whether the step just run came from the captured graph (the log records it per step)."""
        return self.graph is not None

    def __call__(self, batches: list) -> tuple[torch.Tensor, torch.Tensor, dict]:
        self.steps_seen += 1
        if self.graph is not None:
            for static, batch in zip(self.static_batches, batches):
                _copy_into(static, batch)
            self.graph.replay()
            return self.outputs
        if self.failed or self.steps_seen < WARMUP:
            return self.eager_step(batches)
        if self.steps_seen == WARMUP:  # the capture runs on a side stream: warm that path too
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.eager_step(batches)
            torch.cuda.current_stream().wait_stream(side)
            return out
        return self._capture_and_run(batches)

    def _capture_and_run(self, batches: list) -> tuple[torch.Tensor, torch.Tensor, dict]:
        self.static_batches = [_static_copy(b) for b in batches]
        # the graph keeps its own memory pool; hand the eager steps' cached blocks back first so the two
        # together do not hold twice a step's activations
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.current_stream()
        failure, ended = None, False
        try:
            with torch.cuda.graph(graph, pool=pool):
                self.outputs = self.eager_step(self.static_batches, zero_grads=False)
            ended = True
            if self.outputs[2]:
                raise ValueError(f"the loss reports metrics {sorted(self.outputs[2])}, which a replay would not update")
        except Exception as error:  # noqa: BLE001 - any capture failure: keep training, eagerly
            failure = f"{type(error).__name__}: {error}"
        if failure is None:
            self.graph = graph
            log.info("training step captured in a CUDA graph after %d eager steps", WARMUP)
            graph.replay()  # capture records the step without running it
            return self.outputs
        log.warning("CUDA graph capture of the training step failed (%s); continuing eagerly", failure)
        # give the failed capture's memory back before the eager step needs the room; outside the except block,
        # whose traceback would keep the captured step's tensors alive
        self.failed, self.static_batches, self.outputs = True, None, None
        if not ended:
            _abandon_capture(graph, pool, stream)
        del graph
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return self.eager_step(batches)
