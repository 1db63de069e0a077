"""Chunked GDN forward + backward on CUDA: flash-linear-attention 0.6.0's Triton kernels, with the
backward kernel(s) that are miscompiled on Hopper replaced by chunk-parallel torch code.

fla 0.6.0 raises in its gated `chunk_bwd_dqkwg` on Hopper with 3.4 <= Triton < 3.7.1 (fla #640: a
Triton miscompile of `tl.trans` on a wgmma-layout tile, wrong dk/dg at BK = 64). Every other kernel of
the chain runs on these versions; `_FlaChunkGDN` below is fla's own `ChunkGatedDeltaRuleFunction`
(same kernels, same order, same saved tensors) except that `chunk_bwd_dqkwg` — and optionally
`prepare_wy_repr_bwd`, whose sibling in fla's delta rule was miscompiled at BT = 64 on Hopper (#984) —
are computed by the torch functions here (`chunk_bwd_dqkwg` optionally by our Triton kernel without
`tl.trans` instead, kernels/gdn_dqkwg.py). Both are independent per (batch, head, chunk), so they are
a handful of batched matmuls over all chunks at once, not a loop. The whole path is checked against
the float64 recurrence on the GPU by bench/gdn_correctness.py, and the two torch functions against
autograd on CPU by tests/test_gdn_chunk_bwd.py.

fla's conventions used here: within each chunk of BT tokens, g is the *local* cumulative log-decay in
base 2 (fla multiplies by 1/ln 2 so its kernels can use exp2); gradients with respect to it are taken
as if exp2(g) were exp(G) with G the natural-log cumsum, so `dg` is the gradient for G.
h is the state entering each chunk, [B, NT, H, K, V]; A is (I + strictly-lower(beta k k^T decay))^-1
stored row-wise as [B, T, H, BT].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.compiled import compiled
from kernels.gdn_dqkwg import chunk_bwd_dqkwg_triton

__all__ = ["BackwardParts", "DQKWG_PATHS", "chunk_bwd_dqkwg_torch", "fla_chunk_gdn", "in_batch_slices",
           "prepare_wy_repr_bwd_torch", "temp_bytes_per_sequence"]


DQKWG_PATHS = ("torch", "triton", "fla")
"""Who computes chunk_bwd_dqkwg: `chunk_bwd_dqkwg_torch` below, our Triton kernel without `tl.trans`
(kernels/gdn_dqkwg.py), or fla's own kernel (refused by fla on Hopper with Triton < 3.7.1)."""


@dataclass(frozen=True)
class BackwardParts:
    """Which fla backward kernels run as our code instead: dqkwg one of DQKWG_PATHS, wy_repr True = torch."""

    dqkwg: str = "torch"
    wy_repr: bool = False
    compiled: bool = False  # run the torch parts through torch.compile (fused elementwise around the matmuls)
    # The torch parts hold float32 copies of every chunk and state they touch. A stacked Stage 1 hands them all
    # layers' sequences at once (batch x layers: 112 sequences of 4,096 tokens for Qwen2.5-1.5B at 4 x 4096, ~37 GiB
    # of temporaries by temp_bytes_per_sequence), which ran out of memory on an 80 GB H100
    # (bench/results/train_throughput.md). Sequences are independent, so they run over slices of the batch whose
    # temporaries stay under this many bytes; None: a fifth of the GPU's memory (16 GB on an H100: SmolLM2's
    # stacked 8 x 2048 in one slice, its 64 x 512 in two, Qwen's 4 x 4096 in three). Slicing costs one more
    # write and read of the outputs, so it is kept for steps that need it.
    max_temp_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.dqkwg not in DQKWG_PATHS:
            raise ValueError(f"chunk_bwd_dqkwg path must be one of {DQKWG_PATHS}, got {self.dqkwg!r}")

    def temp_budget(self, device: torch.device) -> int:
        if self.max_temp_bytes is not None:
            return self.max_temp_bytes
        return torch.cuda.get_device_properties(device).total_memory // 5


# ----------------------------------------------------------------------------------------------
# layout helpers: [B, T, H, *] <-> [B, H, N, C, *] in float32, the last chunk padded
# ----------------------------------------------------------------------------------------------


def _chunked(x: torch.Tensor, chunk: int, replicate: bool = False) -> torch.Tensor:
    """[B, T, H, D] or [B, T, H] -> [B, H, N, C, D] / [B, H, N, C] float32; padding is 0, or the last
    valid value (for cumulative decays, so a partial chunk's "last" decay is its last real token's)."""
    B, T, H = x.shape[:3]
    pad = (-T) % chunk
    x = x.float().movedim(1, 2)  # [B, H, T, *]
    if pad:
        if replicate:
            x = torch.cat([x, x[:, :, -1:].expand(*x.shape[:2], pad, *x.shape[3:])], dim=2)
        else:
            x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
    return x.reshape(B, H, -1, chunk, *x.shape[3:])


def _unchunked(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, N, C, *] -> [B, T, H, *] (drops the padding)."""
    B, H = x.shape[:2]
    return x.reshape(B, H, -1, *x.shape[4:])[:, :, :T].movedim(2, 1)


def _causal(chunk: int, device: torch.device, strict: bool) -> torch.Tensor:
    return torch.ones(chunk, chunk, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _decay_matrix(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp2(g_t - g_s) where mask[t, s], else 0 (no overflow where s > t)."""
    diff = g[..., :, None] - g[..., None, :]
    return torch.exp2(torch.where(mask, diff, torch.full_like(diff, float("-inf"))))


# ----------------------------------------------------------------------------------------------
# the two backward pieces
# ----------------------------------------------------------------------------------------------


def chunk_bwd_dqkwg_torch(q, k, v_new, g, h, dh, do, dv, scale: float, chunk: int = 64):
    """fla's `chunk_bwd_dqkwg` (gated, dw): returns dq, dk [B, T, H, K] fp32, dw [B, T, H, K] in
    k's dtype, dg [B, T, H] fp32 (per-token, before the reverse in-chunk cumsum fla applies after).

    With e = exp2(g), per chunk:  dq = e * (do h^T) * scale + ds k,   dk = exp2(g_C - g) (v_new dh^T) + ds^T q,
    ds = (do v_new^T) * exp2(g_t - g_s) [s <= t] * scale,   dw = -dv h^T,
    dg = sum(dq q) - sum(dk k) per token, plus exp2(g_C) sum(h dh) + sum(dk_inter k) on the last token.
    """
    T = q.shape[1]
    qc, kc, vc, doc, dvc = (_chunked(x, chunk) for x in (q, k, v_new, do, dv))
    gc = _chunked(g, chunk, replicate=True)  # [B, H, N, C]
    hc = h.float().movedim(2, 1)  # [B, H, N, K, V]
    dhc = dh.float().movedim(2, 1)
    g_last = gc[..., -1:]  # [B, H, N, 1]

    dq = (doc @ hc.transpose(-1, -2)) * (torch.exp2(gc) * scale)[..., None]
    dk = (vc @ dhc.transpose(-1, -2)) * torch.exp2(g_last - gc)[..., None]
    dw = -(dvc @ hc.transpose(-1, -2))
    dg_last = (hc * dhc).sum((-1, -2)) * torch.exp2(g_last[..., 0]) + (dk * kc).sum((-1, -2))  # [B, H, N]

    ds = (doc @ vc.transpose(-1, -2)) * _decay_matrix(gc, _causal(chunk, q.device, strict=False)) * scale
    dq = dq + ds @ kc
    dk = dk + ds.transpose(-1, -2) @ qc
    dg = (dq * qc).sum(-1) - (dk * kc).sum(-1)  # [B, H, N, C]

    dg_tokens = _unchunked(dg, T).clone()  # [B, T, H]
    last = torch.clamp(torch.arange(1, dg.shape[2] + 1, device=q.device) * chunk, max=T) - 1  # last token per chunk
    dg_tokens.index_add_(1, last, dg_last.movedim(2, 1))
    return _unchunked(dq, T), _unchunked(dk, T), _unchunked(dw, T).to(k.dtype).contiguous(), dg_tokens


def prepare_wy_repr_bwd_torch(k, v, beta, g, A, dw, du, chunk: int = 64):
    """fla's gated `prepare_wy_repr_bwd`: gradients of w = A (k beta exp2(g)), u = A (v beta), with
    A = (I + L)^-1, L = strictly-lower(beta_t k_t.k_s exp2(g_t - g_s)). Returns dk, dv (fp32),
    dbeta, dg (fp32, per token)."""
    T = k.shape[1]
    kc, vc, dwc, duc = (_chunked(x, chunk) for x in (k, v, dw, du))
    bc = _chunked(beta, chunk)
    gc = _chunked(g, chunk, replicate=True)
    Ac = _chunked(A, chunk)  # [B, H, N, C, C], row t = A[t, :]
    e = torch.exp2(gc)
    kbg = kc * (bc * e)[..., None]
    vb = vc * bc[..., None]
    At = Ac.transpose(-1, -2)

    dA = dwc @ kbg.transpose(-1, -2) + duc @ vb.transpose(-1, -2)
    dkbg = At @ dwc
    dvb = At @ duc
    dk = dkbg * (e * bc)[..., None]
    db = (dkbg * kc * e[..., None]).sum(-1) + (dvb * vc).sum(-1)
    dg = (dkbg * kbg).sum(-1)
    dv = dvb * bc[..., None]

    strict = _causal(chunk, k.device, strict=True)
    dA = At @ (torch.where(strict, dA, 0.0) @ At)
    dA = -dA * _decay_matrix(gc, strict)  # zero on and above the diagonal

    dkb = dA @ kc
    db = db + (dkb * kc).sum(-1)
    dk = dk + dkb * bc[..., None] + dA.transpose(-1, -2) @ (kc * bc[..., None])
    AdA = dA * (kc @ kc.transpose(-1, -2)) * bc[..., :, None]
    dg = dg + AdA.sum(-1) - AdA.sum(-2)
    return _unchunked(dk, T), _unchunked(dv, T), _unchunked(db, T), _unchunked(dg, T)


def temp_bytes_per_sequence(q: torch.Tensor, v: torch.Tensor, chunk: int = 64) -> int:
    """About how many bytes of float32 temporaries the torch parts hold per sequence of q [B, T, H, K],
    v [B, T, H, V]: three state-shaped [H, N, K, V] and eight chunk-shaped [H, N, C, max(K, V)] tensors."""
    _, T, H, K = q.shape
    V = v.shape[-1]
    chunks = -(-T // chunk)
    return 4 * H * chunks * (3 * K * V + 8 * chunk * max(K, V))


def in_batch_slices(fn, args: tuple, per_sequence_bytes: int, max_bytes: int) -> tuple[torch.Tensor, ...]:
    """fn(*args) for batch-first tensor args, computed over as few equal slices of the batch as keep
    per_sequence_bytes x slice under max_bytes, into outputs allocated once (no concatenation copy).
    fn must treat sequences independently; non-tensor args pass through."""
    B = next(a for a in args if isinstance(a, torch.Tensor)).shape[0]
    slices = min(B, max(1, -(-B * per_sequence_bytes // max_bytes)))
    if slices == 1:
        return fn(*args)
    bounds = [round(i * B / slices) for i in range(slices + 1)]  # host arithmetic: no device op under capture
    outs: list[torch.Tensor] = []
    for start, stop in zip(bounds, bounds[1:]):
        part = fn(*(a[start:stop] if isinstance(a, torch.Tensor) else a for a in args))
        if not outs:
            outs = [x.new_empty((B, *x.shape[1:])) for x in part]
        for out, x in zip(outs, part):
            out[start:stop] = x
    return tuple(outs)


# ----------------------------------------------------------------------------------------------
# the autograd function over fla's kernels
# ----------------------------------------------------------------------------------------------


class _FlaChunkGDN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, parts: BackwardParts):
        from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd

        g_cum, o, A, final_state, initial_state, _ = chunk_gated_delta_rule_fwd(
            q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state, output_final_state=True,
        )
        ctx.save_for_backward(q, k, v, g_cum, beta, A, initial_state)
        ctx.scale, ctx.parts = scale, parts
        return o.to(q.dtype), final_state

    @staticmethod
    def backward(ctx, do, dht):
        from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
        from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_dv_local
        from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, recompute_w_u_fwd
        from fla.ops.utils import chunk_local_cumsum

        q, k, v, g, beta, A, h0 = ctx.saved_tensors
        scale, parts = ctx.scale, ctx.parts
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        w, u = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, g=g)
        h, v_new, _ = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=g, initial_state=h0, output_final_state=False)
        dv = chunk_bwd_dv_local(q=q, k=k, g=g, do=do, scale=scale)
        dh, dh0, dv = chunk_gated_delta_rule_bwd_dhu(q=q, k=k, w=w, g=g, h0=h0, dht=dht, do=do, dv=dv, scale=scale)
        dqkwg_torch, wy_torch = chunk_bwd_dqkwg_torch, prepare_wy_repr_bwd_torch
        if parts.compiled:
            dqkwg_torch, wy_torch = compiled(dqkwg_torch), compiled(wy_torch)
        per_sequence, budget = temp_bytes_per_sequence(q, v), parts.temp_budget(q.device)
        with torch.autocast(device_type="cuda", enabled=False):
            if parts.dqkwg == "torch":
                dq, dk, dw, dg = in_batch_slices(dqkwg_torch, (q, k, v_new, g, h, dh, do, dv, scale),
                                                 per_sequence, budget)
            elif parts.dqkwg == "triton":
                dq, dk, dw, dg = chunk_bwd_dqkwg_triton(q, k, v_new, g, h, dh, do, dv, scale)
            else:
                dq, dk, dw, dg = chunk_bwd_dqkwg(q=q, k=k, v=v_new, w=w, g=g, h=h, dv=dv, do=do, dh=dh, scale=scale)
            if parts.wy_repr:
                dk2, dv, db, dg2 = in_batch_slices(wy_torch, (k, v, beta, g, A, dw, dv), per_sequence, budget)
            else:
                dk2, dv, db, dg2 = prepare_wy_repr_bwd(k=k, v=v, beta=beta, g=g, A=A, dw=dw, du=dv)
            dk = dk + dk2
            dg = (dg + dg2).contiguous()
        dg = chunk_local_cumsum(dg, chunk_size=64, reverse=True)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, db.to(beta.dtype), None, dh0, None


def fla_chunk_gdn(q, k, v, g, beta, scale: float, initial_state: torch.Tensor | None,
                  parts: BackwardParts = BackwardParts()) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, final_state) through fla's chunk kernels, with the backward kernels `parts` names replaced by ours.
    q, k [B, T, H, K] and v [B, T, H, V] of one 16-bit dtype, g (natural log-decay) fp32, beta in v's dtype."""
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    g = g.float().contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    return _FlaChunkGDN.apply(q, k, v, g, beta, scale, h0, parts)
