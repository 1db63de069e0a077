"""distill.recall_tasks: every task hides its facts, asks for one, ends with the answer; same seed, same samples;
and the scorer (distill.eval_recall) sees the needle's effect on a model that can copy from its context."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.distributed import Runtime
from distill.errors import UserError
from distill.eval_recall import answer_logprobs, score_recall
from distill.recall_tasks import RECALL_KINDS, RecallTaskSpec, build_recall_task
from tests.tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("kind", RECALL_KINDS)
def test_samples_hold_the_answer_needle_and_end_with_the_answer(kind, tokenizer):
    spec = RecallTaskSpec(kind, context=400, samples=6, seed=3)
    samples = build_recall_task(spec, tokenizer)
    assert len(samples) == 6
    for s in samples:
        assert len(s.ids) == len(s.ids_without) == 400
        answer_ids = s.ids[-s.answer_len :]
        assert tokenizer.decode(answer_ids).strip() == s.answer and s.answer.isdigit() and len(s.answer) == 5
        assert tokenizer.decode(answer_ids[:1]).strip()  # the first scored token carries the key, not a bare space
        assert s.ids[-s.answer_len - 5 :] == s.ids_without[-s.answer_len - 5 :]  # same question and answer
        prompt, prompt_without = tokenizer.decode(s.ids[: -s.answer_len]), tokenizer.decode(s.ids_without[: -s.answer_len])
        # the answer is in the context only with its needle (vartrack: the chain's value)
        assert s.answer in prompt and s.answer not in prompt_without
        differ = [i for i, (a, b) in enumerate(zip(s.ids, s.ids_without)) if a != b]
        assert differ and differ[-1] - differ[0] < 64  # one needle (one sentence) was replaced
    # a sample's depth says where its answer's needle starts; with one needle, the two prompts part there, so
    # the depths order the samples as the places where they part do
    assert all(0 <= s.depth <= 1 for s in samples) and len({s.depth for s in samples}) > 1
    if spec.num_needles == 1:
        parts = [next(i for i, (a, b) in enumerate(zip(s.ids, s.ids_without)) if a != b) for s in samples]
        assert [s.depth for _, s in sorted(zip(parts, samples), key=lambda x: x[0])] == sorted(s.depth for s in samples)
    assert len({s.answer for s in samples}) > 1


def test_multikey_keeps_the_distractors_without_the_asked_needle(tokenizer):
    spec = RecallTaskSpec("multikey", context=500, samples=4, seed=0, needles=3)
    for s in build_recall_task(spec, tokenizer):
        with_text, without = tokenizer.decode(s.ids), tokenizer.decode(s.ids_without)
        assert with_text.count("The pass key for the") == 3 + 1  # three needles and the question
        assert without.count("The pass key for the") == 2 + 1


def test_vartrack_chain_appears_in_order(tokenizer):
    spec = RecallTaskSpec("vartrack", context=500, samples=3, seed=1, needles=3)
    for s in build_recall_task(spec, tokenizer):
        text = tokenizer.decode(s.ids)
        first = text.index(f"= {s.answer}.")
        name0 = text[text.rindex("VAR ", 0, first) + 4 : first].strip()
        hop = text.index(f"= {name0}.")
        assert first < hop  # the value is assigned before it is copied


@pytest.mark.parametrize("kind", RECALL_KINDS)
def test_generators_are_deterministic_under_a_seed(kind, tokenizer):
    first = build_recall_task(RecallTaskSpec(kind, 300, samples=5, seed=7), tokenizer)
    again = build_recall_task(RecallTaskSpec(kind, 300, samples=5, seed=7), tokenizer)
    other = build_recall_task(RecallTaskSpec(kind, 300, samples=5, seed=8), tokenizer)
    assert first == again
    assert [s.ids for s in first] != [s.ids for s in other]
    assert [s.answer for s in first] != [s.answer for s in other]


def test_bad_specs_are_clear_errors(tokenizer):
    with pytest.raises(UserError, match="unknown; expected one of passkey"):
        RecallTaskSpec("needle", 512)
    with pytest.raises(UserError, match="samples must be at least 1"):
        RecallTaskSpec("passkey", 512, samples=0)
    with pytest.raises(UserError, match=r"multikey@100: its needles, question and answer take \d+ tokens"):
        build_recall_task(RecallTaskSpec("multikey", 100, samples=1), tokenizer)
    with pytest.raises(UserError, match="at most 20 keys"):
        build_recall_task(RecallTaskSpec("multikey", 4000, samples=1, needles=21), tokenizer)


class LongestMatchCopier(nn.Module):
    """A reference model that copies from its context (an idealised induction head): at each position it
    predicts the token that followed the longest earlier match of the current suffix (log-prob ~0 for it,
    ~-12 for everything else); with no earlier match it predicts uniformly."""

    def __init__(self, vocab: int, max_match: int = 8, window: int | None = None):
        super().__init__()
        self.vocab, self.max_match, self.window = vocab, max_match, window  # window: how far back it can look

    def forward(self, input_ids, use_cache=False, logits_to_keep=0):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        for row in range(b):
            seq = input_ids[row].tolist()
            for pos in range(t - (logits_to_keep or t), t):
                best, nxt = 0, None
                for j in range(max(0, pos - self.window) if self.window else 0, pos):
                    n = 0
                    while n < self.max_match and j - n >= 0 and seq[j - n] == seq[pos - n]:
                        n += 1
                    if n >= best and n > 0:
                        best, nxt = n, seq[j + 1]
                if nxt is not None:
                    logits[row, pos, nxt] = 12.0 * best / self.max_match
        keep = logits_to_keep or t
        return type("Out", (), {"logits": logits[:, -keep:]})()


def test_answer_logprobs_match_a_full_log_softmax(tokenizer):
    """The scorer's log-probabilities against a direct computation over the full logits of a random bigram model."""
    torch.manual_seed(0)
    table = torch.randn(len(tokenizer), len(tokenizer))

    class Bigram(nn.Module):
        def forward(self, input_ids, use_cache=False, logits_to_keep=0):
            logits = table[input_ids]
            return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()

    model = Bigram()
    ids = torch.randint(0, len(tokenizer), (3, 40))
    lens = [2, 5, 1]
    sums, greedy, first = answer_logprobs(model, ids, lens, Runtime())
    full = table[ids].log_softmax(-1)
    for row, n in enumerate(lens):
        expected = sum(full[row, 39 - n + i, ids[row, 40 - n + i]].item() for i in range(n))
        assert sums[row] == pytest.approx(expected, abs=1e-5)
        assert greedy[row] == all(full[row, 39 - n + i].argmax() == ids[row, 40 - n + i] for i in range(n))
        assert first[row] == (full[row, 39 - n].argmax() == ids[row, 40 - n])


def test_continuous_score_is_larger_with_the_needle_for_a_model_that_copies(tokenizer):
    spec = RecallTaskSpec("passkey", context=256, samples=4, seed=0)
    samples = build_recall_task(spec, tokenizer)
    score = score_recall(LongestMatchCopier(len(tokenizer)), spec, samples, Runtime(), batch_size=2)
    assert score.exact == 1.0
    assert score.delta > 5.0  # nats over the answer's tokens
    assert score.logprob > score.logprob_without


def test_misses_are_counted_where_the_needle_is(tokenizer):
    """A copier that sees only the last half of its context finds every needle in the last quarter and none in
    the first; the depth counts add up to the exact match."""
    spec = RecallTaskSpec("passkey", context=256, samples=24, seed=1)
    samples = build_recall_task(spec, tokenizer)
    score = score_recall(LongestMatchCopier(len(tokenizer), window=128), spec, samples, Runtime(), batch_size=4)
    assert sum(score.depth_samples) == 24 and all(n > 0 for n in score.depth_samples)
    assert sum(score.depth_hits) == round(score.exact * 24)
    assert score.exact_by_depth[0] == 0.0 and score.exact_by_depth[-1] == 1.0
    assert score.first_token_hits >= sum(score.depth_hits)


class SpaceThenDigits:
    """A tokenizer that writes " 12345" as a bare space token and one token per character (like SmolLM2)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_a_bare_leading_space_token_stays_in_the_prompt():
    s = build_recall_task(RecallTaskSpec("passkey", 300, samples=1, seed=0), SpaceThenDigits())[0]
    assert s.answer_len == 5 and "".join(map(chr, s.ids[-5:])) == s.answer
    assert "".join(map(chr, s.ids[-25:-5])).endswith("The pass key is ")
