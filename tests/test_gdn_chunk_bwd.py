"""The torch replacements of fla's chunk backward kernels (kernels/gdn_fla.py) against autograd, float64.

fla's kernels themselves need a GPU (bench/gdn_correctness.py checks the whole path there); these tests
check that the two torch functions compute the gradients of fla's chunked forward, written out here in
float64 torch with fla's conventions (base-2 in-chunk cumulative decay g, A = (I + L)^-1 per chunk,
w = A (k beta exp2 g), u = A (v beta), v_new = u - w h, h the state entering each chunk).
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.gdn_fla import chunk_bwd_dqkwg_torch, in_batch_slices, prepare_wy_repr_bwd_torch, temp_bytes_per_sequence

C = 64
LN2 = math.log(2.0)


def _spans(T: int):
    return [(s, min(s + C, T)) for s in range(0, T, C)]


def _inputs(B, T, H, K, V, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q = torch.nn.functional.normalize(r(B, T, H, K), dim=-1)
    k = torch.nn.functional.normalize(r(B, T, H, K), dim=-1)
    v = r(B, T, H, V)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    g_step = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.3
    g = torch.cat([g_step[:, s:e].cumsum(1) for s, e in _spans(T)], 1) / LN2  # fla: base 2, in-chunk
    return q, k, v, beta, g


def _wy(k, v, beta, g):
    """A [B, T, H, C] (row t of its chunk's inverse), w, u — differentiable."""
    B, T, H, _ = k.shape
    A_rows, ws, us = [], [], []
    for s, e in _spans(T):
        kc, vc, bc, gc = (x[:, s:e].movedim(1, 2) for x in (k, v, beta, g))  # [B, H, c, *]
        c = e - s
        decay = torch.exp2(gc[..., :, None] - gc[..., None, :])
        L = (kc @ kc.transpose(-1, -2)) * decay * bc[..., :, None]
        L = L * torch.ones(c, c, dtype=torch.bool).tril(-1)
        A = torch.linalg.inv(torch.eye(c, dtype=k.dtype) + L)
        ws.append(A @ (kc * (bc * torch.exp2(gc))[..., None]))
        us.append(A @ (vc * bc[..., None]))
        A_rows.append(torch.nn.functional.pad(A, (0, C - c)))
    cat = lambda xs: torch.cat(xs, 2).movedim(2, 1)  # noqa: E731
    return cat(A_rows), cat(ws), cat(us)


@pytest.mark.parametrize("T", [64, 100, 192])
def test_prepare_wy_repr_bwd_matches_autograd(T):
    B, H, K, V = 2, 3, 16, 8
    _, k, v, beta, g = _inputs(B, T, H, K, V)
    k, v, beta, g = (x.requires_grad_() for x in (k, v, beta, g))
    A, w, u = _wy(k, v, beta, g)
    dw, du = torch.randn_like(w), torch.randn_like(u)
    torch.autograd.backward([w, u], [dw, du])

    dk, dv, db, dg = prepare_wy_repr_bwd_torch(k.detach(), v.detach(), beta.detach(), g.detach(), A.detach(), dw, du)
    for name, got, ref in (("dk", dk, k.grad), ("dv", dv, v.grad), ("db", db, beta.grad), ("dg", dg, g.grad / LN2)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("T", [64, 100, 192])
def test_chunk_bwd_dqkwg_matches_autograd(T):
    B, H, K, V = 2, 3, 16, 8
    scale = K**-0.5
    q, k, v, beta, g = _inputs(B, T, H, K, V, seed=1)
    _, w, u = _wy(k, v, beta, g)
    q, k, w, u, g = (x.detach().requires_grad_() for x in (q, k, w, u, g))
    h = torch.randn(B, H, K, V, dtype=torch.float64) * 0.5  # initial state
    hs, v_news, outs = [], [], []
    for s, e in _spans(T):
        qc, kc, wc, uc, gc = (x[:, s:e].movedim(1, 2) for x in (q, k, w, u, g))
        h = h.detach().requires_grad_() if not hs else h
        h.retain_grad()
        hs.append(h)
        v_new = uc - wc @ h
        v_new.retain_grad()
        v_news.append(v_new)
        c = e - s
        mask = torch.ones(c, c, dtype=torch.bool).tril()
        decay = torch.where(mask, torch.exp2(gc[..., :, None] - gc[..., None, :]), 0.0)
        outs.append(scale * ((qc * torch.exp2(gc)[..., None]) @ h + ((qc @ kc.transpose(-1, -2)) * decay) @ v_new))
        g_last = gc[..., -1]
        h = h * torch.exp2(g_last)[..., None, None] + (kc * torch.exp2(g_last[..., None] - gc)[..., None]).transpose(-1, -2) @ v_new
    o = torch.cat(outs, 2).movedim(2, 1)
    do = torch.randn_like(o)
    dht = torch.randn_like(h)
    torch.autograd.backward([o, h], [do, dht])

    h_all = torch.stack([x.detach() for x in hs], 1)  # [B, N, H, K, V]: the state entering each chunk
    dh_all = torch.stack([x.grad for x in hs[1:]] + [dht], 1)  # fla's dh: gradient of the state leaving it
    v_new = torch.cat([x.detach() for x in v_news], 2).movedim(2, 1)
    dv = torch.cat([x.grad for x in v_news], 2).movedim(2, 1)
    dq, dk, dw, dg = chunk_bwd_dqkwg_torch(q.detach(), k.detach(), v_new, g.detach(), h_all, dh_all, do, dv, scale)
    for name, got, ref in (("dq", dq, q.grad), ("dk", dk, k.grad), ("dw", dw, w.grad), ("dg", dg, g.grad / LN2)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def _backward_part_args(B, T, H, K, V, seed):
    gen = torch.Generator().manual_seed(seed + 100)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v, beta, g = (x.float() for x in _inputs(B, T, H, K, V, seed=seed))
    A = r(B, T, H, C) * 0.1
    N = -(-T // C)
    h, dh = r(B, N, H, K, V), r(B, N, H, K, V)
    do, dv, dw, du = r(B, T, H, V), r(B, T, H, V), r(B, T, H, K), r(B, T, H, V)
    return ((chunk_bwd_dqkwg_torch, (q, k, v, g, h, dh, do, dv, K**-0.5)),
            (prepare_wy_repr_bwd_torch, (k, v, beta, g, A, dw, du)))


def test_compiled_torch_parts_compute_what_the_eager_ones_do():
    """Training on CUDA runs both functions through torch.compile (BackwardParts.compiled); here inductor's
    CPU backend compiles the same graphs: same results as eager on a partial last chunk."""
    from kernels.compiled import compiled

    for fn, args in _backward_part_args(B=2, T=100, H=3, K=16, V=8, seed=2):
        for got, ref in zip(compiled(fn)(*args), fn(*args)):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_torch_parts_over_batch_slices_compute_what_one_call_does():
    """A stacked Stage 1 hands the torch backward parts every layer's sequences at once; over a memory bound
    they run on slices of the batch (here 7 sequences in 3 slices of 2-3) into outputs allocated once."""
    B, T, H, K, V = 7, 100, 3, 16, 8
    for fn, args in _backward_part_args(B, T, H, K, V, seed=4):
        per_sequence = temp_bytes_per_sequence(args[0], args[2])
        calls = []

        def counted(*a, fn=fn):
            calls.append(a[0].shape[0])
            return fn(*a)

        sliced = in_batch_slices(counted, args, per_sequence, max_bytes=3 * per_sequence)
        assert calls == [2, 3, 2], fn.__name__
        for got, ref in zip(sliced, fn(*args), strict=True):
            assert got.dtype == ref.dtype and got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # summation order only
        calls.clear()
        in_batch_slices(counted, args, per_sequence, max_bytes=B * per_sequence)
        assert calls == [B]  # under the bound: one call, as before


def test_temp_bytes_per_sequence_counts_the_chunks_of_a_partial_last_one():
    q, v = torch.empty(1, 4097, 12, 128), torch.empty(1, 4097, 12, 128)
    per_chunk = 4 * 12 * (3 * 128 * 128 + 8 * 64 * 128)
    assert temp_bytes_per_sequence(q, v) == 65 * per_chunk
