"""How tensor parallelism (`hybrid serve CKPT --vllm-args "--tensor-parallel-size N"`) splits a hybrid over N
GPUs: which heads and which rows of each checkpoint tensor rank r holds, as the vLLM layers that
serve/model.py builds split them, and which N a checkpoint allows. No vLLM import: the suite checks the
arithmetic (tests/test_tp_layout.py) on CPU.

    softmax layer  qkv_proj (QKVParallelLinear): query heads split evenly; KV heads split evenly, or, when
                   N > H_kv, KV head r // (N / H_kv) on rank r (replicated); o_proj (RowParallelLinear): the
                   input columns of the rank's query heads
    GDN layer      in_proj_qkvz, in_proj_ba (MergedColumnParallelLinear): each of q, k, v, z, b, a split
                   evenly; conv1d (mamba_v2_sharded_weight_loader): its q, k and v channel blocks each split
                   evenly; A_log, dt_bias (sharded_weight_loader(0)) split evenly; norm (one weight per head
                   dim) on every rank; out_proj (RowParallelLinear): the input columns of the rank's heads
    MLP            gate_up_proj split by columns, down_proj by rows: N must divide intermediate_size

An even split of a GDN tensor holds the same heads in every one of those tensors, so that each rank runs the
gated delta rule on whole heads and out_proj's partial sums add up, only when N divides the GDN heads. vLLM
checks divisibility tensor by tensor as it builds them (an AssertionError "9 is not divisible by 2" from deep
inside a layer); `check_tensor_parallel` runs first and says what does not divide and which N would.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.model.config import FULL_ATTENTION, LINEAR_ATTENTION

TP_SIZES = (1, 2, 4, 8)  # the sizes a node's GPUs offer


def even_split(total: int, tp: int, rank: int) -> range:
    """vLLM's split of `total` rows over `tp` ranks (its `divide` refuses a remainder)."""
    if total % tp:
        raise ValueError(f"{total} is not divisible by tensor-parallel size {tp}")
    size = total // tp
    return range(rank * size, (rank + 1) * size)


def _rows(heads: range, head_dim: int, offset: int = 0) -> range:
    return range(offset + heads.start * head_dim, offset + heads.stop * head_dim)


@dataclass(frozen=True)
class AttentionShard:
    q_heads: range
    kv_heads: range
    rows: dict[str, range]  # q_proj, k_proj, v_proj rows (and bias entries); o_proj input columns


@dataclass(frozen=True)
class GdnShard:
    heads: range
    rows: dict[str, tuple[range, ...]]  # checkpoint tensor -> its dim-0 rows on this rank (conv1d: q, k, v blocks)
    out_proj_columns: range


def attention_shard(config, tp: int, rank: int) -> AttentionShard:
    d, h_q, h_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    q_heads = even_split(h_q, tp, rank)
    if tp > h_kv:
        kv = rank // (tp // h_kv)
        kv_heads = range(kv, kv + 1)
    else:
        kv_heads = even_split(h_kv, tp, rank)
    q, kv_rows = _rows(q_heads, d), _rows(kv_heads, d)
    return AttentionShard(q_heads, kv_heads, {"q_proj": q, "k_proj": kv_rows, "v_proj": kv_rows, "o_proj": q})


def gdn_shard(config, tp: int, rank: int) -> GdnShard:
    heads_total, dk, dv = config.linear_num_value_heads, config.linear_key_head_dim, config.linear_value_head_dim
    key_dim, value_dim = config.linear_num_key_heads * dk, heads_total * dv
    q, k = even_split(key_dim, tp, rank), even_split(key_dim, tp, rank)
    v = even_split(value_dim, tp, rank)
    per_head = even_split(heads_total, tp, rank)
    conv = (q, range(key_dim + k.start, key_dim + k.stop), range(2 * key_dim + v.start, 2 * key_dim + v.stop))
    rows = {"q_proj": (q,), "k_proj": (k,), "v_proj": (v,), "z_proj": (v,), "a_proj": (per_head,),
            "b_proj": (per_head,), "A_log": (per_head,), "dt_bias": (per_head,), "conv1d": conv}
    return GdnShard(per_head, rows, v)


def tensor_parallel_problems(config, tp: int) -> list[str]:
    """Why `tp` cannot split this checkpoint's heads (empty when it can)."""
    kinds = set(config.layer_types)
    problems = []
    if FULL_ATTENTION in kinds:
        h_q, h_kv = config.num_attention_heads, config.num_key_value_heads
        if h_q % tp:
            problems.append(f"{h_q} query heads")
        if (h_kv % tp) if h_kv >= tp else (tp % h_kv):
            problems.append(f"{h_kv} KV heads (need a multiple of {tp}, or a divisor of it)")
    if LINEAR_ATTENTION in kinds and config.linear_num_value_heads % tp:
        problems.append(f"{config.linear_num_value_heads} GDN heads")
    if config.intermediate_size % tp:
        problems.append(f"MLP width {config.intermediate_size}")
    return problems


def supported_tp_sizes(config, sizes: tuple[int, ...] = TP_SIZES) -> list[int]:
    return [tp for tp in sizes if not tensor_parallel_problems(config, tp)]


def check_tensor_parallel(config, tp: int) -> None:
    problems = tensor_parallel_problems(config, tp)
    if problems:
        raise ValueError(
            f"tensor-parallel size {tp} cannot split this checkpoint: {', '.join(problems)} do not divide by it; "
            f"sizes that do: {supported_tp_sizes(config) or 'none of ' + str(TP_SIZES)}"
        )
