"""kernels.gdn_decode: one GDN decode step on state-cache rows, against the float64 token loop.

The Triton kernel runs on CPU tensors under TRITON_INTERPRET=1 (triton 3.9): tests named
`*interpreted*` run only in that mode, and `test_triton_kernel_under_interpreter` starts them in a
subprocess with the variable set (it must be set before triton is imported).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from kernels.gdn import naive_recurrent_gated_delta_rule
from kernels.gdn_decode import decode_launch_config, gdn_decode_step
from tests.triton_interpreter import driver_only, interpreted_only, run_interpreted_tests

# Relative error bounds: fp32 state is one fp32 step; a bf16 state is rounded once when stored (2^-9).
STATE_TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-3}


def make_step(batch, heads, dk, dv, gen, dtype=torch.float32):
    """Random decode inputs: L2-normalised q, k; log-decay g < 0; beta in (0, 1)."""
    q = F.normalize(torch.randn(batch, heads, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, heads, dk, generator=gen), dim=-1)
    v = torch.randn(batch, heads, dv, generator=gen)
    g = F.logsigmoid(torch.randn(batch, heads, generator=gen) + 2)
    beta = torch.rand(batch, heads, generator=gen)
    return [x.to(dtype) for x in (q, k, v, g, beta)]


def make_cache(num_slots, heads, dk, dv, gen, dtype):
    return torch.randn(num_slots, heads, dk, dv, generator=gen).to(dtype)


def reference_step(step, cache, slots, scale=None):
    """float64 token loop on the gathered rows: (o [B, H, V], new rows [B, H, K, V])."""
    o, state = naive_recurrent_gated_delta_rule(
        *(x.double().unsqueeze(1) for x in step), scale=scale, initial_state=cache[slots.long()].double()
    )
    return o[:, 0], state


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def check_step(impl, state_dtype, *, batch=6, heads=3, dk=16, dv=24, num_slots=13, index_dtype=torch.int64,
               input_dtype=torch.float32, scale=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    step = make_step(batch, heads, dk, dv, gen, input_dtype)
    cache = make_cache(num_slots, heads, dk, dv, gen, state_dtype)
    before = cache.clone()
    slots = torch.randperm(num_slots, generator=gen)[:batch].to(index_dtype)
    o_ref, state_ref = reference_step(step, cache, slots, scale)

    o = gdn_decode_step(*step, cache, slots, scale, impl=impl)

    assert o.shape == (batch, heads, dv) and o.dtype == input_dtype
    assert rel_err(o, o_ref) <= (1e-5 if input_dtype == torch.float32 else 6e-3)
    assert cache.dtype == state_dtype
    assert rel_err(cache[slots.long()], state_ref) <= STATE_TOL[state_dtype]
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots.long()] = False
    assert torch.equal(cache[untouched], before[untouched])


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_torch_path_matches_reference(state_dtype, index_dtype):
    check_step("torch", state_dtype, index_dtype=index_dtype)


def test_torch_path_bf16_inputs_and_explicit_scale():
    check_step("torch", torch.bfloat16, input_dtype=torch.bfloat16, scale=0.3)


def test_padding_slot_leaves_cache_alone_and_outputs_zero():
    gen = torch.Generator().manual_seed(1)
    step = make_step(4, 2, 8, 8, gen)
    cache = make_cache(6, 2, 8, 8, gen, torch.float32)
    before = cache.clone()
    slots = torch.tensor([4, -1, 0, -1])
    o = gdn_decode_step(*step, cache, slots, impl="torch")
    assert torch.equal(o[[1, 3]], torch.zeros_like(o[[1, 3]]))
    o_ref, state_ref = reference_step([x[[0, 2]] for x in step], cache=before, slots=slots[[0, 2]])
    assert rel_err(o[[0, 2]], o_ref) <= 1e-5 and rel_err(cache[[4, 0]], state_ref) <= 1e-5
    assert torch.equal(cache[[1, 2, 3, 5]], before[[1, 2, 3, 5]])


def test_consecutive_steps_equal_the_token_loop():
    """Three decode steps in place on the cache = one three-token recurrence from the same state."""
    gen = torch.Generator().manual_seed(2)
    steps = [make_step(3, 2, 16, 16, gen) for _ in range(3)]
    cache = make_cache(5, 2, 16, 16, gen, torch.float32)
    slots = torch.tensor([2, 0, 4])
    seq = [torch.stack([s[i] for s in steps], dim=1).double() for i in range(5)]  # [B, T=3, ...]
    o_ref, state_ref = naive_recurrent_gated_delta_rule(*seq, initial_state=cache[slots].double())
    outs = [gdn_decode_step(*s, cache, slots, impl="torch") for s in steps]
    assert rel_err(torch.stack(outs, dim=1), o_ref) <= 1e-5
    assert rel_err(cache[slots], state_ref) <= 1e-5


def check_state_cache_view(impl):
    """vLLM hands each layer a view of a shared pool: the slot stride is larger than H*K*V."""
    gen = torch.Generator().manual_seed(3)
    step = make_step(2, 2, 8, 8, gen)
    pool = make_cache(4, 2 * 2, 8, 8, gen, torch.float32)  # two layers' states per slot
    cache = pool[:, 2:]  # layer 1
    slots = torch.tensor([3, 1])
    o_ref, state_ref = reference_step(step, cache, slots)
    o = gdn_decode_step(*step, cache, slots, impl=impl)
    assert rel_err(o, o_ref) <= 1e-5 and rel_err(pool[slots, 2:], state_ref) <= 1e-5


def test_state_cache_view_with_slot_stride():
    check_state_cache_view("torch")


def test_bad_shapes_are_rejected():
    gen = torch.Generator().manual_seed(4)
    q, k, v, g, beta = make_step(2, 2, 8, 8, gen)
    cache = make_cache(3, 2, 8, 8, gen, torch.float32)
    with pytest.raises(ValueError):
        gdn_decode_step(q, k[:, :1], v, g, beta, cache, torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        gdn_decode_step(q, k, v, g, beta, cache[:, :, :4], torch.tensor([0, 1]))


@pytest.mark.parametrize("batch", [1, 8, 32, 256, 1024])
@pytest.mark.parametrize("state_bytes", [2, 4])
def test_launch_config_fits_the_kernel(batch, state_bytes):
    block_v, num_warps = decode_launch_config(batch * 32, 128, state_bytes)
    assert block_v in (8, 16, 32, 64, 128) and num_warps in (1, 2, 4, 8)


# ---------------------------------------------------------------- Triton kernel, interpreted on CPU


@driver_only
def test_triton_kernel_under_interpreter():
    run_interpreted_tests(__file__)


@interpreted_only
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_interpreted_kernel_matches_reference(state_dtype, index_dtype):
    # dv = 24 is not a power of two: the last V tile is masked
    check_step("triton", state_dtype, index_dtype=index_dtype, seed=5)


@interpreted_only
def test_interpreted_kernel_bf16_inputs_and_padding():
    check_step("triton", torch.float32, input_dtype=torch.bfloat16, scale=0.3, seed=6)
    gen = torch.Generator().manual_seed(7)
    step = make_step(3, 2, 16, 16, gen)
    cache = make_cache(4, 2, 16, 16, gen, torch.bfloat16)
    before = cache.clone()
    o = gdn_decode_step(*step, cache, torch.tensor([-1, 2, -1], dtype=torch.int32), impl="triton")
    assert torch.equal(o[[0, 2]], torch.zeros_like(o[[0, 2]]))
    o_ref, state_ref = reference_step([x[[1]] for x in step], before, torch.tensor([2]))
    assert rel_err(o[[1]], o_ref) <= 1e-5 and rel_err(cache[[2]], state_ref) <= STATE_TOL[torch.bfloat16]
    assert torch.equal(cache[[0, 1, 3]], before[[0, 1, 3]])


@interpreted_only
def test_interpreted_kernel_on_state_cache_view():
    check_state_cache_view("triton")
