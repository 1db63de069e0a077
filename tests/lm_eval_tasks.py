"""A tiny local lm-evaluation-harness task (task YAML + jsonl dataset written on the fly) for the eval tests."""

from __future__ import annotations

import json
from pathlib import Path


def write_choice_task(folder: Path) -> Path:
    """A two-way multiple-choice lm-eval task over a local jsonl file (log-likelihood requests)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"question": "The quick brown fox jumps over the", "choices": [" lazy dog", " warm sun"], "answer": 0},
        {"question": "A language model predicts the next", "choices": [" token", " fox"], "answer": 0},
        {"question": "def add(a, b):\n    return", "choices": [" hello", " a + b"], "answer": 1},
        {"question": "Linear attention keeps a fixed-size", "choices": [" state", " cat"], "answer": 0},
    ]
    data = folder / "choice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / "tiny_choice.yaml"
    task.write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return task
