"""Stages 1-3 and the training loop on tiny random teachers (real components, a few steps each)."""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import pytest
import torch

from distill.data import DataSpec, prepare_data
from distill.distributed import ParallelConfig, Runtime
from distill.errors import UserError
from distill.evaluate import EvalSet, heldout_kl
from distill.model.config import LINEAR_ATTENTION
from distill.model.transfer import hybrid_from_teacher, restore_softmax
from distill.selection import final_hidden_from_layer
from distill.stages import (
    Stage2Config,
    capture_attention,
    describe_stage1_mixers,
    run_stage1,
    run_stage2,
    run_stage3,
    stacks_mixers,
    stage2_param_groups,
)
from distill.train import TrainConfig, lr_factor, read_log, train
from tests.tiny_models import make_teacher, write_word_corpus

CPU = Runtime()
SEQ = 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    teacher, tok = make_teacher("qwen2", num_layers=3, hidden=64, heads=4, kv_heads=2, seed=1)
    corpus = write_word_corpus(tmp / "corpus.txt", "one two three four five six seven eight nine ten red green blue cat dog fox", docs=60, words_per_doc=80, seed=0)
    data = prepare_data(DataSpec((str(corpus),), SEQ, 4 * SEQ), tok, tmp / "cache")
    eval_set = EvalSet.build(teacher, data, 2, CPU)
    return teacher, tok, data, eval_set


def all_linear(teacher, seed=0):
    return hybrid_from_teacher(teacher, [LINEAR_ATTENTION] * teacher.config.num_hidden_layers, seed=seed)


def test_capture_attention_taps_each_blocks_input_and_output(setup):
    teacher, _, data, _ = setup
    ids = data.train_batch([0, 1])
    inputs, outputs = capture_attention(teacher, ids)
    assert inputs.shape == outputs.shape == (3, *ids.shape, teacher.config.hidden_size)
    layer0 = teacher.model.layers[0]
    x0 = layer0.input_layernorm(teacher.model.embed_tokens(ids))
    torch.testing.assert_close(inputs[0], x0)
    # the tapped output is what the block computes from the tapped input
    pos = torch.arange(SEQ)[None]
    pe = teacher.model.rotary_emb(x0, pos)
    mask = torch.full((SEQ, SEQ), float("-inf")).triu(1)[None, None]
    for i, (x, y) in enumerate(zip(inputs, outputs)):
        out, _ = teacher.model.layers[i].self_attn(hidden_states=x, position_embeddings=pe, attention_mask=mask)
        torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-4)


def test_a_partial_capture_taps_the_chosen_layers_of_a_hybrid_and_stops_after_them(setup):
    teacher, _, data, _ = setup
    ids = data.train_batch([0, 1])
    full_in, full_out = capture_attention(teacher, ids)
    inputs, outputs = capture_attention(teacher, ids, [1, 0])
    torch.testing.assert_close(inputs, full_in[[1, 0]], atol=0, rtol=0)
    torch.testing.assert_close(outputs, full_out[[1, 0]], atol=0, rtol=0)
    # a hybrid's softmax layers are tapped the same way; the layers after the deepest one never run
    hybrid = restore_softmax(all_linear(teacher), teacher, [1])
    ran = []
    hook = hybrid.model.layers[2].register_forward_hook(lambda *_: ran.append(2))
    inputs, outputs = capture_attention(hybrid, ids, [1])
    hook.remove()
    assert ran == [] and inputs.shape == (1, *ids.shape, teacher.config.hidden_size)
    x1 = hybrid.model.layers[0](hybrid.model.embed_tokens(ids), hybrid.model.rotary_emb(full_in[0], torch.arange(SEQ)[None]))
    torch.testing.assert_close(inputs[0], hybrid.model.layers[1].input_layernorm(x1), atol=1e-5, rtol=1e-4)


def test_restoring_every_layer_gives_back_the_teacher(setup):
    teacher, _, data, eval_set = setup
    hybrid = restore_softmax(all_linear(teacher), teacher, [0, 1, 2])
    ids = data.train_batch([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(hybrid(ids, use_cache=False).logits, teacher(ids).logits, atol=1e-5, rtol=1e-5)
    assert heldout_kl(hybrid, eval_set, CPU) < 1e-6
    assert hybrid.config.softmax_layers == [0, 1, 2]


def test_forward_from_layer_matches_the_full_forward(setup):
    teacher, _, data, _ = setup
    hybrid = restore_softmax(all_linear(teacher), teacher, [1])
    ids = data.train_batch([2, 3])
    with torch.no_grad():
        out = hybrid.model(ids, use_cache=False, output_hidden_states=True)
        for start in range(3):
            torch.testing.assert_close(final_hidden_from_layer(hybrid, out.hidden_states[start], start),
                                       out.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_stage1_trains_only_mixers_and_lowers_alignment_loss(setup, tmp_path):
    teacher, _, data, eval_set = setup
    student = all_linear(teacher)
    before = copy.deepcopy(student.state_dict())
    cfg = TrainConfig(steps=12, seq_len=SEQ, batch=2, micro_batch=1, lr=3e-3, save_every=100)
    log = run_stage1(teacher, student, data, cfg, tmp_path, CPU, eval_set)
    assert len(log) == 12 and "eval_align_layers" in log[-1]
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".linear_attn." in k for k in changed)
    assert not any(".mlp." in k or "embed" in k or "norm.weight" == k.split("layers.")[-1] for k in changed)
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])


def test_kl_falls_from_stage0_to_stage1_to_stage2(setup, tmp_path):
    teacher, _, data, eval_set = setup
    stage0 = all_linear(teacher)
    stage1 = copy.deepcopy(stage0)
    run_stage1(teacher, stage1, data, TrainConfig(steps=15, seq_len=SEQ, batch=2, micro_batch=2, lr=1e-2, save_every=100),
               tmp_path / "s1", CPU)
    chosen = [1]
    kl0 = heldout_kl(restore_softmax(stage0, teacher, chosen), eval_set, CPU)
    hybrid = restore_softmax(stage1, teacher, chosen)
    kl1 = heldout_kl(hybrid, eval_set, CPU)
    cfg = Stage2Config(TrainConfig(steps=15, seq_len=SEQ, batch=2, micro_batch=2, lr=1e-3, schedule="constant",
                                   save_every=100), other_lr=1e-4)
    log = run_stage2(teacher, hybrid, data, cfg, tmp_path / "s2", CPU, eval_set)
    kl2 = log[-1]["eval_kl"]
    assert kl2 == pytest.approx(heldout_kl(hybrid, eval_set, CPU), rel=1e-6)
    assert kl0 > 1.1 * kl1 > 0 and kl1 > 1.1 * kl2 > 0, (kl0, kl1, kl2)


def test_activation_checkpointing_changes_no_number(setup, tmp_path):
    """Stage 2 with every decoder layer recomputed in backward ends with the same weights, and the
    model is left without the recomputation hooks."""
    teacher, _, data, _ = setup
    base = restore_softmax(all_linear(teacher), teacher, [1])
    cfg = Stage2Config(TrainConfig(steps=3, seq_len=SEQ, batch=2, micro_batch=1, lr=1e-3, schedule="constant",
                                   save_every=0))
    plain, recomputed = copy.deepcopy(base), copy.deepcopy(base)
    run_stage2(teacher, plain, data, cfg, tmp_path / "plain", CPU)
    checkpointing = replace(CPU, parallel=ParallelConfig(activation_checkpointing=True))
    run_stage2(teacher, recomputed, data, cfg, tmp_path / "recomputed", checkpointing)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.equal(a, b), name
    assert not any("forward" in vars(layer) for layer in recomputed.model.layers)


def test_stage1_stacked_mixers_train_as_mixer_by_mixer(setup, tmp_path):
    """`parallel.stack_mixers=on` runs Stage 1's mixers stacked (one batched computation; what CUDA runs by
    default), `off` one by one (the CPU's default). Same losses and weights, to float32 rounding of a batched GEMM."""
    teacher, _, data, eval_set = setup
    cfg = TrainConfig(steps=4, seq_len=SEQ, batch=2, micro_batch=1, lr=3e-3, save_every=0)
    stacked, one_by_one = all_linear(teacher), all_linear(teacher)
    stacked_log = run_stage1(teacher, stacked, data, cfg, tmp_path / "stacked",
                             replace(CPU, parallel=ParallelConfig(stack_mixers="on")), eval_set)
    mixer_log = run_stage1(teacher, one_by_one, data, cfg, tmp_path / "one-by-one", CPU, eval_set)
    assert [r["loss"] for r in stacked_log] == pytest.approx([r["loss"] for r in mixer_log], rel=1e-5)
    # the held-out evaluation runs stacked too, and gives each layer's own loss
    assert stacked_log[-1]["eval_align_layers"] == pytest.approx(mixer_log[-1]["eval_align_layers"], rel=1e-4)
    moved = 0
    for (name, a), b, start in zip(stacked.named_parameters(), one_by_one.parameters(), all_linear(teacher).parameters()):
        assert (a - b).abs().max() <= 1e-4 * (b - start).abs().max() + 1e-7, name
        moved += not torch.equal(b, start)
    assert moved  # the runs trained: the comparison is not of two untouched models


def test_where_stage1_stacks_its_mixers():
    def stacks(device: str = "cpu", world: int = 1, **parallel) -> bool:
        return stacks_mixers(Runtime(device=torch.device(device), world=world, parallel=ParallelConfig(**parallel)))

    assert stacks("cuda") and not stacks("cpu")  # auto: where launches, not memory traffic, bound the step
    assert stacks("cpu", stack_mixers="on") and not stacks("cuda", stack_mixers="off")
    assert not stacks("cuda", world=2) and not stacks("cuda", activation_checkpointing=True)  # mixer by mixer
    with pytest.raises(UserError, match=r"parallel.stack_mixers must be one of auto, on, off \(or true/false\), got 'yes'"):
        stacks(stack_mixers="yes")
    assert "faster on a CPU" in describe_stage1_mixers(Runtime())  # the run's log says why
    assert describe_stage1_mixers(Runtime(device=torch.device("cuda"))).startswith("stacked")


def test_stage2_lr_groups():
    teacher, _ = make_teacher("llama", num_layers=2, hidden=32, heads=2, kv_heads=1)
    hybrid = restore_softmax(all_linear(teacher), teacher, [0])
    mixers, other = stage2_param_groups(hybrid, 1e-4, 7e-6)
    names = {id(p): n for n, p in hybrid.named_parameters()}
    assert {g["lr"] for g in (mixers, other)} == {1e-4, 7e-6}
    assert any(".self_attn." in names[id(p)] for p in mixers["params"])
    assert any(".linear_attn." in names[id(p)] for p in mixers["params"])
    assert all(".mlp." in names[id(p)] or "norm" in names[id(p)] or "embed" in names[id(p)] for p in other["params"])
    assert len(mixers["params"]) + len(other["params"]) == len(list(hybrid.parameters()))


def test_stage3_cross_entropy_runs_and_improves(setup, tmp_path):
    teacher, _, data, eval_set = setup
    hybrid = restore_softmax(all_linear(teacher), teacher, [0])
    log = run_stage3(hybrid, data, TrainConfig(steps=10, seq_len=SEQ, batch=2, micro_batch=2, lr=3e-3, save_every=100),
                     tmp_path, CPU, eval_set)
    assert log[-1]["loss"] < log[0]["loss"] and "eval_kl" in log[-1]


def test_cosine_schedule_endpoints():
    cfg = TrainConfig(steps=101, lr=1.0, warmup_steps=0, min_lr_ratio=0.1)
    assert lr_factor(cfg, 0) == pytest.approx(1.0)
    assert lr_factor(cfg, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(100 / 101 * torch.pi)).item()))
    assert lr_factor(TrainConfig(steps=10, warmup_steps=4), 1) == pytest.approx(0.5)
    assert lr_factor(TrainConfig(steps=10, schedule="constant"), 9) == 1.0


def _train_linear(tmp_path, micro_batch: int, max_rows: int | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """3 steps of 8 rows on a float64 linear model; the loss "runs out of memory" past max_rows rows a forward."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1).double()
    data = torch.randn(3, 8, 8, dtype=torch.float64)
    cfg = TrainConfig(steps=3, seq_len=1, batch=8, micro_batch=micro_batch, lr=1e-2, save_every=0)

    def loss_fn(model, x):
        if max_rows is not None and x.shape[0] > max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return (model(x) - x.sum(-1, keepdim=True)).pow(2).mean(), {}

    def get_batch(step, micro):
        return data[step, micro * micro_batch : (micro + 1) * micro_batch]

    train("t", model, [{"params": list(model.parameters()), "lr": 1e-2}], loss_fn, get_batch, cfg,
          tmp_path / f"m{micro_batch}-{max_rows}", CPU, show_progress=False)
    return model, read_log(tmp_path / f"m{micro_batch}-{max_rows}")


def test_a_step_out_of_memory_runs_again_in_smaller_forwards_to_the_same_weights(tmp_path, caplog):
    """Micro-batches of 8 rows when only 3 fit: the loop halves twice (8 -> 4 -> 2 rows a forward) and trains to
    the weights of micro-batches of 2, losses included; the log says so."""
    reference, ref_log = _train_linear(tmp_path, micro_batch=2)
    with caplog.at_level("WARNING", logger="distill.train"):
        split, log = _train_linear(tmp_path, micro_batch=8, max_rows=3)
    assert [r["pieces"] for r in log] == [4, 4, 4]
    assert "running each micro-batch of 8 as 4 forwards of 2" in caplog.text
    for p, q in zip(reference.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in ref_log], rel=1e-12)


def test_out_of_memory_at_one_sequence_a_forward_names_the_remedies(tmp_path):
    with pytest.raises(UserError, match="out of GPU memory at 1 sequence.*activation_checkpointing.*seq_len"):
        _train_linear(tmp_path, micro_batch=2, max_rows=0)


def test_training_loop_resumes_to_identical_weights(tmp_path):
    """3 steps + resume for 3 more (a fresh model and optimiser, as after a restart) == 6 straight steps; the
    log's wall clock continues across the restart instead of starting again."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    data = torch.randn(6, 4, 8)

    def run(steps: int, work, init_state):
        m = copy.deepcopy(model)
        m.load_state_dict(init_state)
        cfg = TrainConfig(steps=6, seq_len=1, batch=4, micro_batch=2, lr=1e-2, save_every=1)

        def loss_fn(model, x):
            time.sleep(0.01)  # each step takes >= 20 ms of wall time
            return model(x).pow(2).mean() + 1e-3 * torch.randn(()), {}  # uses the RNG: resume must restore it

        def get_batch(step, micro):
            if step >= steps:
                raise KeyboardInterrupt  # "killed" before this step
            return data[step, 2 * micro : 2 * micro + 2]

        try:
            train("t", m, [{"params": list(m.parameters()), "lr": 1e-2}], loss_fn, get_batch, cfg, work, CPU,
                  show_progress=False)
        except KeyboardInterrupt:
            pass
        return m

    init = copy.deepcopy(model.state_dict())
    straight = run(6, tmp_path / "a", init)
    run(3, tmp_path / "b", init)
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3]
    resumed = run(6, tmp_path / "b", init)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]
    walls = [r["wall_s"] for r in read_log(tmp_path / "b")]
    assert walls == sorted(walls) and walls[-1] >= 6 * 0.02
