"""bench.selection_quality: the passkey task is well formed, and the whole evaluation runs on real
checkpoints (tiny teacher, a hybrid made by `hybrid init`) and writes its JSON, table and plot."""

from __future__ import annotations

import json

import pytest

from bench.selection_quality import main, passkey_task, plot
from distill.cli import main as hybrid
from tests.tiny_models import make_tokenizer, save_teacher, write_word_corpus


@pytest.mark.parametrize("context", [96, 200])
def test_passkey_task_hides_the_key_and_asks_for_it(context):
    tok = make_tokenizer()
    ids, positions, answers = passkey_task(tok, samples=6, context=context, seed=1)
    assert ids.shape == (6, context)
    keys = set()
    for row, pos, ans in zip(ids, positions, answers):
        assert row[pos + 1].tolist() == ans.tolist()  # each answer token follows its query position
        assert pos[-1] == context - 2  # the answer ends the sequence
        key = tok.decode(ans).strip()
        assert key.isdigit() and len(key) == 5
        assert f"pass key is {key}." in tok.decode(row[: pos[0] + 1])  # the needle precedes the question
        keys.add(key)
    assert len(keys) > 1


def test_evaluation_runs_on_real_checkpoints(tmp_path, capsys):
    teacher = save_teacher(tmp_path / "teacher", "llama", num_layers=4)
    assert hybrid(["init", "--teacher", str(teacher), "--ratio", "0.5", "--out", str(tmp_path / "hyb")]) == 0
    corpus = write_word_corpus(tmp_path / "val.md", "alpha beta gamma delta hello world", docs=200, words_per_doc=80)
    out = tmp_path / "quality.json"
    assert main(["--teacher", str(teacher), "--data", str(corpus), "--hybrid", f"init={tmp_path / 'hyb'}",
                 "--seq-len", "64", "--eval-tokens", "128", "--passkey-contexts", "96", "--recall-pairs", "4",
                 "--recall-samples", "4", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    h = result["hybrids"]["init"]
    assert h["softmax_layers"] == [1, 3] and h["heldout_kl"] > 0
    for scores in (result["teacher"]["recall"], h["recall"]):
        assert set(scores) == {"passkey@96", "pairs@16"} and all(0 <= v <= 1 for v in scores.values())
    assert "| init | [1, 3] |" in capsys.readouterr().out
    (tmp_path / "ranking-ga-s2.json").write_text(json.dumps({"num_layers": 4, "scores": {str(i): 1 + i / 10 for i in range(4)}}))
    (tmp_path / "selection_quality.json").write_text(out.read_text())
    assert plot(tmp_path).stat().st_size > 10_000
