"""Stage 1's stacked mixers (distill.model.gdn_mixer.stacked_gdn_forward) compute what each mixer computes
on its own input: outputs and every parameter's gradient against the per-layer loop, with float64 weights and
inputs. Both paths compute the log-decay g and the chunked delta rule in float32 by design
(kernels/gdn_reference.py), and a batched GEMM may sum in another order than the per-layer one, so they agree
to float32 rounding, not float64's: the tolerance is 1e-5 relative to each tensor's scale. A_log's gradient, a
sum over every token whose terms largely cancel, showed 1.0-1.5e-6 at 70 tokens on one CPU and under 1e-6 on
another (2026-12-07); a layer's input or weights mixed up with another's moves a tensor by 1e-2 or more."""

from __future__ import annotations

import pytest
import torch

from distill.model.config import LINEAR_ATTENTION
from distill.model.gdn_mixer import stacked_gdn_forward
from distill.model.transfer import hybrid_from_teacher
from tests.test_hybrid_model import perturb_gdn
from tests.tiny_models import make_teacher


def all_linear_mixers(family: str, dtype: torch.dtype) -> list:
    teacher, _ = make_teacher(family, num_layers=3)
    student = perturb_gdn(hybrid_from_teacher(teacher, [LINEAR_ATTENTION] * 3)).to(dtype)
    mixers = [layer.linear_attn for layer in student.model.layers]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every layer's norm and o_proj bias different, so a mixed-up layer shows
        for m in mixers:
            m.norm.weight.add_(0.1 * torch.randn(m.norm.weight.shape, generator=gen, dtype=dtype))
    return mixers


def grads(mixers) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": p.grad.clone() for i, m in enumerate(mixers) for name, p in m.named_parameters()
            if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("seq_len", [1, 5, 70])  # one token, shorter than the conv, over one 64-token chunk
def test_stacked_mixers_equal_each_mixer_alone_in_float64(family, seq_len):
    mixers = all_linear_mixers(family, torch.float64)
    gen = torch.Generator().manual_seed(seq_len)
    x = torch.randn(len(mixers), 2, seq_len, mixers[0].q_proj.in_features, generator=gen, dtype=torch.float64)
    target = torch.randn(x.shape, generator=gen, dtype=torch.float64)

    alone = torch.stack([m(x[i])[0] for i, m in enumerate(mixers)])
    ((alone - target) ** 2).sum().backward()
    expected = grads(mixers)
    for m in mixers:
        m.zero_grad(set_to_none=True)

    stacked = stacked_gdn_forward(mixers, x)
    ((stacked - target) ** 2).sum().backward()
    assert_close_to_scale(stacked, alone, "output")
    got = grads(mixers)
    assert got.keys() == expected.keys() and any(".A_log" in name for name in got)
    for name, grad in expected.items():
        assert_close_to_scale(got[name], grad, name)


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    assert error < tol, (what, error)


def test_stacked_mixers_compiled_equal_eager():
    from distill.model.compiled import set_compiled

    mixers = all_linear_mixers("qwen2", torch.float32)
    x = torch.randn(len(mixers), 2, 19, mixers[0].q_proj.in_features, generator=torch.Generator().manual_seed(0))
    eager = stacked_gdn_forward(mixers, x)
    for m in mixers:
        set_compiled(m, True)
    torch.testing.assert_close(stacked_gdn_forward(mixers, x), eager, rtol=1e-5, atol=1e-6)
