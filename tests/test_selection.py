"""Layer selection: GA-S2 is deterministic and uses shared inputs exactly; baselines; rankings give prefixes."""

from __future__ import annotations

import copy
from contextlib import ExitStack
from dataclasses import replace

import pytest
import torch

from distill.data import DataSpec, prepare_data
from distill.errors import UserError
from distill.distributed import Runtime
from distill.evaluate import EvalSet, heldout_kl
from distill.model.config import LINEAR_ATTENTION
from distill.model.transfer import hybrid_from_teacher, restore_softmax
from distill.placement import uniform_softmax_layers
from distill.selection import (
    Ranking,
    ScoreConfig,
    ranking_agreement,
    ranking_from_scores,
    recall_accuracy,
    recall_task,
    recall_vocabulary,
    clipped_attention,
    local_window_mask,
    score_ablation,
    score_reach,
    score_retrieval,
    score_ga_s1,
    score_ga_s2,
    score_kl_restore,
    uniform_ranking,
    with_reach,
)
from distill.stages import Stage2Config, run_stage1
from distill.train import TrainConfig
from tests.tiny_models import make_teacher, write_word_corpus

CPU = Runtime()
SEQ = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selection")
    teacher, tok = make_teacher("llama", num_layers=4, hidden=48, heads=4, kv_heads=2, seed=3)
    corpus = write_word_corpus(tmp / "corpus.txt", "north south east west up down left right in out on off", docs=50, words_per_doc=70, seed=1)
    data = prepare_data(DataSpec((str(corpus),), SEQ, 4 * SEQ), tok, tmp / "cache")
    stage1 = hybrid_from_teacher(teacher, [LINEAR_ATTENTION] * 4, seed=0)
    run_stage1(teacher, stage1, data, TrainConfig(steps=4, seq_len=SEQ, batch=2, micro_batch=2, lr=1e-2, save_every=100),
               tmp / "s1", CPU)
    return teacher, tok, data, stage1


def score_cfg(steps=3, eval_every=0) -> ScoreConfig:
    train = TrainConfig(steps=steps, seq_len=SEQ, batch=2, micro_batch=1, lr=1e-3, schedule="constant", eval_every=eval_every)
    return ScoreConfig(Stage2Config(train, other_lr=1e-4), eval_batch=2, recall_samples=8, recall_pairs=6)


def test_ga_s2_ranking_is_the_same_run_to_run(setup, tmp_path):
    teacher, _, data, stage1 = setup
    first = score_ga_s2(teacher, stage1, data, score_cfg(eval_every=1), tmp_path / "a", CPU)
    second = score_ga_s2(teacher, stage1, data, score_cfg(eval_every=1), tmp_path / "b", CPU)
    assert first.order == second.order and sorted(first.order) == [0, 1, 2, 3]
    assert first.scores == second.scores  # bit-identical: same data, same order, same seeds
    assert all(len(c) == 4 for c in first.curves.values())  # step 0 + one point per step
    # lower held-out KL = more important, so the order sorts the scores ascending
    assert [first.scores[i] for i in first.order] == sorted(first.scores.values())
    # the stage-1 model the candidates start from is not modified
    assert stage1.config.softmax_layers == []


def test_ga_s2_scores_are_what_a_separate_stage2_run_reaches(setup, tmp_path):
    """The shared teacher outputs and the step-0 prefix shortcut change no number."""
    teacher, _, data, stage1 = setup
    cfg = score_cfg(steps=2)
    ranking = score_ga_s2(teacher, stage1, data, cfg, tmp_path / "score", CPU, layers=[2])
    eval_set = EvalSet.build(teacher, data, 2, CPU)
    candidate = restore_softmax(stage1, teacher, [2])
    kl0 = heldout_kl(candidate, eval_set, CPU)
    assert ranking.curves[2][0][1] == pytest.approx(kl0, rel=1e-5)
    from distill.stages import run_stage2

    log = run_stage2(teacher, candidate, data, replace(cfg.candidate, train=replace(cfg.candidate.train, save_every=0)),
                     tmp_path / "separate", CPU, eval_set)
    assert ranking.scores[2] == pytest.approx(log[-1]["eval_kl"], rel=1e-5)


def test_ga_s2_skips_finished_candidates_on_rerun(setup, tmp_path, monkeypatch):
    teacher, _, data, stage1 = setup
    first = score_ga_s2(teacher, stage1, data, score_cfg(steps=1), tmp_path, CPU)
    import distill.selection as selection

    monkeypatch.setattr(selection, "run_stage2", lambda *a, **k: pytest.fail("a finished candidate ran again"))
    again = score_ga_s2(teacher, stage1, data, score_cfg(steps=1), tmp_path, CPU)
    assert again.scores == first.scores


def test_kl_restore_is_ga_s2_at_step_zero_and_each_score_a_full_forward(setup, tmp_path):
    """The cheap selector trains nothing: its score for layer l is GA-S2's first curve point, which is
    the held-out KL of the Stage-1 model with l restored, computed by a full forward."""
    teacher, _, data, stage1 = setup
    cheap = score_kl_restore(teacher, stage1, data, score_cfg(), tmp_path / "cheap", CPU)
    full = score_ga_s2(teacher, stage1, data, score_cfg(steps=1), tmp_path / "full", CPU)
    eval_set = EvalSet.build(teacher, data, 2, CPU)
    for layer in range(4):
        assert cheap.scores[layer] == pytest.approx(full.curves[layer][0][1], rel=1e-6)
        direct = heldout_kl(restore_softmax(stage1, teacher, [layer]), eval_set, CPU)
        assert cheap.scores[layer] == pytest.approx(direct, rel=1e-5)
    assert [cheap.scores[i] for i in cheap.order] == sorted(cheap.scores.values())
    assert cheap.details["candidate_tokens"] == 0 and stage1.config.softmax_layers == []


def test_ranking_agreement():
    a = ranking_from_scores("ga-s2", {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, True, "kl")
    same = ranking_from_scores("kl-restore", {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}, True, "kl")
    reverse = ranking_from_scores("ga-s1", {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, False, "loss")
    assert ranking_agreement(a, same, 2) == {"k": 2, "top_k": {"ga-s2": [0, 1], "kl-restore": [0, 1]},
                                              "jaccard_top_k": 1.0, "spearman": 1.0}
    opposite = ranking_agreement(a, reverse, 2)
    assert opposite["spearman"] == -1.0 and opposite["jaccard_top_k"] == 0.0
    one_swap = ranking_from_scores("x", {0: 0.1, 1: 0.3, 2: 0.2, 3: 0.4}, True, "kl")  # order 0, 2, 1, 3
    agree = ranking_agreement(a, one_swap, 2)
    assert agree["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15)) and agree["jaccard_top_k"] == pytest.approx(1 / 3)
    assert ranking_agreement(a, uniform_ranking(4), 2)["spearman"] is None


def test_rankings_give_prefixes_and_round_trip(tmp_path):
    ranking = ranking_from_scores("ga-s2", {0: 0.5, 1: 0.2, 2: 0.9, 3: 0.2, 4: 0.1}, True, "kl")
    assert ranking.order == [4, 1, 3, 0, 2]  # ties broken by layer index
    chosen = [ranking.choose(k) for k in range(6)]
    assert chosen[2] == [1, 4] and all(set(chosen[k]) <= set(chosen[k + 1]) for k in range(5))
    ranking.save(tmp_path / "r.json")
    assert Ranking.load(tmp_path / "r.json") == ranking
    higher = ranking_from_scores("ga-s1", {0: 0.5, 1: 0.2, 2: 0.9}, False, "align")
    assert higher.order == [2, 0, 1]
    assert uniform_ranking(30).choose(8) == uniform_softmax_layers(30, 8)


def test_ga_s1_ranks_by_heldout_alignment_loss(setup):
    teacher, _, data, stage1 = setup
    ranking = score_ga_s1(teacher, stage1, EvalSet.build(teacher, data, 2, CPU), CPU)
    assert sorted(ranking.order) == [0, 1, 2, 3] and all(v > 0 for v in ranking.scores.values())
    assert [ranking.scores[i] for i in ranking.order] == sorted(ranking.scores.values(), reverse=True)


def test_recall_task_layout():
    ids, positions, answers = recall_task(list(range(100, 200)), samples=3, pairs=5, seed=0)
    assert ids.shape == (3, 20) and positions.shape == answers.shape == (3, 5)
    for row, pos, ans in zip(ids, positions, answers):
        pairs = dict(zip(row[:10:2].tolist(), row[1:10:2].tolist()))
        assert len(pairs) == 5
        for p, a in zip(pos.tolist(), ans.tolist()):
            assert row[p].item() in pairs and pairs[row[p].item()] == a == row[p + 1].item()


def test_recall_accuracy_of_a_model_that_copies_is_one():
    """An oracle that looks back for the current token and predicts what followed it scores 1."""
    ids, positions, answers = recall_task(list(range(10, 60)), samples=4, pairs=6)

    class Oracle(torch.nn.Module):
        def forward(self, input_ids, **_):
            logits = torch.zeros(*input_ids.shape, 64)
            for b, row in enumerate(input_ids.tolist()):
                for t, tok in enumerate(row):
                    if tok in row[:t]:
                        logits[b, t, row[row.index(tok) + 1]] = 10.0
            return type("Out", (), {"logits": logits})()

    acc, logprob = recall_accuracy(Oracle(), ids, positions, answers, CPU)
    assert acc == 1.0 and logprob > -0.01


def test_ablation_ranks_every_layer(setup, tmp_path):
    teacher, tok, _, _ = setup
    before = copy.deepcopy(teacher.state_dict())
    ranking = score_ablation(teacher, tok, score_cfg(), tmp_path, CPU)
    assert sorted(ranking.order) == [0, 1, 2, 3] and not ranking.lower_is_more_important
    # zeroing a layer's attention changes the answers' log-probability (the tie-break signal)
    assert any(abs(v) > 1e-6 for v in ranking.details["logprob_drop"].values())
    assert len(recall_vocabulary(tok)) >= 64
    # the hooks are gone: the teacher computes what it computed before
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


def test_ablation_on_a_recall_task_scores_the_answers_lost_log_probability(setup, tmp_path):
    teacher, tok, _, _ = setup
    before = copy.deepcopy(teacher.state_dict())
    cfg = replace(score_cfg(), recall_samples=4, retrieval_context=96, ablation_task="passkey")
    ranking = score_ablation(teacher, tok, cfg, tmp_path, CPU)
    assert ranking.selector == "ablation" and sorted(ranking.order) == [0, 1, 2, 3]
    assert ranking.details["task"] == "passkey" and ranking.details["context"] == 96
    assert ranking.metric.startswith("passkey answer log-prob lost")
    pairs = score_ablation(teacher, tok, score_cfg(), tmp_path, CPU)
    assert ranking.scores != pairs.scores and any(abs(v) > 1e-6 for v in ranking.scores.values())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(UserError, match="score.ablation_task='cloze': expected pairs or one of passkey"):
        score_ablation(teacher, tok, replace(cfg, ablation_task="cloze"), tmp_path, CPU)


def test_retrieval_ranks_layers_by_their_strongest_heads_needle_mass(setup):
    teacher, tok, _, _ = setup
    before = copy.deepcopy(teacher.state_dict())
    cfg = replace(score_cfg(), recall_samples=6, retrieval_context=96)
    ranking = score_retrieval(teacher, tok, cfg, CPU)
    assert sorted(ranking.order) == [0, 1, 2, 3] and not ranking.lower_is_more_important
    heads = {int(layer): m for layer, m in ranking.details["head_mass"].items()}
    assert all(len(m) == teacher.config.num_attention_heads and all(0.0 <= x <= 1.0 for x in m) for m in heads.values())
    assert ranking.scores == {layer: max(m) for layer, m in heads.items()}
    assert [ranking.scores[i] for i in ranking.order] == sorted(ranking.scores.values(), reverse=True)
    assert ranking.details["samples"] == 6 and ranking.details["context"] == 96
    assert score_retrieval(teacher, tok, cfg, CPU).scores == ranking.scores  # the prompts come from a seed
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(m._forward_pre_hooks for m in teacher.modules())  # the hooks are gone
    longer = score_retrieval(teacher, tok, replace(cfg, recall_samples=1, retrieval_context=4096), CPU)
    assert longer.details["context"] == teacher.config.max_position_embeddings  # no prompt beyond the teacher's context


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_clipped_attention_sees_only_the_window(family):
    teacher, _ = make_teacher(family, num_layers=2, hidden=32, heads=4, kv_heads=2, seed=5)
    T, window = 48, 8
    ids = torch.randint(0, teacher.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    far = T - 2 * window  # two clipped layers reach 2 x (window - 1) tokens back
    far_changed = ids.clone()
    far_changed[0, :far] = torch.randint(0, teacher.config.vocab_size, (far,), generator=torch.Generator().manual_seed(1))

    def last_logits(x, layers):
        with torch.no_grad(), ExitStack() as stack:
            for layer in layers:
                stack.enter_context(clipped_attention(teacher, layer, local_window_mask(T, window, torch.device("cpu"))))
            return teacher(input_ids=x).logits[0, -1].double()

    # every layer clipped: the last position cannot see the far tokens
    torch.testing.assert_close(last_logits(far_changed, [0, 1]), last_logits(ids, [0, 1]), rtol=0, atol=1e-5)
    assert (last_logits(far_changed, []) - last_logits(ids, [])).abs().max() > 1e-2
    # one layer clipped: the other still reaches back
    assert (last_logits(far_changed, [0]) - last_logits(ids, [0])).abs().max() > 1e-2
    # a window as long as the prompt is the causal mask
    with torch.no_grad(), clipped_attention(teacher, 1, local_window_mask(T, T, torch.device("cpu"))):
        full = teacher(input_ids=ids).logits.double()
    with torch.no_grad():
        torch.testing.assert_close(full, teacher(input_ids=ids).logits.double(), rtol=0, atol=1e-5)
    assert not any(m._forward_pre_hooks for m in teacher.modules())


def test_reach_ranks_layers_by_the_far_needle_logprob_their_clipping_loses(setup, tmp_path):
    teacher, tok, _, _ = setup
    before = copy.deepcopy(teacher.state_dict())
    cfg = replace(score_cfg(), recall_samples=4, retrieval_context=96, reach_window=16)
    ranking = score_reach(teacher, tok, cfg, tmp_path / "a", CPU)
    assert sorted(ranking.order) == [0, 1, 2, 3] and not ranking.lower_is_more_important
    assert [ranking.scores[i] for i in ranking.order] == sorted(ranking.scores.values(), reverse=True)
    assert any(abs(v) > 1e-4 for v in ranking.scores.values())  # clipping a layer changes the answer's log-prob
    details = ranking.details
    assert details["context"] == 96 and details["window"] == 16 and details["samples"] == 4
    assert len(list((tmp_path / "a" / "reach").glob("layer_*.json"))) == 4  # one result per layer: resumable
    assert score_reach(teacher, tok, cfg, tmp_path / "b", CPU).scores == ranking.scores  # prompts from a seed
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(m._forward_pre_hooks for m in teacher.modules())
    with pytest.raises(UserError, match="score.reach_window=32 must be at most a quarter of the passkey prompt"):
        score_reach(teacher, tok, replace(cfg, reach_window=32, retrieval_context=96), tmp_path / "c", CPU)
    implementation = teacher.config._attn_implementation
    teacher.config._attn_implementation = "flash_attention_2"  # an implementation that ignores masks
    try:
        with pytest.raises(UserError, match="attn_implementation='flash_attention_2' ignores"):
            score_reach(teacher, tok, cfg, tmp_path / "d", CPU)
    finally:
        teacher.config._attn_implementation = implementation


def test_reach_on_another_recall_task_scores_its_far_needles(setup, tmp_path):
    """score.reach_task: the same clipping on variable-tracking prompts (the chain's first needle in the farthest
    quarter of the filler)."""
    teacher, tok, _, _ = setup
    cfg = replace(score_cfg(), recall_samples=3, retrieval_context=256, reach_window=32, reach_task="vartrack")
    ranking = score_reach(teacher, tok, cfg, tmp_path / "a", CPU)
    passkey = score_reach(teacher, tok, replace(cfg, reach_task="passkey"), tmp_path / "b", CPU)
    assert sorted(ranking.order) == [0, 1, 2, 3] and ranking.details["task"] == "vartrack"
    assert ranking.metric.startswith("far vartrack answer log-prob lost") and ranking.scores != passkey.scores
    with pytest.raises(UserError, match="score.reach_task='cloze': expected one of passkey, multikey, assoc, vartrack"):
        score_reach(teacher, tok, replace(cfg, reach_task="cloze"), tmp_path / "c", CPU)


def test_with_reach_puts_the_layers_far_recall_needs_first():
    kl = ranking_from_scores("ga-s2", {0: 0.50, 1: 0.51, 2: 0.60, 3: 0.55, 4: 0.70}, True, "held-out KL")
    reach = ranking_from_scores("reach", {0: 0.1, 1: 0.0, 2: 1.6, 3: 0.3, 4: 10.8}, False, "nats lost")
    both = with_reach(kl, reach, threshold=1.0)
    assert both.selector == "ga-s2+reach" and both.order == [4, 2, 0, 1, 3]
    assert both.choose(3) == [0, 2, 4] and kl.choose(3) == [0, 1, 3]
    assert both.details["kept_for_reach"] == [4, 2] and both.scores == kl.scores
    assert with_reach(kl, reach, threshold=100.0).order == kl.order  # nothing far-reaching: the KL ranking as it was
    with pytest.raises(UserError, match="uniform has no ranking"):
        with_reach(uniform_ranking(5), reach, 1.0)
