"""fla's gated `chunk_bwd_dqkwg` as one Triton kernel with no `tl.trans`, for Hopper with Triton < 3.7.1.

fla 0.6.0 refuses its own kernel on Hopper with 3.4 <= Triton < 3.7.1: Triton miscompiles `tl.trans` of a tile in
the wgmma layout there (fla #640), and the kernel transposes the intra-chunk score matrix that way. The training
path has since computed this step in torch (`kernels.gdn_fla.chunk_bwd_dqkwg_torch`): a dozen float32 batched
matmuls, the largest item of a steady Stage-1 step's profile after the GEMMs themselves
(bench/results/train_throughput.md). This kernel computes the same thing in one pass over bf16 tiles, and every
transposed operand is loaded transposed from memory instead (swapped strides), so no tile is transposed in
registers. The score matrix and its transpose are two dots of the same loaded tiles.

Per (K block, chunk, sequence x head), with e = exp2(g) (g: fla's in-chunk cumulative log-decay in base 2),
t, s token indices of the chunk, C its last real token:

    ds[t, s]  = scale * (do_t . v_s) * exp2(g_t - g_s) for s <= t        (and ds^T from v . do^T, not transposed)
    dq        = scale * e * (do h^T) + ds k
    dk        = exp2(g_C - g) * (v dh^T) + ds^T q
    dw        = -(dv h^T)
    dg[t]     = sum_k dq q - sum_k dk k,  plus on token C: exp2(g_C) sum(h dh) + sum(k * exp2(g_C - g) (v dh^T))

with v = v_new (the values after the delta-rule correction), h the state entering the chunk [K, V], dh the
gradient of the state leaving it. Each K block writes its share of dg; the shares are summed afterwards.
Operands go into `tl.dot` in the inputs' dtype (bf16 in training) with float32 accumulation, as in fla's kernel.
The CPU suite runs it under TRITON_INTERPRET=1 against the torch form (tests/test_gdn_dqkwg.py); the GPU proof is
bench/gdn_correctness.py's `fla-triton-dqkwg` rows.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton
    triton = None

__all__ = ["DEFAULT_CONFIG", "chunk_bwd_dqkwg_triton", "miscompiled_on"]

CHUNK = 64  # fla's chunk size for the gated delta rule

if triton is not None:

    @triton.jit
    def _dqkwg_kernel(
        q_ptr, k_ptr,  # [B, T, H, K]
        v_ptr, do_ptr, dv_ptr,  # [B, T, H, V]  (v: v_new; dv: the gradient of v_new)
        g_ptr,  # [B, T, H] float32
        h_ptr, dh_ptr,  # [B, NT, H, K, V]
        dq_ptr, dk_ptr, dw_ptr,  # [B, T, H, K]
        dg_ptr,  # [NK, B, T, H] float32: each K block's share
        scale,
        B,
        T,
        H: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        BT: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        PRECISION: tl.constexpr,  # "ieee" for float32 operands (tests, numerics checks: not TF32); bf16 ignores it
    ):
        # axis 0 (up to 2^31 programs) takes sequences x heads: a stacked Stage 1 has thousands
        i_bh, i_t, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, hd = i_bh // H, i_bh % H
        NT = tl.cdiv(T, BT)

        t = i_t * BT + tl.arange(0, BT)  # token rows of this chunk
        t_ok = t < T
        cols_k = i_k * BK + tl.arange(0, BK)
        k_ok = cols_k < K
        last = tl.minimum(i_t * BT + BT, T) - 1  # the chunk's last real token

        row_k = ((b * T + t).to(tl.int64) * H + hd) * K  # [BT] offsets of (b, t, hd, 0) in [B, T, H, K]
        row_v = ((b * T + t).to(tl.int64) * H + hd) * V
        state = ((b * NT + i_t).to(tl.int64) * H + hd) * (K * V)  # (b, chunk, hd) in [B, NT, H, K, V]

        g = tl.load(g_ptr + (b * T + t).to(tl.int64) * H + hd, mask=t_ok, other=0.0)
        g_last = tl.load(g_ptr + (b * T + last).to(tl.int64) * H + hd)

        dq = tl.zeros([BT, BK], dtype=tl.float32)  # do h^T
        dk = tl.zeros([BT, BK], dtype=tl.float32)  # v dh^T
        dw = tl.zeros([BT, BK], dtype=tl.float32)  # dv h^T
        ds = tl.zeros([BT, BT], dtype=tl.float32)  # do v^T   [t, s]
        ds_t = tl.zeros([BT, BT], dtype=tl.float32)  # v do^T  [s, t]
        h_dh = tl.zeros([BK], dtype=tl.float32)  # sum over V of h * dh
        dot_ty = q_ptr.dtype.element_ty  # every dot operand in q's dtype (bf16 in training), accumulated in float32
        for i_v in range(0, tl.cdiv(V, BV)):
            cols_v = i_v * BV + tl.arange(0, BV)
            v_ok = cols_v < V
            tv = t_ok[:, None] & v_ok[None, :]  # [BT, BV]
            vt = v_ok[:, None] & t_ok[None, :]  # [BV, BT]
            vk = v_ok[:, None] & k_ok[None, :]  # [BV, BK]
            do = tl.load(do_ptr + row_v[:, None] + cols_v[None, :], mask=tv, other=0.0).to(dot_ty)
            v = tl.load(v_ptr + row_v[:, None] + cols_v[None, :], mask=tv, other=0.0).to(dot_ty)
            dv = tl.load(dv_ptr + row_v[:, None] + cols_v[None, :], mask=tv, other=0.0).to(dot_ty)
            do_tr = tl.load(do_ptr + row_v[None, :] + cols_v[:, None], mask=vt, other=0.0).to(dot_ty)  # [BV, BT]
            v_tr = tl.load(v_ptr + row_v[None, :] + cols_v[:, None], mask=vt, other=0.0).to(dot_ty)
            state_tr = state + cols_k[None, :] * V + cols_v[:, None]  # [BV, BK]: h^T's layout, read transposed
            h_tr = tl.load(h_ptr + state_tr, mask=vk, other=0.0)
            dh_tr = tl.load(dh_ptr + state_tr, mask=vk, other=0.0)
            h_dh += tl.sum(h_tr.to(tl.float32) * dh_tr.to(tl.float32), axis=0)
            h_tr, dh_tr = h_tr.to(dot_ty), dh_tr.to(dot_ty)
            dq = tl.dot(do, h_tr, dq, input_precision=PRECISION)
            dk = tl.dot(v, dh_tr, dk, input_precision=PRECISION)
            dw = tl.dot(dv, h_tr, dw, input_precision=PRECISION)
            ds = tl.dot(do, v_tr, ds, input_precision=PRECISION)
            ds_t = tl.dot(v, do_tr, ds_t, input_precision=PRECISION)

        # exp2(g_t - g_s) where s <= t, both real tokens; -inf elsewhere, so no exponent overflows (t and s index the
        # same chunk: t the rows of ds, s its columns)
        both_real = t_ok[:, None] & t_ok[None, :]
        causal = (t[None, :] <= t[:, None]) & both_real  # [t, s]
        ds = ds * tl.exp2(tl.where(causal, g[:, None] - g[None, :], float("-inf"))) * scale
        causal_tr = (t[:, None] <= t[None, :]) & both_real  # [s, t]
        ds_t = ds_t * tl.exp2(tl.where(causal_tr, g[None, :] - g[:, None], float("-inf"))) * scale

        tk = t_ok[:, None] & k_ok[None, :]
        q = tl.load(q_ptr + row_k[:, None] + cols_k[None, :], mask=tk, other=0.0)
        k = tl.load(k_ptr + row_k[:, None] + cols_k[None, :], mask=tk, other=0.0).to(dot_ty)
        dk_inter = dk * tl.exp2(g_last - g)[:, None]
        dq = dq * (tl.exp2(g) * scale)[:, None] + tl.dot(ds.to(dot_ty), k, input_precision=PRECISION)
        dk = dk_inter + tl.dot(ds_t.to(dot_ty), q, input_precision=PRECISION)

        kf, qf = k.to(tl.float32), q.to(tl.float32)
        dg = tl.sum(dq * qf, axis=1) - tl.sum(dk * kf, axis=1)  # [BT]
        dg_last = tl.exp2(g_last) * tl.sum(h_dh, axis=0) + tl.sum(tl.sum(dk_inter * kf, axis=1), axis=0)
        dg = tl.where(t == last, dg + dg_last, dg)

        tl.store(dq_ptr + row_k[:, None] + cols_k[None, :], dq, mask=tk)
        tl.store(dk_ptr + row_k[:, None] + cols_k[None, :], dk, mask=tk)
        tl.store(dw_ptr + row_k[:, None] + cols_k[None, :], (-dw).to(dw_ptr.dtype.element_ty), mask=tk)
        tl.store(dg_ptr + ((i_k * B + b) * T + t).to(tl.int64) * H + hd, dg, mask=t_ok)


DEFAULT_CONFIG = (64, 64, 8, 2)  # (BK, BV, num_warps, num_stages), capped at the head sizes


def miscompiled_on(capability: tuple[int, int], triton_version: str, block_k: int, num_warps: int) -> str | None:
    """Why this launch shape is known to give wrong results on this GPU and Triton, or None.

    On an H100 with Triton 3.6, 32-wide K blocks with 4 warps gave dk 30 % and dg 24 % off at one shape and an illegal
    address at another (bench/results/dqkwg_triton_h100/); 8 warps, or 64-wide K blocks, were right at both.
    Public reports place the same fault (several dots, 32-wide tiles, 4 warps, Hopper) in Triton 3.6 and 3.7.1 and
    not in 3.5.1 (triton-lang/triton #10486, #11366), so it is refused on Hopper from Triton 3.6 on."""
    from packaging.version import Version

    if capability[0] == 9 and Version(triton_version) >= Version("3.6.0") and block_k < 64 and num_warps < 8:
        return (f"BK={block_k} with {num_warps} warps miscompiles on Hopper with Triton {triton_version} "
                "(wrong dk and dg, or an illegal address): use 8 warps or BK=64")
    return None


def chunk_bwd_dqkwg_triton(q, k, v_new, g, h, dh, do, dv, scale: float, chunk: int = CHUNK,
                           config: tuple[int, int, int, int] = DEFAULT_CONFIG):
    """Drop-in for `kernels.gdn_fla.chunk_bwd_dqkwg_torch` (same arguments and outputs): dq, dk [B, T, H, K]
    float32, dw [B, T, H, K] in k's dtype, dg [B, T, H] float32 (per token, before fla's reverse in-chunk cumsum).
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. `config`: (BK, BV, num_warps, num_stages)
    (bench/kernels_bench.py --sections dqkwg sweeps it)."""
    if triton is None:
        raise RuntimeError("chunk_bwd_dqkwg_triton needs triton")
    if chunk != CHUNK:
        raise ValueError(f"the kernel's chunk is {CHUNK} tokens (fla's), got {chunk}")
    B, T, H, K = q.shape
    V = v_new.shape[-1]
    NT = triton.cdiv(T, chunk)
    if h.shape != (B, NT, H, K, V) or dh.shape != h.shape:
        raise ValueError(f"expected h and dh [B, NT, H, K, V] = {(B, NT, H, K, V)}, "
                         f"got {tuple(h.shape)}, {tuple(dh.shape)}")
    q, k, v_new, do, dv, h, dh = (x.contiguous() for x in (q, k, v_new, do, dv, h, dh))
    g = g.float().contiguous()
    block_k, block_v, num_warps, num_stages = config
    BK = min(block_k, triton.next_power_of_2(K))
    BV = min(block_v, triton.next_power_of_2(V))
    NK = triton.cdiv(K, BK)
    if q.is_cuda and (why := miscompiled_on(torch.cuda.get_device_capability(q.device), triton.__version__, BK,
                                           num_warps)):
        raise ValueError(why)
    dq = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
    dk = torch.empty_like(dq)
    dw = torch.empty(B, T, H, K, dtype=k.dtype, device=q.device)
    dg = torch.empty(NK, B, T, H, dtype=torch.float32, device=q.device)
    _dqkwg_kernel[(B * H, NT, NK)](
        q, k, v_new, do, dv, g, h, dh, dq, dk, dw, dg, scale, B, T,
        H=H, K=K, V=V, BT=chunk, BK=BK, BV=BV, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dw, dg.sum(0)
