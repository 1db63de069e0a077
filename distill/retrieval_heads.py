"""Retrieval heads: how much attention each softmax head puts on a recall prompt's needle.

A head's *needle mass* on a passkey prompt (`distill.recall_tasks`) is the attention probability that the
position predicting the answer's first token puts on the needle's tokens: 0 when the head looks elsewhere, 1
when it looks only at the needle. Heads with a high mass are the model's retrieval heads. The mass is
recomputed from one query row per layer inside a forward pre-hook, so a long prompt never holds a [T x T]
attention matrix and any attention implementation (SDPA, flash) can run the forward. Used by the `retrieval`
layer selector (`distill.selection.score_retrieval`) and by `bench/retrieval_heads.py`'s report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from distill.distributed import Runtime
from distill.eval_recall import depth_bin
from distill.recall_tasks import RecallSample


def softmax_attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """layer index -> its softmax attention module (every layer of a transformers model, a hybrid's softmax ones)."""
    return {i: layer.self_attn for i, layer in enumerate(model.model.layers) if hasattr(layer, "self_attn")}


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [b, heads, t, d] with cos/sin [b, t, d] (the half-split layout of Llama/Qwen)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def needle_mass(attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query: int,
                needle: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of position `query` summed over the key positions `needle`, per head: [b, heads].

    hidden [b, T, H] is the attention block's input; cos/sin [b, T, d] its rotary tables. Recomputes only the
    one query row, in float32 at least, the way the family's attention does (q/k norms where it has them, GQA)."""
    b, T, _ = hidden.shape
    d = attn.head_dim
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    hidden, cos, sin = hidden.to(dtype), cos.to(dtype), sin.to(dtype)
    q = attn.q_proj(hidden[:, query : query + 1]).view(b, 1, -1, d).transpose(1, 2)  # [b, heads, 1, d]
    k = attn.k_proj(hidden).view(b, T, -1, d).transpose(1, 2)  # [b, kv_heads, T, d]
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = _rotate(q, cos[:, query : query + 1], sin[:, query : query + 1])
    k = _rotate(k, cos, sin).repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [b, heads, T, d]
    scores = (q @ k.transpose(-1, -2)).squeeze(2)[..., : query + 1] * attn.scaling  # [b, heads, query + 1]
    return scores.softmax(-1)[..., needle].sum(-1)


@dataclass
class SampleMass:
    depth: int  # quarter of the filler in which the needle starts, 0 = farthest from the question
    hit: bool  # the model's greedy first answer token is right (the hybrids' misses are whole-answer misses too)
    mass: dict[int, list[float]]  # layer -> needle mass per head


@torch.no_grad()
def measure(model: nn.Module, samples: list[RecallSample], runtime: Runtime, desc: str) -> list[SampleMass]:
    """Needle mass of every softmax head for each sample, with the sample's depth and whether it was recalled."""
    layers = softmax_attention_layers(model)
    out = []
    for sample in tqdm(samples, desc=desc, unit="sample", leave=False):
        ids = torch.tensor([sample.ids], device=runtime.device)
        query = len(sample.ids) - sample.answer_len - 1  # the position whose next token is the answer's first
        needle = torch.tensor([i for i, (a, b) in enumerate(zip(sample.ids, sample.ids_without)) if a != b],
                              device=runtime.device)
        found: dict[int, list[float]] = {}

        def hook(layer: int):
            def capture(module, args, kwargs):
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                cos, sin = kwargs["position_embeddings"]
                found[layer] = needle_mass(module, hidden, cos, sin, query, needle)[0].tolist()
            return capture

        handles = [attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, attn in layers.items()]
        try:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=sample.answer_len + 1).logits
        finally:
            for handle in handles:
                handle.remove()
        hit = logits[0, 0].argmax().item() == sample.ids[query + 1]
        out.append(SampleMass(depth_bin(sample), bool(hit), found))
    return out


def mean_mass(rows: list[SampleMass]) -> dict[int, list[float]]:
    """layer -> needle mass per head, averaged over `rows` (empty without rows)."""
    if not rows:
        return {}
    return {layer: torch.tensor([r.mass[layer] for r in rows]).mean(0).tolist() for layer in rows[0].mass}


def layer_scores(per_head: dict[int, list[float]]) -> dict[int, float]:
    """A layer's retrieval score: the needle mass of its strongest head."""
    return {layer: max(masses) for layer, masses in per_head.items()}
