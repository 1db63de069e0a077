"""Held-out evaluation: the held-out set with the teacher's outputs (`EvalSet`, built once and shared
by every evaluation), the fused full-vocabulary KL(teacher || student) the stages train on and report
(`kl_from_hidden`, `heldout_kl`), and KL and perplexity of any causal LM that shares the teacher's
vocabulary (`heldout_scores`, for `hybrid eval`), so its numbers compare with a conversion's own
`metrics.json`. Perplexity is exp of the mean next-token cross-entropy over the
same blocks, computed in chunks of tokens so that [tokens x vocab] logits are never all in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from distill.data import PackedData
from distill.distributed import Runtime
from distill.errors import UserError
from distill.eval_results import HeldoutScore
from distill.model.modeling import HybridForCausalLM
from kernels.kl import fused_linear_kl

CE_CHUNK_TOKENS = 2048


# ---------------------------------------------------------------------------------------------
# Held-out evaluation sets: the teacher's outputs are computed once and reused by every evaluation
# ---------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """This process's share of the held-out blocks with the teacher's final hidden states."""

    ids: list[torch.Tensor]  # [b, T] per batch
    teacher_hidden: list[torch.Tensor]  # [b, T, H] per batch (after the final norm, before lm_head)
    teacher_weight: torch.Tensor  # teacher lm_head weight [V, H]

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, data: PackedData, batch_size: int, runtime: Runtime,
              max_blocks: int | None = None) -> EvalSet:
        blocks = list(data.eval_batches(batch_size, max_blocks))[runtime.rank :: runtime.world]
        ids, hidden = [], []
        for block in blocks:
            block = block.to(runtime.device)
            with runtime.autocast():
                h = teacher.model(input_ids=block, use_cache=False).last_hidden_state
            ids.append(block)
            hidden.append(h)
        return cls(ids, hidden, teacher.lm_head.weight.detach())

    @property
    def num_tokens(self) -> int:
        return sum(b.numel() for b in self.ids)


def kl_from_hidden(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                   teacher_weight: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) from final hidden states [.., H] and lm_head weights."""
    h_s, h_t = student_hidden.flatten(0, -2), teacher_hidden.flatten(0, -2)
    if amp_dtype is not None:
        h_s, student_weight, h_t, teacher_weight = (x.to(amp_dtype) for x in (h_s, student_weight, h_t, teacher_weight))
    return fused_linear_kl(h_s, student_weight, h_t, teacher_weight)


@torch.no_grad()
def heldout_kl(student: HybridForCausalLM, eval_set: EvalSet, runtime: Runtime) -> float:
    """Token-weighted mean KL(teacher || student) over all held-out blocks (all processes)."""
    total, count = 0.0, 0
    was_training = student.training
    student.eval()
    for ids, h_t in zip(eval_set.ids, eval_set.teacher_hidden):
        with runtime.autocast():
            h_s = student.model(input_ids=ids, use_cache=False).last_hidden_state
        kl = kl_from_hidden(h_s, student.lm_head.weight, h_t, eval_set.teacher_weight, runtime.amp_dtype)
        total += kl.item() * ids.numel()
        count += ids.numel()
    student.train(was_training)
    total = runtime.all_reduce_mean(total) * runtime.world
    count = runtime.all_reduce_mean(float(count)) * runtime.world
    return total / max(count, 1)


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
