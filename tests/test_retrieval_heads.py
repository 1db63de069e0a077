"""bench/retrieval_heads.py: the needle mass it recomputes from one query row equals what the family's own
eager attention gives (float64), for every family's attention shape; a hybrid reports its softmax layers only."""

from __future__ import annotations

import pytest
import torch

from bench.retrieval_heads import summarise, top_heads
from distill.retrieval_heads import measure, needle_mass, softmax_attention_layers
from distill.distributed import Runtime
from distill.recall_tasks import RecallSample
from tests.tiny_models import make_teacher


def peaked(model):
    """Random weights give near-uniform attention, under which a wrong rotation or head mapping barely shows."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if proj is not None:  # Qwen3 RMS-normalises q and k: their gains set the scale there
                    proj.weight.mul_(8.0 if isinstance(proj, torch.nn.Linear) else 3.0)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_needle_mass_matches_eager_attention_probabilities(family):
    model, _ = make_teacher(family, num_layers=2, hidden=64, heads=4, kv_heads=2)
    model = peaked(model).double()
    model.set_attn_implementation("eager")
    ids = torch.randint(3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    query, needle = 31, torch.tensor([5, 6, 7, 19])
    got = {}

    def hook(layer):
        def capture(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            got[layer] = needle_mass(module, hidden, *kwargs["position_embeddings"], query, needle)
        return capture

    handles = [a.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, a in softmax_attention_layers(model).items()]
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions  # per layer [b, heads, T, T]
    for h in handles:
        h.remove()
    for layer, probs in enumerate(attentions):
        expected = probs[:, :, query, needle].sum(-1)
        assert probs[:, :, query].max() > 0.2  # the check is not between two near-uniform rows
        # transformers' eager attention takes its softmax in float32 even for a float64 model
        torch.testing.assert_close(got[layer], expected, rtol=1e-6, atol=1e-6)


def test_a_hybrid_reports_its_softmax_layers_and_which_samples_it_recalled():
    from distill.model.transfer import hybrid_from_teacher

    teacher, _ = make_teacher("llama", num_layers=4, hidden=64, heads=4, kv_heads=2)
    hybrid = hybrid_from_teacher(peaked(teacher), ["linear_attention", "full_attention"] * 2).eval()
    assert sorted(softmax_attention_layers(hybrid)) == [1, 3]
    gen = torch.Generator().manual_seed(1)
    samples = []
    for depth in (0.1, 0.9):
        ids = torch.randint(3, teacher.config.vocab_size, (48,), generator=gen).tolist()
        without = list(ids)
        without[10:14] = [ids[0]] * 4
        samples.append(RecallSample(ids, without, answer_len=2, answer="", depth=depth))
    rows = measure(hybrid, samples, Runtime(device=torch.device("cpu")), "test")
    assert [r.depth for r in rows] == [0, 3] and all(sorted(r.mass) == [1, 3] for r in rows)
    with torch.no_grad():
        logits = hybrid(input_ids=torch.tensor([s.ids for s in samples])).logits
    assert [r.hit for r in rows] == [bool(logits[i, 45].argmax() == s.ids[46]) for i, s in enumerate(samples)]
    heads = summarise("hybrid", 48, rows)
    assert heads.depth_samples == [1, 0, 0, 1] and heads.by_depth[1] == {}
    assert all(0.0 <= m <= 1.0 for _, _, m in top_heads(heads)) and len(top_heads(heads)) == 8


def test_report_with_the_teachers_attention_put_back(tmp_path):
    """A hybrid whose every layer is softmax, with perturbed attention weights: the report measures it as it is,
    and with --teacher-attention exactly as the teacher (nothing else differs)."""
    import json

    from bench.retrieval_heads import main
    from distill.model.checkpoint import save_hybrid
    from distill.model.transfer import hybrid_from_teacher

    teacher, tok = make_teacher("llama", num_layers=3, hidden=64, heads=4, kv_heads=2)
    teacher = peaked(teacher)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    hybrid = hybrid_from_teacher(teacher, ["full_attention"] * 3)
    with torch.no_grad():
        for layer in hybrid.model.layers:
            layer.self_attn.k_proj.weight.add_(0.5 * torch.randn_like(layer.self_attn.k_proj.weight))
    save_hybrid(hybrid, tok, tmp_path / "hybrid", dtype="float32")
    assert main(["--teacher", str(tmp_path / "teacher"), "--hybrid", f"h={tmp_path / 'hybrid'}", "--lengths", "96",
                 "--samples", "3", "--teacher-attention", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "retrieval_heads.json").read_text())
    teacher_mass = report["teacher"][0]["mean"]
    as_trained, put_back = (report["hybrids"][n][0]["mean"] for n in ("h", "h+teacher-attention"))
    assert report["softmax_layers"]["h"] == [0, 1, 2]
    for layer, masses in teacher_mass.items():
        assert put_back[layer] == pytest.approx(masses, abs=1e-5)
    assert max(abs(a - b) for layer in teacher_mass for a, b in zip(as_trained[layer], teacher_mass[layer])) > 1e-3
    assert (tmp_path / "out" / "retrieval_heads.md").is_file() and (tmp_path / "out" / "retrieval_heads.png").is_file()


def test_restore_each_puts_one_gdn_layer_back_at_a_time(tmp_path):
    """--restore-each measures the hybrid as trained and once per GDN layer restored to softmax; layer 0 restored
    sees the embeddings, as the teacher's layer 0 does, so its heads' needle mass is the teacher's."""
    import json

    from bench.retrieval_heads import main
    from distill.model.checkpoint import save_hybrid
    from distill.model.transfer import hybrid_from_teacher

    teacher, tok = make_teacher("llama", num_layers=3, hidden=64, heads=4, kv_heads=2)
    teacher = peaked(teacher)
    teacher.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    save_hybrid(hybrid_from_teacher(teacher, ["linear_attention", "full_attention", "linear_attention"]), tok,
                tmp_path / "hybrid", dtype="float32")
    assert main(["--teacher", str(tmp_path / "teacher"), "--hybrid", f"h={tmp_path / 'hybrid'}", "--lengths", "96",
                 "--samples", "8", "--restore-each", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "retrieval_heads.json").read_text())
    rows = report["restored"]["h"]
    assert [r["layer"] for r in rows] == [None, 0, 2]
    assert [sorted(r["mean"]) for r in rows] == [["1"], ["0", "1"], ["1", "2"]]
    far_teacher = report["teacher"][0]["by_depth"][0]
    assert rows[1]["mean"]["0"] == pytest.approx(far_teacher["0"], abs=1e-5)
    assert rows[2]["mean"]["1"] == pytest.approx(rows[0]["mean"]["1"], abs=1e-6)  # layer 2 is after layer 1
    assert "restored to the teacher's softmax" in (tmp_path / "out" / "retrieval_heads.md").read_text()
