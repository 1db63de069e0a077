"""kernels.kl: fused linear + KL(teacher || student) against float64 references on random inputs.

The Triton row kernel runs on CPU tensors under TRITON_INTERPRET=1 (triton 3.9): tests named
`*interpreted*` run only in that mode, and `test_triton_kernel_under_interpreter` starts them in a
subprocess with the variable set (it must be set before triton is imported).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from kernels.kl import MEMORY_BUDGET_BYTES, _kl_rows_torch, auto_chunk_tokens, fused_linear_kl, naive_kl
from tests.triton_interpreter import driver_only, interpreted_only, run_interpreted_tests



def make_inputs(n=203, vocab=1000, hs=32, ht=48, dtype=torch.float32, seed=0):
    """Random student/teacher hidden states and lm_heads; logits of order 1-3 like a trained model's."""
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, hs, generator=gen, dtype=torch.float64)
    w_s = torch.randn(vocab, hs, generator=gen, dtype=torch.float64) * 0.3
    h_t = torch.randn(n, ht, generator=gen, dtype=torch.float64)
    w_t = torch.randn(vocab, ht, generator=gen, dtype=torch.float64) * 0.3
    return [x.to(dtype) for x in (h_s, w_s, h_t, w_t)]


def reference(h_s, w_s, h_t, w_t, temperature=1.0):
    """(loss, d loss/d h_s, d loss/d w_s) in float64 from the naive formula, on the same (rounded) inputs."""
    h_s, w_s = (x.detach().double().requires_grad_() for x in (h_s, w_s))
    loss = naive_kl(h_s, w_s, h_t.double(), w_t.double(), temperature=temperature)
    grad_h, grad_w = torch.autograd.grad(loss, (h_s, w_s))
    return loss.detach(), grad_h, grad_w


def fused(h_s, w_s, h_t, w_t, **kwargs):
    h_s, w_s = (x.detach().clone().requires_grad_() for x in (h_s, w_s))
    loss = fused_linear_kl(h_s, w_s, h_t, w_t, **kwargs)
    loss.backward()
    return loss.detach(), h_s.grad, w_s.grad


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def assert_matches_reference(inputs, loss_tol, grad_tol, temperature=1.0, min_kl=0.1, **kwargs):
    ref_loss, ref_gh, ref_gw = reference(*inputs, temperature=temperature)
    loss, grad_h, grad_w = fused(*inputs, temperature=temperature, **kwargs)
    assert torch.isfinite(loss) and ref_loss > min_kl  # a real divergence, not ~0
    assert abs(loss.item() - ref_loss.item()) <= loss_tol * ref_loss.item()
    assert grad_h.dtype == inputs[0].dtype and grad_w.dtype == inputs[1].dtype
    assert rel_err(grad_h, ref_gh) <= grad_tol
    assert rel_err(grad_w, ref_gw) <= grad_tol


def test_naive_kl_is_kl_divergence():
    h_s, w_s, h_t, w_t = make_inputs(n=17, vocab=50, dtype=torch.float64)
    expected = F.kl_div(
        (h_s @ w_s.T / 2.0).log_softmax(-1), (h_t @ w_t.T / 2.0).log_softmax(-1),
        log_target=True, reduction="batchmean",
    )
    torch.testing.assert_close(naive_kl(h_s, w_s, h_t, w_t, temperature=2.0), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_torch_path_float64_is_exact(temperature):
    assert_matches_reference(make_inputs(dtype=torch.float64), 1e-12, 1e-12, temperature, chunk_tokens=64, impl="torch")


@pytest.mark.parametrize("chunk_tokens", [1, 64, 203, None])
def test_torch_path_float32(chunk_tokens):
    # 203 tokens: the last chunk is partial for every chunk size but 1 and 203
    assert_matches_reference(make_inputs(), 1e-5, 1e-5, 1.3, chunk_tokens=chunk_tokens, impl="torch")


def test_torch_path_bfloat16_inputs():
    # On CPU the bf16 inputs are upcast; the only bf16 rounding left is that of the returned gradients.
    assert_matches_reference(make_inputs(dtype=torch.bfloat16), 1e-5, 5e-3, chunk_tokens=50, impl="torch")


def test_upstream_gradient_scales_both_gradients():
    inputs = make_inputs(seed=1)
    _, ref_gh, ref_gw = reference(*inputs)
    h_s, w_s = (x.clone().requires_grad_() for x in inputs[:2])
    (-2.5 * fused_linear_kl(h_s, w_s, *inputs[2:], chunk_tokens=64)).backward()
    assert rel_err(h_s.grad, -2.5 * ref_gh) <= 1e-5
    assert rel_err(w_s.grad, -2.5 * ref_gw) <= 1e-5


def test_gradient_only_for_inputs_that_need_it():
    h_s, w_s, h_t, w_t = make_inputs(seed=2)
    _, ref_gh, _ = reference(h_s, w_s, h_t, w_t)
    h_s.requires_grad_()
    fused_linear_kl(h_s, w_s, h_t, w_t, chunk_tokens=64).backward()
    assert rel_err(h_s.grad, ref_gh) <= 1e-5 and w_s.grad is None


def test_no_grad_gives_the_same_loss():
    inputs = make_inputs(seed=3)
    h_s = inputs[0].clone().requires_grad_()
    with_grad = fused_linear_kl(h_s, *inputs[1:], chunk_tokens=64)
    with torch.no_grad():
        without = fused_linear_kl(h_s, *inputs[1:], chunk_tokens=64)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-6, atol=0)


def test_identical_models_have_zero_kl_and_gradient():
    h, w, _, _ = make_inputs(seed=4)
    loss, grad_h, grad_w = fused(h, w, h, w, chunk_tokens=64)
    assert abs(loss.item()) < 1e-6 and grad_h.abs().max() < 1e-9 and grad_w.abs().max() < 1e-9


def test_student_close_to_teacher():
    """Late in distillation p_s ~ p_t: the gradient p_s - p_t is a small difference of probabilities."""
    h_s, w_s, _, _ = make_inputs(seed=7)
    w_t = w_s + 0.01 * torch.randn(w_s.shape, generator=torch.Generator().manual_seed(8))
    ref_loss = reference(h_s, w_s, h_s, w_t)[0]
    assert 1e-4 < ref_loss < 1e-2  # vs ~2 for independent models
    assert_matches_reference([h_s, w_s, h_s, w_t], 1e-4, 1e-4, chunk_tokens=64, impl="torch", min_kl=1e-4)


def test_auto_chunk_fits_memory_budget():
    # The Stage-2 shape of the issue: 16,384 tokens, Qwen2.5 vocab, hidden 2,048, bf16 gradients.
    chunk = auto_chunk_tokens(16384, 151936, 2048, grad_bytes=2, need_grad_weight=True)
    assert chunk % 128 == 0 and chunk >= 512
    weight_grad = 4 * 151936 * 2048
    buffers = chunk * 151936 * 2 + 2 * (chunk // 4) * 151936 * 4  # dz + two fp32 logit blocks
    assert weight_grad + buffers <= MEMORY_BUDGET_BYTES
    assert auto_chunk_tokens(300, 49152, 576, grad_bytes=2, need_grad_weight=True) == 300


def test_bad_arguments_are_rejected():
    h_s, w_s, h_t, w_t = make_inputs(n=8, vocab=20)
    with pytest.raises(ValueError):
        fused_linear_kl(h_s, w_s, h_t[:4], w_t)
    with pytest.raises(ValueError):
        fused_linear_kl(h_s, w_s, h_t, w_t, temperature=0.0)
    with pytest.raises(ValueError):
        fused_linear_kl(h_s, w_s, h_t, w_t, impl="cuda")


# ---------------------------------------------------------------- Triton kernel, interpreted on CPU


@driver_only
def test_triton_kernel_under_interpreter():
    run_interpreted_tests(__file__)


@interpreted_only
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_interpreted_fused_loss_and_gradients(temperature):
    # vocab 3000 = one full 2048 block + a masked partial one
    inputs = make_inputs(n=40, vocab=3000, hs=16, ht=24, seed=5)
    assert_matches_reference(inputs, 1e-5, 1e-5, temperature, chunk_tokens=16, impl="triton")


@interpreted_only
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_interpreted_row_kernel(grad_dtype):
    """The kernel alone, as on the GPU: fp32 logits in, KL rows in fp32, gradient stored in grad_dtype."""
    from kernels.kl import _kl_rows_triton

    gen = torch.Generator().manual_seed(6)
    z_s, z_t = 3 * torch.randn(7, 2500, generator=gen), 3 * torch.randn(7, 2500, generator=gen)
    ref_dz = torch.empty(7, 2500, dtype=torch.float64)
    ref_kl = _kl_rows_torch(z_s.double(), z_t.double(), ref_dz, 0.8, 1e-3)
    dz = torch.full((7, 2500), float("nan"), dtype=grad_dtype)  # every element must be written
    kl = _kl_rows_triton(z_s, z_t, dz, 0.8, 1e-3)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), ref_kl, rtol=1e-5, atol=1e-5)
    assert rel_err(dz, ref_dz) <= (1e-6 if grad_dtype == torch.float32 else 5e-3)
