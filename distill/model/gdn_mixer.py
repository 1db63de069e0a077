"""The Gated DeltaNet token mixer that replaces softmax attention in linear layers.

Same function as vLLM's Qwen3-Next GDN layer (so serving reuses it), with the teacher's projections:

    x [B, T, hidden]
      q|k|v = q_proj(x) | k_proj(x) | v_proj(x)           (teacher's W_q, head-wise expanded W_k, W_v)
      q|k|v = SiLU(causal_conv1d(q|k|v))                   (kernel 4, identity at init)
      q, k  = l2norm(q), l2norm(k) per head
      beta  = sigmoid(b_proj(x));  g = -exp(A_log) * softplus(a_proj(x) + dt_bias)
      o     = gated delta rule(q * Dk^-0.5, k, v, g, beta)
      y     = o_proj(RMSNorm(o) * SiLU(z_proj(x)))          (teacher's W_o)

The six input projections keep their own modules (the checkpoint's weight names, which serve/ maps)
but run as one GEMM over their concatenated weights. `gdn_backend` (kernels.gdn.GDN_BACKENDS) picks
the chunked GDN implementation and `gdn_decode_step` (GDN_DECODE_STEPS) the one-token one;
`set_gdn_backend` / `set_gdn_decode_step` set them on every mixer of a model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.model.config import HybridConfig
from distill.model.families import attention_biases
from kernels.compiled import compiled
from kernels.conv import causal_conv1d
from kernels.gdn import GDN_BACKENDS, GDN_DECODE_STEPS, chunk_gated_delta_rule, l2norm, recurrent_gated_delta_rule


def gated_rms_norm(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over each head's output [..., V], times weight and SiLU(gate), in float32; gate's dtype out."""
    o = o.float()
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * o * F.silu(gate.float())).to(gate.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's output, times SiLU(gate)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


def gdn_kernel_inputs(
    conv_in: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    conv_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    num_heads: int,
    head_k_dim: int,
    head_v_dim: int,
) -> tuple[torch.Tensor, ...]:
    """The elementwise chain between the input projections and the gated delta rule.

    conv_in [..., L, conv_dim]: q|k|v of the new tokens, after any cached conv window (L >= T, T = a's
    length); a, b [..., T, H]; conv_weight [conv_dim, W]; A_log, dt_bias [H]. The leading dims are a
    batch [B], or [layers, B] for stacked mixers, whose weights then come per layer: conv_weight
    [layers, 1, 1, conv_dim, W], A_log and dt_bias [layers, 1, 1, H]. Returns
    q, k [..., T, H, K], v [..., T, H, V] and beta [..., T, H] in conv_in's dtype, and the log-decay
    g [..., T, H] in float32. One pure function so that training can run it compiled (fused forward and
    backward kernels instead of ~20 ops; see distill.model.compiled) while decoding and the CPU run the
    same formula eagerly.
    """
    seq_len = a.shape[-2]
    dtype = conv_in.dtype
    key_dim = num_heads * head_k_dim
    qkv = F.silu(causal_conv1d(conv_in, conv_weight)[..., -seq_len:, :])
    q, k, v = qkv.split([key_dim, key_dim, num_heads * head_v_dim], dim=-1)
    q = l2norm(q.unflatten(-1, (num_heads, head_k_dim))).to(dtype)
    k = l2norm(k.unflatten(-1, (num_heads, head_k_dim))).to(dtype)
    v = v.unflatten(-1, (num_heads, head_v_dim)).to(dtype)
    beta = b.float().sigmoid().to(dtype)
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return q, k, v, g, beta


INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "z_proj", "a_proj", "b_proj")  # in their concatenated order


class GatedDeltaNet(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_width = config.linear_conv_kernel_dim
        hidden = config.hidden_size
        qkv_bias, o_bias = attention_biases(config)  # the teacher's, carried over by the weight transfer

        self.q_proj = nn.Linear(hidden, self.key_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.key_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.value_dim, bias=qkv_bias)
        self.z_proj = nn.Linear(hidden, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.b_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_width, groups=self.conv_dim, bias=False)
        self.conv1d.weight.requires_grad_(config.linear_conv_trainable)
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden, bias=o_bias)
        self.gdn_backend = "auto"  # chunked path (prefill, training): kernels.gdn.GDN_BACKENDS
        self.gdn_decode_step = "auto"  # one-token path: kernels.gdn.GDN_DECODE_STEPS
        self.compiled = False  # run the elementwise chains compiled (parallel.compile): distill.model.compiled
        self.reset_gdn_parameters()

    @torch.no_grad()
    def reset_gdn_parameters(self) -> None:
        """Identity conv; Mamba-2 decay init: A ~ U(0, 16), dt log-uniform in [1e-3, 1e-1]."""
        self.conv1d.weight.zero_()
        self.conv1d.weight[:, 0, -1] = 1.0
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log())
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.norm.weight.fill_(1.0)

    def input_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The six input projections as one: weight [conv_dim + value_dim + 2H, hidden] and its bias (the
        teacher's q/k/v bias, zeros for z, a, b) or None."""
        weight = torch.cat([getattr(self, name).weight for name in INPUT_PROJECTIONS])
        if self.q_proj.bias is None:
            return weight, None
        zeros = self.q_proj.bias.new_zeros(self.value_dim + 2 * self.num_heads)
        return weight, torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias, zeros])

    def split_projections(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[..., conv_dim + value_dim + 2H] -> q|k|v, z, a, b."""
        return out.split([self.conv_dim, self.value_dim, self.num_heads, self.num_heads], dim=-1)

    def _input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q|k|v, z, a, b from one GEMM over the six projections' weights (one read of x, no tiny GEMMs)."""
        return self.split_projections(F.linear(x, *self.input_weight()))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """hidden_states [B, T, hidden]; attention_mask: 2-D padding mask [B, T] (1 = token) or None."""
        batch, seq_len, _ = hidden_states.shape
        qkv, z, a, b = self._input_projections(hidden_states)
        pad_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            pad_mask = attention_mask[:, -seq_len:, None]
            qkv = qkv * pad_mask.to(qkv.dtype)

        cache = past_key_values
        has_state = cache is not None and cache.has_previous_state(self.layer_idx)
        if cache is not None:
            # transformers' cache keeps [B, conv_dim, W] and returns the cached window followed by the new inputs
            qkv = cache.update_conv_state(qkv.transpose(1, 2), self.layer_idx, conv_kernel_size=self.conv_width)
            qkv = qkv.transpose(1, 2)
        inputs = compiled(gdn_kernel_inputs) if self.compiled and cache is None else gdn_kernel_inputs
        q, k, v, g, beta = inputs(qkv, a, b, self.conv1d.weight[:, 0], self.A_log, self.dt_bias,
                                  self.num_heads, self.head_k_dim, self.head_v_dim)
        if pad_mask is not None:  # padded positions: k = v = 0 and no decay, so the state is untouched
            g = g * pad_mask.to(g.dtype)

        state = cache.layers[self.layer_idx].recurrent_states[0] if has_state else None
        if state is not None and seq_len == 1:
            o, state = recurrent_gated_delta_rule(q, k, v, g, beta, state, step=self.gdn_decode_step)
        else:
            o, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, backend=self.gdn_backend,
                                              compiled=self.compiled)
        if cache is not None:
            cache.update_recurrent_state(state, self.layer_idx)

        z = z.reshape(batch, seq_len, self.num_heads, self.head_v_dim)
        o = self.norm(o, z).reshape(batch, seq_len, self.value_dim)
        return self.o_proj(o), None


def stacked_gdn_forward(mixers: list[GatedDeltaNet], x: torch.Tensor) -> torch.Tensor:
    """mixers[i](x[i]) for every i, as one batched computation: x [L, B, T, hidden] -> [L, B, T, hidden].

    Stage 1 trains each layer's mixer on its own teacher input, independently of the others. Stacked,
    the L mixers cost one batched GEMM per projection group and one chunked-GDN call over L x B sequences
    instead of L of each: the step was bound by launching kernels, not by running them
    (bench/results/train_throughput.md). The same function as calling each mixer without a cache or a
    padding mask; the mixers share one shape, GDN backend and compile flag (those of mixers[0])."""
    first = mixers[0]
    n_layers, batch, seq_len, _ = x.shape
    heads, k_dim, v_dim = first.num_heads, first.head_k_dim, first.head_v_dim

    def stacked(get) -> torch.Tensor:
        return torch.stack([get(m) for m in mixers])

    weights = [m.input_weight() for m in mixers]
    out = torch.matmul(x.flatten(1, 2), torch.stack([w for w, _ in weights]).transpose(1, 2))  # [L, B*T, N]
    if weights[0][1] is not None:
        out = out + torch.stack([b for _, b in weights]).to(out.dtype)[:, None]
    qkv, z, a, b = first.split_projections(out.unflatten(1, (batch, seq_len)))

    per_layer = (n_layers, 1, 1)  # broadcast over [B, T]
    inputs = compiled(gdn_kernel_inputs) if first.compiled else gdn_kernel_inputs
    q, k, v, g, beta = inputs(qkv, a, b, stacked(lambda m: m.conv1d.weight[:, 0]).view(*per_layer, first.conv_dim, -1),
                              stacked(lambda m: m.A_log).view(*per_layer, heads),
                              stacked(lambda m: m.dt_bias).view(*per_layer, heads), heads, k_dim, v_dim)
    o, _ = chunk_gated_delta_rule(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), g.flatten(0, 1),
                                  beta.flatten(0, 1), backend=first.gdn_backend, compiled=first.compiled)
    norm = compiled(gated_rms_norm) if first.compiled else gated_rms_norm
    o = norm(o.unflatten(0, (n_layers, batch)), z.unflatten(-1, (heads, v_dim)),
             stacked(lambda m: m.norm.weight).view(*per_layer, 1, v_dim), first.norm.eps)  # [L, B, T, H, V]
    y = torch.matmul(o.flatten(-2).flatten(1, 2), stacked(lambda m: m.o_proj.weight).transpose(1, 2))
    if first.o_proj.bias is not None:
        y = y + stacked(lambda m: m.o_proj.bias).to(y.dtype)[:, None]
    return y.unflatten(1, (batch, seq_len))


def _set_on_mixers(model: nn.Module, attribute: str, value: str, allowed: tuple[str, ...], what: str) -> int:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    mixers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    for mixer in mixers:
        setattr(mixer, attribute, value)
    return len(mixers)


def set_gdn_backend(model: nn.Module, backend: str) -> int:
    """Use `backend` (kernels.gdn.GDN_BACKENDS) in every GDN mixer of `model`; returns how many."""
    return _set_on_mixers(model, "gdn_backend", backend, GDN_BACKENDS, "GDN backend")


def set_gdn_decode_step(model: nn.Module, step: str) -> int:
    """Use `step` (kernels.gdn.GDN_DECODE_STEPS) for one-token decode in every GDN mixer; returns how many."""
    return _set_on_mixers(model, "gdn_decode_step", step, GDN_DECODE_STEPS, "GDN decode step")
