"""Every hybrid a quality experiment made, in one table: held-out KL and perplexity, recall (greedy exact match and
the continuous score), lm-eval metrics, and what its Stage 2 cost.

    python -m bench.quality_summary bench/results/quality_h100 --out bench/results/quality_h100/summary.md

Walks DIR for `hybrid eval` results (`results*.json`). Each result file's directory is a run; its training logs give
a hybrid's Stage-2 tokens and time (`logs/log-hybrid-NAME.jsonl`, the last step's count and wall clock; older
logs: `metrics-hybrid-NAME.json`). A model evaluated in several files of one run (passkey in one, associative recall in
another) is one row. Rows are grouped by the held-out text they were scored on, told apart by the teacher's
perplexity on it (a changed loader or validation file changes the text): KL and perplexity compare only within a
group, recall cells (fixed prompts) across groups too. The teacher gets one row per group, with what every run
measured of it. With --out, a plot beside the table shows what Stage-2 budget buys: one recall cell (--task,
--context) and the held-out KL of every hybrid against its Stage-2 tokens.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distill.eval_results import EvalReport, ModelReport

STAGE2_SECONDS = "stage 2 (distill)"


@dataclass
class Row:
    run: str  # the result file's directory, relative to the walked root
    date: str
    device: str
    model: ModelReport  # every result file of the run merged
    stage2_tokens: int | None = None
    stage2_seconds: float | None = None


@dataclass
class Group:
    teacher_perplexity: float | None
    teacher: Row | None = None
    rows: list[Row] = field(default_factory=list)


def merge(into: ModelReport, other: ModelReport) -> None:
    """Add what `other` measured of the same model (another result file of the same run) to `into`."""
    into.heldout = into.heldout or other.heldout
    seen = {(r.task, r.context) for r in into.recall}
    into.recall += [r for r in other.recall if (r.task, r.context) not in seen]
    for task, metrics in other.lm_eval.items():
        into.lm_eval.setdefault(task, metrics)
    into.trained_tokens = into.trained_tokens or other.trained_tokens


def training_cost(run_dir: Path, name: str, model: ModelReport | None = None) -> tuple[int | None, float | None]:
    """(Stage-2 tokens, Stage-2 seconds) of hybrid NAME from the run's logs, None where they are not there.
    The tokens are the checkpoint's own count where `hybrid eval` recorded it (`trained_tokens`: every
    Stage 2 it had, `hybrid distill --from` included). `--from` starts a new log, named as the script names the
    continued hybrid (`PARENT-TAG`): where the logs of this run's parents add up to the recorded tokens, the
    seconds are all of theirs, else those of the last Stage 2 only."""
    tokens, seconds = _log_cost(run_dir, name)
    recorded = model.trained_tokens.get("stage2") if model is not None else None
    if recorded is None or tokens is None or recorded <= tokens:
        return recorded or tokens, seconds
    chain_tokens, chain_seconds = tokens, seconds
    parts = name.split("-")
    for cut in range(len(parts) - 1, 0, -1):  # the nearest parent first
        parent_tokens, parent_seconds = _log_cost(run_dir, "-".join(parts[:cut]))
        if parent_tokens is not None and parent_seconds is not None and chain_seconds is not None:
            chain_tokens, chain_seconds = chain_tokens + parent_tokens, chain_seconds + parent_seconds
        if chain_tokens == recorded:
            return recorded, chain_seconds
    return recorded, seconds


def _log_cost(run_dir: Path, name: str) -> tuple[int | None, float | None]:
    """(tokens, seconds) of the Stage 2 whose log is `logs/log-hybrid-NAME.jsonl` (and metrics file).

    The seconds are the log's `wall_s` (the stage's time with its evals, summed over resumed attempts). Logs
    written before it existed give the metrics file's stage time, which covers only the attempt that finished:
    where the log's own step time (`elapsed_s`, kept across resumes) is longer, that is the better figure."""
    last: dict = {}
    log = run_dir / "logs" / f"log-hybrid-{name}.jsonl"
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else {}
    if "wall_s" in last:
        return last.get("tokens"), last["wall_s"]
    metrics = run_dir / f"metrics-hybrid-{name}.json"
    seconds = json.loads(metrics.read_text()).get("seconds", {}).get(STAGE2_SECONDS) if metrics.is_file() else None
    if last.get("elapsed_s") is not None:
        seconds = max(seconds or 0.0, last["elapsed_s"])
    return last.get("tokens"), seconds


def load_rows(root: Path) -> list[Row]:
    rows: dict[tuple[str, str], Row] = {}
    for path in sorted(root.rglob("results*.json")):
        try:
            report = EvalReport.load(path)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: not a `hybrid eval` results file ({type(error).__name__}: {error})") from error
        run = str(path.parent.relative_to(root)) or "."
        for model in report.models:
            key = (run, model.name)
            if key in rows:
                merge(rows[key].model, model)
            else:
                device = report.device.removeprefix("NVIDIA ").split()[0].rstrip(",")
                rows[key] = Row(run, report.date, device, model, *training_cost(path.parent, model.name, model))
    return list(rows.values())


def group_rows(rows: list[Row]) -> list[Group]:
    """Groups by held-out text: a run's teacher perplexity (two decimals) names the text its rows were scored on."""
    text_of_run = {r.run: round(r.model.heldout.perplexity, 2) for r in rows
                   if r.model.role == "teacher" and r.model.heldout is not None}
    groups: dict[float | None, Group] = {}
    for row in rows:
        group = groups.setdefault(text_of_run.get(row.run), Group(text_of_run.get(row.run)))
        if row.model.role == "teacher":  # one teacher per text: what each run measured of it, merged
            if group.teacher is None:
                group.teacher = row
            else:
                merge(group.teacher.model, row.model)
                group.teacher.run, group.teacher.date, group.teacher.device = "all runs", "—", ""
        else:
            group.rows.append(row)
    return sorted(groups.values(), key=lambda g: (g.teacher_perplexity is None, -(g.teacher_perplexity or 0)))


def _cells(rows: list[Row]) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    recall = sorted({(r.task, r.context) for row in rows for r in row.model.recall})
    lm_eval = sorted({(task, metric) for row in rows for task, metrics in row.model.lm_eval.items()
                      for metric in metrics if metric.startswith("acc,")})
    return recall, lm_eval


def _layers(model: ModelReport) -> str:
    if model.softmax_layers is None:
        return "all"
    return f"{len(model.softmax_layers)}/{model.num_layers}: " + ",".join(map(str, model.softmax_layers))


def render(groups: list[Group], root: Path) -> str:
    lines = [f"# Every hybrid under `{root}`", "",
             "Written by `python -m bench.quality_summary`. Recall cells: greedy exact match, then the continuous score "
             "(log-probability gain from the needle, nats) in brackets. Stage 2: tokens trained, and the stage's wall "
             "minutes with its periodic evals, from the run's logs (— where the run kept none).", ""]
    for group in groups:
        members = ([group.teacher] if group.teacher else []) + group.rows
        recall, lm_eval = _cells(members)
        title = ("held-out text unknown (no teacher perplexity in these runs)" if group.teacher_perplexity is None
                 else f"Held-out text on which the teacher's perplexity is {group.teacher_perplexity:.2f}")
        header = (["run", "date, device", "model", "softmax layers", "Stage 2 tokens", "Stage 2 min", "held-out KL",
                   "perplexity"] + [f"{t}@{c}" for t, c in recall] + [f"{t} {m.split(',')[0]}" for t, m in lm_eval])
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in members:
            m = row.model
            cells = [row.run, ", ".join(filter(None, (row.date, row.device))), m.name, _layers(m),
                     "—" if row.stage2_tokens is None else f"{row.stage2_tokens / 1e6:.1f}M",
                     "—" if row.stage2_seconds is None else f"{row.stage2_seconds / 60:.1f}",
                     "—" if m.heldout is None else f"{m.heldout.kl:.4f}",
                     "—" if m.heldout is None else f"{m.heldout.perplexity:.2f}"]
            for task, context in recall:
                s = m.recall_score(task, context)
                cells.append("—" if s is None else f"{s.exact:.2f} [{s.delta:.1f}]")
            for task, metric in lm_eval:
                value = m.lm_eval.get(task, {}).get(metric)
                cells.append("—" if value is None else f"{value:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def to_json(groups: list[Group]) -> list[dict]:
    def one(row: Row) -> dict:
        m = row.model
        return {"run": row.run, "date": row.date, "device": row.device, "name": m.name, "role": m.role,
                "softmax_layers": m.softmax_layers, "stage2_tokens": row.stage2_tokens,
                "stage2_seconds": row.stage2_seconds,
                "heldout": None if m.heldout is None else {"kl": m.heldout.kl, "perplexity": m.heldout.perplexity},
                "recall": {f"{r.task}@{r.context}": {"exact": r.exact, "delta": r.delta,
                                                     **({"exact_by_depth": r.exact_by_depth} if r.depth_samples else {})}
                           for r in m.recall},
                "lm_eval": m.lm_eval}
    return [{"teacher_perplexity": g.teacher_perplexity,
             "models": [one(r) for r in ([g.teacher] if g.teacher else []) + g.rows]} for g in groups]


@dataclass(frozen=True)
class BudgetPoint:
    """One trained hybrid on the budget plot: what it cost, what it kept."""

    selector: str  # the model name up to its "-k<K>": ga-s2-k8, uniform-k8, kl-restore-k8, ...
    label: str  # the variant the model name adds after its seed (e.g. "4k-longdocs"), else the run
    text: int  # which held-out text (index of its group): KL compares only within one
    stage2_tokens: int
    kl: float | None
    exact: float | None  # greedy exact match of the plotted recall cell


def budget_points(groups: list[Group], task: str, context: int) -> list[BudgetPoint]:
    """Every hybrid whose Stage-2 tokens are known, with its held-out KL and its `task`@`context` exact match."""
    points = []
    for text, group in enumerate(groups):
        for row in group.rows:
            if row.stage2_tokens is None:
                continue
            cell = row.model.recall_score(task, context)
            named = re.match(r"(.*?-k\d+)(?:-s\d+)?-?(.*)$", row.model.name)
            selector, variant = named.groups() if named else (row.model.name, "")
            label = variant or ("top" if row.run == "." else row.run)
            points.append(BudgetPoint(selector, label, text, row.stage2_tokens,
                                      row.model.heldout.kl if row.model.heldout else None,
                                      cell.exact if cell else None))
    return points


def plot_budget(groups: list[Group], path: Path, task: str = "passkey", context: int = 2048) -> None:
    """Recall and held-out KL against Stage-2 tokens, one colour per selector, one marker per held-out text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = budget_points(groups, task, context)
    selectors = sorted({p.selector for p in points})
    palette = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10 selectors
    colours = {name: palette[i % len(palette)] for i, name in enumerate(selectors)}
    markers = "os^Dv"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, value, label in ((left, "exact", f"{task}@{context} exact match"), (right, "kl", "held-out KL (nats/token)")):
        for p in points:
            y = getattr(p, value)
            if y is None:
                continue
            axis.scatter(p.stage2_tokens, y, color=colours[p.selector], marker=markers[p.text % len(markers)], s=36)
            axis.annotate(p.label, (p.stage2_tokens, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel("Stage-2 tokens")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    teacher = next((g.teacher.model.recall_score(task, context) for g in groups
                    if g.teacher and g.teacher.model.recall_score(task, context)), None)
    if teacher is not None:
        left.axhline(teacher.exact, color="k", lw=1, label=f"teacher {teacher.exact:.2f}")
    left.set_ylim(-0.02, 1.05)
    for name, colour in colours.items():
        left.scatter([], [], color=colour, label=name)
    for i, group in enumerate(groups):
        if group.teacher_perplexity is not None:
            right.scatter([], [], color="grey", marker=markers[i % len(markers)],
                          label=f"held-out text, teacher ppl {group.teacher_perplexity:.2f}")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.suptitle("What Stage-2 budget buys (one point per hybrid; KL compares within one marker)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a directory holding `hybrid eval` results, in subdirectories too")
    parser.add_argument("--out", type=Path,
                        help="write the markdown here, the numbers beside it (.json) and the budget plot (.png)")
    parser.add_argument("--task", default="passkey", help="the recall task on the budget plot (default: passkey)")
    parser.add_argument("--context", type=int, default=2048, help="its context length (default: 2048)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"no such directory: {args.root}")
    try:
        rows = load_rows(args.root)
    except ValueError as error:
        parser.error(str(error))
    if not rows:
        parser.error(f"no results*.json written by `hybrid eval` under {args.root}")
    groups = group_rows(rows)
    table = render(groups, args.root)
    print(table)
    if args.out:
        args.out.write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(to_json(groups), indent=2) + "\n")
        plot_budget(groups, args.out.with_suffix(".png"), args.task, args.context)
    return 0


if __name__ == "__main__":
    sys.exit(main())
