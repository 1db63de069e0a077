"""bench/swap_layers.py on a tiny hybrid: a GDN layer goes back to the teacher's softmax, a softmax layer becomes
a GDN mixer aligned in place, and the result is a hybrid checkpoint that loads with the new layer types."""

from __future__ import annotations

import json

import pytest
import torch

from bench.swap_layers import main
from distill.distributed import Runtime
from distill.errors import UserError
from distill.eval_run import load_model
from distill.model.checkpoint import save_hybrid
from distill.model.transfer import hybrid_from_teacher
from tests.tiny_models import make_teacher, write_word_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swap")
    teacher, tok = make_teacher("llama", num_layers=3, hidden=64, heads=4, kv_heads=2, seed=2)
    teacher.save_pretrained(tmp / "teacher")
    tok.save_pretrained(tmp / "teacher")
    save_hybrid(hybrid_from_teacher(teacher, ["linear_attention", "full_attention", "linear_attention"]), tok,
                tmp / "hybrid", dtype="float32")
    words = write_word_corpus(tmp / "words.txt", "one two three four five six seven eight red green blue cat dog",
                              docs=80, words_per_doc=60, seed=0)
    corpus = tmp / "corpus.jsonl"  # one row per document: the held-out split takes whole documents
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in words.read_text().split("\n\n")))
    return tmp, teacher, corpus


def swap(tmp, corpus, *layers: str, out: str = "swapped") -> list[str]:
    return ["--teacher", str(tmp / "teacher"), "--hybrid", str(tmp / "hybrid"), *layers, "--data", str(corpus),
            "--steps", "8", "--seq-len", "32", "--batch", "4", "--micro-batch", "2", "--lr", "3e-3",
            "--eval-tokens", "128", "--device", "cpu", "--out", str(tmp / out)]


def test_the_softmax_budget_moves_and_the_new_mixer_learns_its_layer(checkpoints):
    tmp, teacher, corpus = checkpoints
    assert main(swap(tmp, corpus, "--restore", "0", "--linearize", "1")) == 0
    model, _ = load_model(str(tmp / "swapped"), Runtime())
    assert model.config.layer_types == ["full_attention", "linear_attention", "linear_attention"]
    assert model.config.provenance["swap_layers"] == {"restored": [0], "linearized": [1], "tokens": 8 * 4 * 32}
    for name, weight in teacher.model.layers[0].self_attn.state_dict().items():
        torch.testing.assert_close(model.model.layers[0].self_attn.state_dict()[name], weight, atol=0, rtol=0)
    report = json.loads((tmp / "swapped" / "swap_layers.json").read_text())
    assert report["heldout_align_after"] < report["heldout_align_before"]
    assert len(report["log"]) == 8 and report["heldout_tokens"] == 128


def test_a_layer_of_the_wrong_kind_is_named(checkpoints):
    tmp, _, corpus = checkpoints
    with pytest.raises(UserError, match=r"--linearize 0: layer 0 is linear_attention, expected full_attention"):
        main(swap(tmp, corpus, "--linearize", "0", out="bad"))
    with pytest.raises(UserError, match=r"--restore 1: layer 1 is full_attention, expected linear_attention"):
        main(swap(tmp, corpus, "--restore", "1", "--linearize", "1", out="bad"))
    assert not (tmp / "bad").exists()
