"""Score a causal LM on the recall tasks of `distill.recall_tasks`: greedy exact match and log-probabilities.

Greedy exact match is measured under teacher forcing: a sample counts when every answer token is
the model's argmax given everything before it, which is exactly when greedy decoding from the
prompt would write the answer. Only the logits of the answer positions are computed
(`logits_to_keep`), so an 8K-token prompt never materialises [8K x vocab] logits.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from distill.distributed import Runtime
from distill.eval_results import RecallScore
from distill.recall_tasks import RecallSample, RecallTaskSpec


DEPTH_BINS = 4  # the misses are counted per quarter of the filler in which the answer's needle starts


def depth_bin(sample: RecallSample) -> int:
    """The quarter of the filler in which the sample's needle starts: 0 farthest from the question."""
    return min(int(sample.depth * DEPTH_BINS), DEPTH_BINS - 1)


@torch.no_grad()
def answer_logprobs(model: nn.Module, ids: torch.Tensor, answer_lens: list[int],
                    runtime: Runtime) -> tuple[list[float], list[bool], list[bool]]:
    """Per row of `ids` [b, T] whose last answer_lens[i] tokens are the answer: (sum of the answer tokens'
    log-probabilities, whether every answer token is the argmax, whether the first one is)."""
    keep = max(answer_lens) + 1
    with runtime.autocast():
        logits = model(input_ids=ids.to(runtime.device), use_cache=False, logits_to_keep=keep).logits
    logprobs = logits[:, -keep:].float().log_softmax(-1)  # position j predicts the token at T - keep + j + 1
    sums, greedy, first = [], [], []
    for row, n in enumerate(answer_lens):
        targets = ids[row, -n:].to(logprobs.device)
        at = logprobs[row, keep - n - 1 : keep - 1]  # [n, V]
        sums.append(at.gather(-1, targets[:, None]).sum().item())
        right = at.argmax(-1) == targets
        greedy.append(bool(right.all()))
        first.append(bool(right[0]))
    return sums, greedy, first


def score_recall(model: nn.Module, spec: RecallTaskSpec, samples: list[RecallSample], runtime: Runtime,
                 batch_size: int = 1, desc: str | None = None) -> RecallScore:
    """Exact match and mean answer log-probability with and without the needle over `samples`, and where the
    misses are: exact hits per quarter of the filler holding the needle, and first-token hits."""
    started = time.perf_counter()
    hits, first_hits, with_sum, without_sum = 0, 0, 0.0, 0.0
    depth_samples, depth_hits = [0] * DEPTH_BINS, [0] * DEPTH_BINS
    bar = tqdm(total=len(samples), desc=desc or spec.name, unit="sample", leave=False)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        lens = [s.answer_len for s in chunk]
        lp_with, greedy, first = answer_logprobs(model, torch.tensor([s.ids for s in chunk]), lens, runtime)
        lp_without, _, _ = answer_logprobs(model, torch.tensor([s.ids_without for s in chunk]), lens, runtime)
        for sample, hit in zip(chunk, greedy):
            depth = depth_bin(sample)
            depth_samples[depth] += 1
            depth_hits[depth] += hit
        hits += sum(greedy)
        first_hits += sum(first)
        with_sum += sum(lp_with)
        without_sum += sum(lp_without)
        bar.update(len(chunk))
    bar.close()
    n = len(samples)
    return RecallScore(task=spec.kind, context=spec.context, samples=n, exact=hits / n, logprob=with_sum / n,
                       logprob_without=without_sum / n, seconds=time.perf_counter() - started,
                       depth_samples=depth_samples, depth_hits=depth_hits, first_token_hits=first_hits)
