"""The GDN recurrence implementations against a float64 token-by-token reference."""

import pytest
import torch

from kernels.gdn import l2norm, naive_recurrent_gated_delta_rule, torch_chunk_gated_delta_rule, torch_recurrent_step


def random_inputs(B=2, T=100, H=3, K=16, V=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = l2norm(torch.randn(B, T, H, K, generator=g, dtype=dtype))
    k = l2norm(torch.randn(B, T, H, K, generator=g, dtype=dtype))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    log_decay = -torch.rand(B, T, H, generator=g, dtype=dtype) * 0.7
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    state = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return q, k, v, log_decay, beta, state


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("T,chunk", [(100, 32), (64, 64), (7, 16)])
def test_chunked_matches_float64_recurrence(T, chunk):
    q, k, v, g, beta, s0 = random_inputs(T=T)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    o, s = torch_chunk_gated_delta_rule(*(x.float() for x in (q, k, v, g, beta)), initial_state=s0.float(), chunk_size=chunk)
    assert o.dtype == torch.float32
    assert rel_err(o, o_ref) <= 1e-5
    assert rel_err(s, s_ref) <= 1e-5


def test_chunked_gradients_match_float64_recurrence():
    inputs64 = [x.requires_grad_() for x in random_inputs(T=50, seed=1)]
    inputs32 = [x.detach().float().requires_grad_() for x in inputs64]
    o_ref, s_ref = naive_recurrent_gated_delta_rule(*inputs64[:5], initial_state=inputs64[5])
    o, s = torch_chunk_gated_delta_rule(*inputs32[:5], initial_state=inputs32[5], chunk_size=16)
    weights_o, weights_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    ((o_ref * weights_o).sum() + (s_ref * weights_s).sum()).backward()
    ((o * weights_o.float()).sum() + (s * weights_s.float()).sum()).backward()
    for name, a, b in zip(["q", "k", "v", "g", "beta", "state"], inputs32, inputs64):
        assert rel_err(a.grad, b.grad) <= 1e-4, name


def test_recurrent_step_continues_a_prefix():
    q, k, v, g, beta, s0 = random_inputs(T=9, seed=2)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    _, s_prefix = torch_chunk_gated_delta_rule(*(x[:, :8].float() for x in (q, k, v, g, beta)), initial_state=s0.float())
    o_last, s_last = torch_recurrent_step(*(x[:, 8:].float() for x in (q, k, v, g, beta)), state=s_prefix)
    assert rel_err(o_last, o_ref[:, 8:]) <= 1e-5
    assert rel_err(s_last, s_ref) <= 1e-5
