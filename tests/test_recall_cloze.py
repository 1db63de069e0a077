"""bench/recall_cloze.py: which names become samples, determinism, and the task running through `hybrid eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.recall_cloze import ClozeSettings, cloze_samples, main as write_cloze
from distill.cli import main as hybrid
from distill.eval_results import EvalReport
from tests.tiny_models import save_teacher

FILLER = "river stone light cloud paper window garden silver morning quiet letter branch".split()
SETTINGS = ClozeSettings(min_distance=300, max_context=1200, max_doc_freq=2, per_document=8, samples=100)


def filler(chars: int, rng: np.random.Generator) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(str(rng.choice(FILLER)))
    return " ".join(words)


def corpus(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    far = f"the tale of Zorvath begins {filler(400, rng)} and then Zorvath returned {filler(100, rng)} and Zorvath again."
    near = f"we met Quillan there {filler(100, rng)} and then Quillan left."  # recurs too soon
    initial = f"here Maribel stood {filler(400, rng)}. Maribel went home."  # recurs first in its sentence
    cut = f"old Thessaly saw {filler(1500, rng)} and Thessaly stayed."  # earlier use outside the context window
    common = [f"in Lisbon today {filler(400, rng)} and Lisbon again." for _ in range(3)]  # in 3 documents
    return [far, near, initial, cut, *common]


def test_only_names_recalled_from_far_back_become_samples():
    docs = corpus()
    samples = cloze_samples(docs, SETTINGS)
    assert [(s["doc"], s["target"]) for s in samples] == [(0, " Zorvath")]  # its third use is within 300 of the 2nd
    sample = samples[0]
    assert sample["context"].endswith(" and then") and not sample["context"].endswith(" ")
    assert sample["context"].startswith("the tale of Zorvath")
    assert sample["distance"] >= SETTINGS.min_distance
    assert docs[0].startswith(sample["context"] + sample["target"])
    # looser settings admit the names the default ones keep out, each for its own reason
    assert " Quillan" in {s["target"] for s in cloze_samples(docs, ClozeSettings(min_distance=50, max_doc_freq=2))}
    assert " Thessaly" in {s["target"] for s in cloze_samples(docs, ClozeSettings(min_distance=300, max_doc_freq=2))}
    assert " Lisbon" in {s["target"] for s in cloze_samples(docs, ClozeSettings(min_distance=300, max_doc_freq=3))}
    assert " Maribel" not in {s["target"] for s in cloze_samples(docs, ClozeSettings(min_distance=50))}


def test_task_files_are_deterministic_and_run_through_hybrid_eval(tmp_path, one_thread):
    data = tmp_path / "docs.jsonl"
    docs = [doc for seed in range(4) for doc in corpus(seed)[:1]]  # four documents, each with its own Zorvath use
    data.write_text("".join(json.dumps({"text": d.replace("Zorvath", f"Zorvath{chr(97 + i)}")}) + "\n"
                            for i, d in enumerate(docs)))
    args = ["--data", str(data), "--min-distance", "300", "--max-context", "1200"]
    task = write_cloze([*args, "--out", str(tmp_path / "a")])
    write_cloze([*args, "--out", str(tmp_path / "b")])
    rows = (tmp_path / "a" / "recall_cloze.jsonl").read_text()
    assert rows == (tmp_path / "b" / "recall_cloze.jsonl").read_text() and len(rows.splitlines()) == 4
    assert json.loads((tmp_path / "a" / "recall_cloze.meta.json").read_text())["documents"] == 4

    teacher = save_teacher(tmp_path / "teacher", "llama", num_layers=2)
    out = tmp_path / "eval"
    assert hybrid(["eval", "--teacher", str(teacher), "--tasks", str(task), "--device", "cpu", "--out", str(out)]) == 0
    (row,) = EvalReport.load(out / "results.json").models
    metrics = row.lm_eval["recall_cloze"]
    assert 0 <= metrics["acc,none"] <= 1 and metrics["perplexity,none"] > 1


def test_no_sample_is_a_clear_error(tmp_path):
    from distill.errors import UserError

    data = tmp_path / "short.jsonl"
    data.write_text(json.dumps({"text": "Nobody is named twice here."}) + "\n")
    with pytest.raises(UserError, match="lower --min-distance"):
        write_cloze(["--data", str(data), "--out", str(tmp_path / "out")])
