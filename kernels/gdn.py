"""Gated DeltaNet (GDN) recurrence: one API, three implementations.

The gated delta rule, per head, with state S in R^{K x V} (fla's layout: [B, H, K, V]):

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

Inputs use fla's "sequence-first" layout: q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H]
(g is the log-decay, <= 0). q and k are expected to be L2-normalised already.

- `naive_recurrent_gated_delta_rule`: a plain per-token loop; run it in float64 as the reference.
- `torch_chunk_gated_delta_rule`: chunked (WY) form in pure torch; differentiable; the CPU path for
  prefill and training.
- `torch_recurrent_step`: one decode step in pure torch.
`chunk_gated_delta_rule` dispatches to flash-linear-attention's Triton kernel on CUDA when fla is
installed; `recurrent_gated_delta_rule` to our decode-step kernel (kernels/gdn_decode.py) on CUDA;
both fall back to the torch implementations elsewhere.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = [
    "l2norm",
    "naive_recurrent_gated_delta_rule",
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_step",
    "chunk_gated_delta_rule",
    "recurrent_gated_delta_rule",
    "fla_available",
]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the same formula as fla and vLLM)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token reference. Returns (o [B, T, H, V], final state [B, H, K, V])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.clone()
    outputs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t] * scale, k[:, t], v[:, t]  # [B, H, K|V]
        S = S * g[:, t].exp()[..., None, None]
        # delta rule: move the value stored under k_t towards v_t by a step beta_t
        v_old = torch.einsum("bhk,bhkv->bhv", k_t, S)
        delta = (v_t - v_old) * beta[:, t, :, None]
        S = S + k_t[..., :, None] * delta[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_t, S))
    return torch.stack(outputs, dim=1), S


def torch_recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A few tokens of decode (T is small, usually 1) in float32; returns (o, new state)."""
    dtype = v.dtype
    o, S = naive_recurrent_gated_delta_rule(
        q.float(), k.float(), v.float(), g.float(), beta.float(), scale, state.float()
    )
    return o.to(dtype), S


def torch_chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule in float32 (WY representation). Returns (o, final state).

    Within a chunk of C tokens, with G the cumulative log-decay and S0 the state entering it:
        U = (I + A)^{-1} (beta V - beta exp(G) K S0),  A[t, s] = beta_t exp(G_t - G_s) k_t.k_s  (s < t)
        O = exp(G) Q S0 + ((Q K^T) * exp(G_t - G_s))_{s <= t} U
        S_C = exp(G_C) S0 + (K * exp(G_C - G))^T U
    """
    dtype = v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    C = chunk_size
    pad = (-T) % C
    # [B, T, H, D] -> [B, H, N, C, D]; padded steps have k = v = 0, g = 0, so they leave the state alone.
    def chunks(x: torch.Tensor) -> torch.Tensor:
        x = x.float().transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(B, H, -1, C, *x.shape[3:])

    q_c, k_c, v_c = chunks(q) * scale, chunks(k), chunks(v)
    g_c, beta_c = chunks(g), chunks(beta)
    G = g_c.cumsum(-1)  # [B, H, N, C]
    decay = G[..., :, None] - G[..., None, :]  # G_t - G_s
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp only where s <= t (there the exponent is <= 0); zero elsewhere, without exp overflow
    decay_ts = torch.where(causal, decay, torch.full_like(decay, float("-inf"))).exp()

    eye = torch.eye(C, dtype=q_c.dtype, device=q.device)
    A = (k_c @ k_c.transpose(-1, -2)) * decay_ts * beta_c[..., :, None]
    A = A * (1 - eye)  # strictly lower triangular
    rhs = torch.cat([v_c * beta_c[..., None], k_c * (beta_c * G.exp())[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    w_v, w_k = solved[..., :V], solved[..., V:]  # U = w_v - w_k S0
    qk = (q_c @ k_c.transpose(-1, -2)) * decay_ts  # [B, H, N, C, C], s <= t
    q_decayed = q_c * G.exp()[..., None]
    k_to_end = k_c * (G[..., -1:] - G).exp()[..., None]  # k_s * exp(G_C - G_s)

    S = q_c.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outputs = []
    for n in range(q_c.shape[2]):
        u = w_v[:, :, n] - w_k[:, :, n] @ S
        outputs.append(q_decayed[:, :, n] @ S + qk[:, :, n] @ u)
        S = S * G[:, :, n, -1, None, None].exp() + k_to_end[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(outputs, dim=2).reshape(B, H, -1, V)[:, :, :T]
    return o.transpose(1, 2).to(dtype), S


@functools.cache
def fla_available() -> bool:
    """True when flash-linear-attention's Triton ops import and a CUDA device exists."""
    if not torch.cuda.is_available():
        return False
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def _fla_backward_blocked() -> bool:
    import triton
    from packaging.version import Version

    return torch.cuda.get_device_capability()[0] >= 9 and Version(triton.__version__) < Version("3.7.1")


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill / training: fla's chunked Triton kernel on CUDA, the torch chunked form elsewhere.

    fla 0.6.0 refuses its chunk backward on Hopper with triton < 3.7.1, so training there takes the
    torch path (slow but correct) until a newer triton is installed."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta))
    if q.is_cuda and fla_available() and not (needs_grad and _fla_backward_blocked()):
        q, k, beta = q.to(v.dtype), k.to(v.dtype), beta.to(v.dtype)  # l2norm under autocast yields fp32
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk

        return fla_chunk(
            q=q, k=k, v=v, g=g.float(), beta=beta, scale=scale,
            initial_state=None if initial_state is None else initial_state.float(),
            output_final_state=True,
        )
    return torch_chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode: our Triton decode-step kernel on CUDA for one token without autograd (it updates the
    state in place, ~1.1-1.35x faster than fla's, see bench/results/kernels.md), fla's fused recurrent
    kernel for other CUDA calls, the torch step elsewhere."""
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta, state))
    if q.is_cuda and q.shape[1] == 1 and not needs_grad:
        from kernels.gdn_decode import gdn_decode_step

        batch = q.shape[0]
        state = state.float().contiguous()
        slots = torch.arange(batch, device=q.device)
        o = gdn_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, slots, scale=scale)
        return o[:, None], state
    if q.is_cuda and fla_available():
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

        return fla_recurrent(
            q=q, k=k, v=v, g=g.float(), beta=beta, scale=scale,
            initial_state=state.float(), output_final_state=True,
        )
    return torch_recurrent_step(q, k, v, g, beta, state, scale=scale)
