"""One Gated DeltaNet decode step for a batch of sequences, updating vLLM-style state-cache rows in place.

For each sequence b (state row s = slot_idx[b]) and head h, with S = state_cache[s, h]  [K, V]:

    S <- exp(g) S                                 (decay)
    S <- S + k (beta (v - k^T S))^T               (delta rule: move the value stored under k towards v)
    o  = S^T (scale q)

which is `kernels.gdn_reference.naive_recurrent_gated_delta_rule` for one token. q and k must already be
L2-normalised. The state cache is [num_slots, H, K, V] in fp32 or bf16 (the per-slot stride may be
larger than H*K*V, as in a view of a shared pool). A negative slot (vLLM's PAD_SLOT_ID = -1, used to
pad batches for CUDA graphs) leaves the cache alone and yields o = 0.

Decode is bandwidth-bound: per (sequence, head) the K x V state is read and written once, while
q, k, v and o are K + 2V numbers. The Triton kernel gives each program one (sequence, head, V-tile):
it streams the [K, BV] state tile through registers once (read, update in fp32, write back) and
keeps everything else in registers. The grid is 1-D, B * H * V / BV programs (axis 0 allows 2^31),
and all pointer offsets are int64, so no batch size overflows the launch.
"""

from __future__ import annotations

import torch

from kernels.gdn_reference import torch_recurrent_step

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton still get the torch path
    triton = None

__all__ = ["gdn_decode_step", "decode_launch_config"]


# ----------------------------------------------------------------------------------------------
# torch path (CPU, or any device): gather rows, step, scatter back
# ----------------------------------------------------------------------------------------------


def _gdn_decode_step_torch(q, k, v, g, beta, state_cache, slot_idx, scale):
    o = torch.zeros_like(v)  # [B, H, V]
    live = (slot_idx >= 0).nonzero().squeeze(1)  # batch entries with a real slot
    slots = slot_idx[live].long()
    step = [x[live].unsqueeze(1) for x in (q, k, v, g, beta)]  # T = 1
    o_live, new_state = torch_recurrent_step(*step, state_cache[slots], scale=scale)
    state_cache[slots] = new_state.to(state_cache.dtype)
    o[live] = o_live[:, 0]
    return o


# ----------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _gdn_decode_kernel(
        q_ptr,  # [B, H, K]
        k_ptr,  # [B, H, K]
        v_ptr,  # [B, H, V]
        g_ptr,  # [B, H]
        beta_ptr,  # [B, H]
        state_ptr,  # [num_slots, H, K, V], rows slot_idx updated in place
        slot_ptr,  # [B] int32 / int64
        o_ptr,  # [B, H, V]
        stride_slot,
        scale,
        H: tl.constexpr,
        K: tl.constexpr,
        V: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
    ):
        # V tiles of one head are neighbours in launch order, so programs running together share
        # the cache lines and DRAM pages of that head's state.
        pid = tl.program_id(0).to(tl.int64)
        bh = pid // tl.cdiv(V, BV)  # b * H + h
        cols = (pid % tl.cdiv(V, BV)) * BV + tl.arange(0, BV)  # value columns of this tile
        rows = tl.arange(0, BK)
        mask_v = cols < V
        mask_k = rows < K

        # A padded batch entry (slot < 0) reads nothing, writes no state and outputs 0.
        slot = tl.load(slot_ptr + bh // H).to(tl.int64)
        live = (cols * 0 + slot) >= 0  # [BV], all equal
        state_tile = (
            state_ptr + tl.maximum(slot, 0) * stride_slot + (bh % H) * (K * V) + rows[:, None] * V + cols[None, :]
        )  # [BK, BV] pointers
        mask_s = mask_k[:, None] & (mask_v & live)[None, :]
        S = tl.load(state_tile, mask=mask_s, other=0.0).to(tl.float32)

        q = tl.load(q_ptr + bh * K + rows, mask=mask_k, other=0.0).to(tl.float32) * scale
        k = tl.load(k_ptr + bh * K + rows, mask=mask_k, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + bh * V + cols, mask=mask_v, other=0.0).to(tl.float32)
        decay = tl.exp(tl.load(g_ptr + bh).to(tl.float32))
        beta = tl.load(beta_ptr + bh).to(tl.float32)

        S = S * decay
        delta = (v - tl.sum(S * k[:, None], axis=0)) * beta  # [BV]
        S = S + k[:, None] * delta[None, :]
        o = tl.sum(S * q[:, None], axis=0)  # [BV]

        tl.store(state_tile, S.to(state_ptr.dtype.element_ty), mask=mask_s)
        o = tl.where(live, o, 0.0)
        tl.store(o_ptr + bh * V + cols, o.to(o_ptr.dtype.element_ty), mask=mask_v)


def decode_launch_config(batch_heads: int, value_dim: int, state_bytes: int) -> tuple[int, int]:
    """(BV, num_warps) for B*H (sequence, head) pairs and a state of `state_bytes` per element.

    From a sweep of BV x warps on an H100 at 32 heads x 128 x 128 (bench/results/kernels.md): small
    batches (B <= 4 fp32, B <= 16 bf16) are latency-bound and want many programs with 64-byte tile
    rows; above that, 64-column tiles with 2 warps (fp32: 90-99% of copy bandwidth from B = 32).
    An evict-first hint on the state loads did not help (an earlier sweep).
    """
    small = batch_heads <= (128 if state_bytes >= 4 else 512)
    block_v = 64 // state_bytes if small else 64
    return min(block_v, triton.next_power_of_2(value_dim)), 2


def _gdn_decode_step_triton(q, k, v, g, beta, state_cache, slot_idx, scale, block_v=None, num_warps=None):
    B, H, K = q.shape
    V = v.shape[-1]
    if state_cache.stride()[1:] != (K * V, V, 1):
        raise ValueError("state_cache must be contiguous within a slot ([H, K, V] row-major)")
    q, k, v, g, beta, slot_idx = (x.contiguous() for x in (q, k, v, g, beta, slot_idx))
    o = torch.empty_like(v)
    if block_v is None or num_warps is None:
        block_v, num_warps = decode_launch_config(B * H, V, state_cache.element_size())
    grid = (B * H * triton.cdiv(V, block_v),)
    _gdn_decode_kernel[grid](
        q, k, v, g, beta, state_cache, slot_idx, o, state_cache.stride(0), scale,
        H=H, K=K, V=V, BK=triton.next_power_of_2(K), BV=block_v, num_warps=num_warps,
    )
    return o


def gdn_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_cache: torch.Tensor,
    slot_idx: torch.Tensor,
    scale: float | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """One decode token for each of B sequences; returns o [B, H, V] and updates state_cache in place.

    q, k [B, H, K] (L2-normalised), v [B, H, V], g (log-decay <= 0) and beta [B, H],
    state_cache [num_slots, H, K, V] fp32 or bf16, slot_idx [B] int32/int64 (rows of state_cache;
    negative = padding). Arithmetic is fp32 whatever the dtypes. impl: "auto" (Triton on CUDA,
    torch elsewhere), "torch", or "triton" (on CPU tensors only under TRITON_INTERPRET=1).
    """
    B, H, K = q.shape
    if k.shape != (B, H, K) or v.shape[:2] != (B, H) or g.shape != (B, H) or beta.shape != (B, H):
        raise ValueError("expected q, k [B, H, K], v [B, H, V], g, beta [B, H]")
    if state_cache.shape[1:] != (H, K, v.shape[-1]) or slot_idx.shape != (B,):
        raise ValueError("expected state_cache [num_slots, H, K, V] and slot_idx [B]")
    scale = K**-0.5 if scale is None else scale
    if impl == "auto":
        impl = "triton" if q.is_cuda and triton is not None else "torch"
    if impl == "triton":
        return _gdn_decode_step_triton(q, k, v, g, beta, state_cache, slot_idx, scale)
    if impl == "torch":
        return _gdn_decode_step_torch(q, k, v, g, beta, state_cache, slot_idx, scale)
    raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
