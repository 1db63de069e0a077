"""Selectors side by side: what each ranking keeps, how far it agrees with GA-S2, what it cost, and how
good the hybrid it picks is.

    python -m bench.selection_report bench/results/quality_h100 --k 8 \\
        --results results.json probe_and_eighth/results.json \\
        --ranking pk-ablation=passkey_ablation/ranking.json

Reads, from the folder `scripts/gpu_quality_experiment.sh eval` fills: `ranking-SELECTOR.json` (from
`hybrid score`), `metrics-rank-SELECTOR.json` (the selection's wall time), `results.json` (`hybrid eval`
of the hybrids named `SELECTOR-kK-sSEED`; --results names more files, relative to the folder, and the first
file holding a selector's hybrid gives its row). Held-out KL compares only on one text: a hybrid scored on
another text than the first file's says so, with the teacher's perplexity there. --ranking NAME=FILE adds a
ranking kept elsewhere under its own name (e.g. the ablation probe run on another task); its hybrids are the
`NAME-kK-sSEED` ones. Writes `selection.md` and `selection.png` in the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from distill.placement import uniform_softmax_layers
from distill.selection import Ranking, ranking_agreement, uniform_ranking

REFERENCE = "ga-s2"


def load_rankings(folder: Path, named: dict[str, Path] | None = None) -> dict[str, Ranking]:
    """Every `ranking-*.json` of the folder by its selector, then the `named` files (relative to the folder)
    by the name given them."""
    rankings = {}
    for path in sorted(folder.glob("ranking-*.json")):
        ranking = Ranking.load(path)
        rankings[ranking.selector] = ranking
    for name, path in (named or {}).items():
        if name in rankings:
            raise SystemExit(f"--ranking {name}={path}: {folder} already has a ranking named {name}")
        rankings[name] = replace(Ranking.load(folder / path), selector=name)
    if REFERENCE not in rankings:
        raise SystemExit(f"{folder}: no ranking-{REFERENCE}.json to compare against")
    rankings["uniform"] = uniform_ranking(rankings[REFERENCE].num_layers)
    return rankings


def selection_cost(folder: Path, ranking: Ranking) -> tuple[int, float | None]:
    """(training tokens, wall seconds) the selection spent; uniform costs nothing."""
    tokens = ranking.details.get("candidate_tokens", 0) * ranking.num_layers
    metrics = folder / f"metrics-rank-{ranking.selector}.json"
    if ranking.selector == "uniform":
        return 0, 0.0
    seconds = json.loads(metrics.read_text())["seconds"] if metrics.is_file() else {}
    return tokens, next(iter(seconds.values()), None)


def teacher_perplexity(results: dict) -> float | None:
    teacher = next((m for m in results["models"] if m["name"] == "teacher"), None)
    return teacher["heldout"].get("perplexity") if teacher and teacher.get("heldout") else None


def hybrid_rows(folder: Path, k: int, files: list[str]) -> dict[str, dict]:
    """The evaluated hybrid of each selector at this K (the first file's, first seed), keyed by selector; a
    hybrid from a file scored on another held-out text carries that text's teacher perplexity as `other_text`."""
    rows, first_text = {}, None
    for i, file in enumerate(files):
        results = json.loads((folder / file).read_text())
        text = teacher_perplexity(results)
        first_text = text if i == 0 else first_text
        for model in results["models"]:
            selector, _, tail = model["name"].rpartition(f"-k{k}-")
            if selector and tail.startswith("s") and selector not in rows:
                other = text is not None and first_text is not None and round(text, 2) != round(first_text, 2)
                rows[selector] = {**model, "other_text": text if other else None}
    return rows


def heldout_kl(model: dict) -> str:
    kl = f"{model['heldout']['kl']:.4f}"
    return kl if model["other_text"] is None else f"{kl} on another text (teacher perplexity {model['other_text']:.2f})"


def passkey(model: dict, context: int) -> str:
    cell = next((r for r in model["recall"] if r["task"] == "passkey" and r["context"] == context), None)
    return f"{cell['exact']:.2f} ({cell['delta']:+.1f})" if cell else "—"


def render(folder: Path, k: int, files: list[str], named: dict[str, Path]) -> str:
    rankings = load_rankings(folder, named)
    hybrids = hybrid_rows(folder, k, files)
    contexts = sorted({r["context"] for m in hybrids.values() for r in m["recall"] if r["task"] == "passkey"})
    head = ["selector", f"softmax layers (K={k})", f"Spearman vs {REFERENCE}", f"Jaccard@{k} vs {REFERENCE}",
            "training tokens", "GPU-seconds", "hybrid held-out KL", *[f"passkey@{c}" for c in contexts]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ranking in rankings.items():
        agree = ranking_agreement(rankings[REFERENCE], ranking, k)
        tokens, seconds = selection_cost(folder, ranking)
        model = hybrids.get(name)
        spearman = "—" if agree["spearman"] is None else f"{agree['spearman']:.2f}"
        lines.append("| " + " | ".join([
            name, ",".join(map(str, ranking.choose(k))), spearman, f"{agree['jaccard_top_k']:.2f}",
            f"{tokens:,}", "—" if seconds is None else f"{seconds:.0f}",
            heldout_kl(model) if model else "not trained",
            *[passkey(model, c) if model else "—" for c in contexts],
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot(folder: Path, k: int, named: dict[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rankings = load_rankings(folder, named)
    ref = rankings[REFERENCE]
    layers = list(range(ref.num_layers))
    fig, ax = plt.subplots(figsize=(13, 4))
    ax.plot(layers, [ref.scores[i] for i in layers], "o-", label=f"{REFERENCE}: held-out KL after "
            f"{ref.details.get('candidate_steps')} steps with only this layer softmax")
    if "kl-restore" in rankings:
        cheap = rankings["kl-restore"]
        ax.plot(layers, [cheap.scores[i] for i in layers], "s--", label="kl-restore: the same, no training")
    top = max(max(ref.scores.values()), max(rankings.get("kl-restore", ref).scores.values()))
    for row, (name, ranking) in enumerate(rankings.items()):
        chosen = ranking.choose(k) if name != "uniform" else uniform_softmax_layers(ref.num_layers, k)
        ax.scatter(chosen, [top * (1.08 + 0.07 * row)] * len(chosen), marker="|", s=120, label=f"{name} keeps")
    ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("KL(teacher || hybrid), nats/token")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: inside, it hides scores
    ax.set_title(f"Layer scores and the {k} softmax layers each selector keeps")
    fig.tight_layout()
    out = folder / "selection.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--k", type=int, default=8, help="softmax layers kept (default 8 = 1/4 of 30)")
    parser.add_argument("--results", nargs="+", default=["results.json"],
                        help="`hybrid eval` JSON files, relative to the folder, the first one first "
                             "(default results.json)")
    parser.add_argument("--ranking", nargs="+", default=[], metavar="NAME=FILE",
                        help="more ranking files (relative to the folder), each shown under NAME")
    args = parser.parse_args(argv)
    named = {}
    for item in args.ranking:
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            parser.error(f"--ranking {item}: expected NAME=FILE, e.g. pk-ablation=passkey_ablation/ranking.json")
        named[name] = Path(path)
    table = render(args.folder, args.k, args.results, named)
    (args.folder / "selection.md").write_text(table)
    print(table)
    print(plot(args.folder, args.k, named))
    return 0


if __name__ == "__main__":
    sys.exit(main())
