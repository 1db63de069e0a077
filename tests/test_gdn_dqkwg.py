"""kernels.gdn_dqkwg: fla's gated chunk_bwd_dqkwg as our Triton kernel, against the float64 torch form.

`chunk_bwd_dqkwg_torch` is itself checked against autograd in float64 (tests/test_gdn_chunk_bwd.py), so it is the
reference here. The kernel runs on CPU tensors under TRITON_INTERPRET=1: tests named `*interpreted*` run only in
that mode, started by `test_triton_kernel_under_interpreter`. The interpreter computes `tl.dot` of bf16 operands
on their raw bits (a 16 x 16 product is off by 1e10), so these tests run the kernel in float32; its bf16 dots are
checked on the GPU by bench/gdn_correctness.py (backend `fla-triton-dqkwg`).
"""

from __future__ import annotations

import pytest
import torch

from kernels.gdn_dqkwg import DEFAULT_CONFIG, chunk_bwd_dqkwg_triton, miscompiled_on
from kernels.gdn_fla import BackwardParts, chunk_bwd_dqkwg_torch
from tests.test_gdn_chunk_bwd import _backward_part_args
from tests.triton_interpreter import driver_only, interpreted_only, run_interpreted_tests

NAMES = ("dq", "dk", "dw", "dg")


def _check_against_float64(B, T, H, K, V, seed, decay_per_token=None):
    (_, args), _ = _backward_part_args(B, T, H, K, V, seed=seed)
    if decay_per_token is not None:  # strong decay: in-chunk cumulative g reaches far below -100 (base 2)
        q, k, v, g, h, dh, do, dv, scale = args
        steps = torch.full((B, T, H), -decay_per_token)
        g = torch.cat([steps[:, s : s + 64].cumsum(1) for s in range(0, T, 64)], 1)
        args = (q, k, v, g, h, dh, do, dv, scale)
    got = chunk_bwd_dqkwg_triton(*args)
    ref = chunk_bwd_dqkwg_torch(*(a.double() if torch.is_tensor(a) else a for a in args))
    for name, x, r in zip(NAMES, got, ref, strict=True):
        assert x.shape == r.shape, name
        assert torch.isfinite(x).all(), name
        err = ((x.double() - r).norm() / r.norm()).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e} at B={B} T={T} H={H} K={K} V={V}"
    assert got[0].dtype == got[1].dtype == got[3].dtype == torch.float32 and got[2].dtype == args[1].dtype


@interpreted_only
@pytest.mark.parametrize(
    "B, T, H, K, V",
    [
        (2, 100, 3, 16, 16),  # a partial last chunk
        (1, 192, 2, 80, 72),  # two K blocks (their dg shares summed) and two V blocks (accumulated)
        (3, 40, 2, 32, 32),  # one chunk, partial
        (2, 1, 1, 16, 16),  # one token
        (1, 128, 4, 64, 64),  # SmolLM2's head size, whole chunks
    ],
)
def test_interpreted_kernel_matches_the_float64_torch_form(B, T, H, K, V):
    _check_against_float64(B, T, H, K, V, seed=B * 1000 + T)


@interpreted_only
def test_interpreted_strong_decay_leaves_no_overflow_in_padding():
    """exp2(g_t - g_s) is formed only where s <= t inside the real tokens: with a decay of 5 per token (base 2) the
    padded rows of the last chunk (g = 0) would otherwise meet exp2(+180) = inf and turn 0 * inf into NaN."""
    _check_against_float64(1, 100, 2, 16, 16, seed=5, decay_per_token=5.0)


@driver_only
def test_triton_kernel_under_interpreter():
    run_interpreted_tests(__file__)


def test_bad_state_shapes_and_chunk_sizes_are_refused_before_any_launch():
    (_, args), _ = _backward_part_args(1, 100, 2, 16, 16, seed=0)
    q, k, v, g, h, dh, do, dv, scale = args
    with pytest.raises(ValueError, match=r"h and dh \[B, NT, H, K, V\] = \(1, 2, 2, 16, 16\)"):
        chunk_bwd_dqkwg_triton(q, k, v, g, h[:, :1], dh[:, :1], do, dv, scale)
    with pytest.raises(ValueError, match="chunk is 64 tokens"):
        chunk_bwd_dqkwg_triton(*args, chunk=32)


def test_an_unknown_dqkwg_path_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"one of \('torch', 'triton', 'fla'\), got 'tilelang'"):
        BackwardParts(dqkwg="tilelang")


def test_the_launch_shape_that_miscompiled_on_hopper_is_refused_there_only():
    """BK=32 with 4 warps gave wrong dk/dg on an H100 with Triton 3.6 (bench/results/dqkwg_triton_h100/)."""
    why = miscompiled_on((9, 0), "3.6.0", block_k=32, num_warps=4)
    assert why and "BK=32 with 4 warps" in why and "Triton 3.6.0" in why
    assert miscompiled_on((9, 0), "3.7.1", 32, 4)
    assert miscompiled_on((9, 0), "3.6.0", 32, 8) is None  # 8 warps were right at both shapes
    assert miscompiled_on((9, 0), "3.6.0", 64, 4) is None
    assert miscompiled_on((9, 0), "3.5.1", 32, 4) is None  # the public reports: clean on 3.5.1
    assert miscompiled_on((8, 0), "3.6.0", 32, 4) is None  # Ampere: not seen
    block_k, _, num_warps, _ = DEFAULT_CONFIG
    assert miscompiled_on((9, 0), "3.6.0", min(block_k, 32), num_warps) is None  # the default, even on 32-wide heads
