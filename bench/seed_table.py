"""Seed noise of a quality experiment: the same hybrids trained with several seeds, side by side.

    python -m bench.seed_table bench/results/quality_h100/results.json bench/results/quality_h100/seed1/results.json \
        --out bench/results/quality_h100/seeds.md

Reads `hybrid eval` results (results.json, any number of runs) and groups their models by name without the seed
part, the `-sN` after the layer count (`ga-s2-k8-s0`, `ga-s2-k8-s1` -> `ga-s2-k8`; `ga-s2+reach-k8-s1-4k-lr2` ->
`ga-s2+reach-k8-4k-lr2`, as scripts/gpu_quality_experiment.sh names a tagged run; the teacher is one group).
Each row gives, over the seeds seen, the mean and the range (min-max) of held-out KL and perplexity and of every
recall cell (greedy exact match, and the continuous score: the needle's log-probability gain). A group whose
members keep different softmax layers is refused: a seed must change the training, not the layer choice.
Held-out KL and perplexity are averaged only over runs scored on the same held-out text (known by the teacher's
perplexity in each run): where the inputs hold several texts, those cells give one value per text, lettered A,
B, ... under the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from distill.eval_results import EvalReport, ModelReport

SEED_PART = re.compile(r"(?<=\d)-s(\d+)(?=-|$)")  # after k8, not the -s2 of "ga-s2"


@dataclass
class Spread:
    values: list[float]

    def cell(self, digits: int) -> str:
        if min(self.values) == max(self.values):  # one seed, or the teacher measured in several runs
            return f"{self.values[0]:.{digits}f}"
        return f"{mean(self.values):.{digits}f} ({min(self.values):.{digits}f}–{max(self.values):.{digits}f})"

    def to_json(self) -> dict:
        return {"mean": mean(self.values), "min": min(self.values), "max": max(self.values), "values": self.values}


@dataclass
class Group:
    name: str
    softmax_layers: list[int] | None
    seeds: list[str] = field(default_factory=list)
    members: list[ModelReport] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)  # per member: its run's held-out text (held_out_text)


def held_out_text(report: EvalReport) -> str | None:
    """Which held-out text a run scored: the teacher's perplexity on it (None if the run scored no teacher)."""
    teacher = next((m for m in report.models if m.role == "teacher" and m.heldout is not None), None)
    return None if teacher is None else f"{teacher.heldout.perplexity:.2f}"


def group_models(reports: Sequence[tuple[Path, EvalReport]]) -> list[Group]:
    groups: dict[str, Group] = {}
    for path, report in reports:
        text = held_out_text(report)
        for model in report.models:
            match = SEED_PART.search(model.name)
            name = model.name[: match.start()] + model.name[match.end():] if match else model.name
            seed = match.group(1) if match else "-"
            group = groups.setdefault(name, Group(name, model.softmax_layers))
            if model.softmax_layers != group.softmax_layers:
                raise ValueError(f"{path}: {model.name} keeps softmax layers {model.softmax_layers}, but an earlier "
                                 f"{name} run kept {group.softmax_layers}; give it another name")
            group.seeds.append(seed)
            group.members.append(model)
            group.texts.append(text)
    return list(groups.values())


def text_labels(groups: list[Group]) -> dict[str | None, str]:
    """A letter per held-out text when the runs scored more than one, else {} (one text: no labels)."""
    texts = list(dict.fromkeys(t for g in groups for t in g.texts))
    return {t: chr(ord("A") + i) for i, t in enumerate(texts)} if len(texts) > 1 else {}


def recall_cells(groups: list[Group]) -> list[tuple[str, int]]:
    return sorted({(r.task, r.context) for g in groups for m in g.members for r in m.recall})


def spreads(group: Group, cells: list[tuple[str, int]], labels: dict[str | None, str]) -> dict[str, Spread]:
    """Keys `kl`, `perplexity` (one held-out text) or `kl on A`, ... (several), then `TASK@CONTEXT` and its delta."""
    out: dict[str, Spread] = {}
    for text in dict.fromkeys(group.texts):
        held = [m.heldout for m, t in zip(group.members, group.texts) if t == text and m.heldout is not None]
        suffix = f" on {labels[text]}" if labels else ""
        if held:
            out["kl" + suffix] = Spread([h.kl for h in held])
            out["perplexity" + suffix] = Spread([h.perplexity for h in held])
    for task, context in cells:
        scores = [s for m in group.members if (s := m.recall_score(task, context)) is not None]
        if scores:
            out[f"{task}@{context}"] = Spread([s.exact for s in scores])
            out[f"{task}@{context} delta"] = Spread([s.delta for s in scores])
    return out


def heldout_cell(s: dict[str, Spread], key: str, digits: int, labels: dict[str | None, str]) -> str:
    if not labels:
        return s[key].cell(digits) if key in s else "—"
    keys = [(f"{key} on {label}", label) for label in labels.values()]
    parts = [f"{s[k].cell(digits)} on {label}" for k, label in keys if k in s]
    return "<br>".join(parts) or "—"


def render(groups: list[Group], sources: list[Path], source_texts: list[str | None]) -> str:
    cells = recall_cells(groups)
    labels = text_labels(groups)
    header = ["model", "softmax layers", "seeds", "held-out KL", "perplexity"] + [f"{t}@{c}" for t, c in cells]
    lines = [
        "# Seed noise: mean (min–max) over the seeds of each hybrid",
        "",
        "From " + ", ".join(f"`{p}`" for p in sources) + ". Recall cells: greedy exact match, then the continuous "
        "score (log-probability gain from the needle, nats) in brackets below it.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for group in groups:
        s = spreads(group, cells, labels)
        layers = "all" if group.softmax_layers is None else ",".join(map(str, group.softmax_layers))
        seeds = ",".join(group.seeds) if "-" not in group.seeds else f"— ({len(group.seeds)} runs)"
        row = [group.name, layers, seeds, heldout_cell(s, "kl", 4, labels), heldout_cell(s, "perplexity", 2, labels)]
        for task, context in cells:
            key = f"{task}@{context}"
            row.append(f"{s[key].cell(2)}<br>[{s[key + ' delta'].cell(1)}]" if key in s else "—")
        lines.append("| " + " | ".join(row) + " |")
    if labels:
        lines += ["", "Held-out KL and perplexity are averaged only within one held-out text; the runs scored "
                  f"{len(labels)}:"]
        for text, label in labels.items():
            files = ", ".join(f"`{p}`" for p, t in zip(sources, source_texts) if t == text)
            on = "no teacher scored" if text is None else f"the teacher's perplexity {text}"
            lines.append(f"- {label}: {on} ({files})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="results.json files written by `hybrid eval`")
    parser.add_argument("--out", type=Path, help="write the markdown table here and the numbers beside it (.json)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        parser.error(f"no such results file: {', '.join(missing)}")
    reports = [(p, EvalReport.load(p)) for p in args.results]
    try:
        groups = group_models(reports)
    except ValueError as error:
        parser.error(str(error))
    table = render(groups, args.results, [held_out_text(r) for _, r in reports])
    print(table)
    if args.out:
        args.out.write_text(table)
        cells = recall_cells(groups)
        labels = text_labels(groups)
        numbers = {g.name: {"softmax_layers": g.softmax_layers, "seeds": g.seeds,
                            **{k: v.to_json() for k, v in spreads(g, cells, labels).items()}} for g in groups}
        args.out.with_suffix(".json").write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
