"""Gated DeltaNet references in plain torch: what every faster path is checked against.

- `naive_recurrent_gated_delta_rule`: a plain per-token loop; run it in float64 as the reference.
- `torch_recurrent_step`: a few tokens of decode in float32.
- `torch_chunk_gated_delta_rule`: the chunked (WY) form; differentiable; the CPU path for prefill and
  training.

Shapes and the rule itself: kernels/gdn.py. The dispatch to fla's and our Triton kernels lives there
too; nothing here imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
