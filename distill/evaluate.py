"""Held-out KL(teacher || model) and perplexity of any causal LM that shares the teacher's vocabulary.

The held-out blocks and the teacher's final hidden states come from `distill.stages.EvalSet` (built
once per evaluation and shared by every model), and the KL is the same fused full-vocabulary KL
the training stages report (`distill.stages.kl_from_hidden`), so the numbers compare with a
conversion's own `metrics.json`. Perplexity is exp of the mean next-token cross-entropy over the
same blocks, computed in chunks of tokens so that [tokens x vocab] logits are never all in memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from distill.distributed import Runtime
from distill.errors import UserError
from distill.eval_results import HeldoutScore
from distill.stages import EvalSet, kl_from_hidden

CE_CHUNK_TOKENS = 2048


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, torch.Tensor]:
    """(the decoder that returns final normed hidden states, the lm_head weight [V, H])."""
    head = model.get_output_embeddings()
    decoder = model.base_model
    if head is None or decoder is model:
        raise UserError(f"{type(model).__name__} is not a causal LM with a separate decoder and lm_head")
    return decoder, head.weight


def next_token_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor,
                       chunk: int = CE_CHUNK_TOKENS) -> float:
    """Sum over positions 0..T-2 of -log p(ids[t+1] | hidden[t]), logits in float32, chunk by chunk."""
    h = hidden[:, :-1].flatten(0, 1)
    targets = ids[:, 1:].flatten()
    total = 0.0
    for start in range(0, len(h), chunk):
        logits = h[start : start + chunk].float() @ weight.float().T
        total += F.cross_entropy(logits, targets[start : start + chunk], reduction="sum").item()
    return total


@torch.no_grad()
def heldout_scores(model: nn.Module, eval_set: EvalSet, runtime: Runtime, seq_len: int,
                   desc: str = "held-out KL") -> HeldoutScore:
    """Token-weighted KL(teacher || model) and perplexity over the held-out blocks of `eval_set`."""
    decoder, weight = decoder_and_head(model)
    if weight.shape[0] != eval_set.teacher_weight.shape[0]:
        raise UserError(
            f"the model's vocabulary has {weight.shape[0]} entries, the teacher's {eval_set.teacher_weight.shape[0]}; "
            "held-out KL needs a model of the teacher's tokenizer"
        )
    kl_sum, nll_sum, kl_tokens, nll_tokens = 0.0, 0.0, 0, 0
    for ids, h_t in tqdm(list(zip(eval_set.ids, eval_set.teacher_hidden)), desc=desc, unit="batch", leave=False):
        with runtime.autocast():
            h = decoder(input_ids=ids, use_cache=False).last_hidden_state
        kl_sum += kl_from_hidden(h, weight, h_t, eval_set.teacher_weight, runtime.amp_dtype).item() * ids.numel()
        kl_tokens += ids.numel()
        nll_sum += next_token_nll_sum(h, weight, ids)
        nll_tokens += ids.shape[0] * (ids.shape[1] - 1)
    if kl_tokens == 0:
        raise UserError("the held-out set is empty: pass more --data or a smaller --seq-len")
    return HeldoutScore(kl=kl_sum / kl_tokens, perplexity=math.exp(nll_sum / nll_tokens), tokens=kl_tokens,
                        seq_len=seq_len)
