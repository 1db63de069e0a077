"""`hybrid eval` output: one markdown table (teacher and models side by side) and one plot."""

from __future__ import annotations

from pathlib import Path

from distill.eval_results import EvalReport, ModelReport


def _recall_columns(report: EvalReport) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []
    for model in report.models:
        for r in model.recall:
            if (r.task, r.context) not in seen:
                seen.append((r.task, r.context))
    return seen


def _lm_eval_columns(report: EvalReport) -> list[tuple[str, str]]:
    """(task, metric) pairs: every non-stderr metric lm-eval reported for any model."""
    seen: list[tuple[str, str]] = []
    for model in report.models:
        for task, metrics in model.lm_eval.items():
            for metric in metrics:
                if "stderr" not in metric and metric != "sample_len" and (task, metric) not in seen:
                    seen.append((task, metric))
    return seen


def _layers(model: ModelReport) -> str:
    if model.softmax_layers is None:
        return "all"
    return f"{len(model.softmax_layers)}/{model.num_layers}: " + ",".join(map(str, model.softmax_layers))


def markdown_table(report: EvalReport) -> str:
    recall = _recall_columns(report)
    harness = _lm_eval_columns(report)
    has_heldout = any(m.heldout for m in report.models)
    head = ["model", "softmax layers"]
    if has_heldout:
        head += ["held-out KL", "perplexity"]
    head += [f"{task}@{context}" for task, context in recall]
    head += [f"{task} {metric.replace(',none', '')}" for task, metric in harness]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in report.models:
        cells = [m.name, _layers(m)]
        if has_heldout:
            cells += [f"{m.heldout.kl:.4f}", f"{m.heldout.perplexity:.2f}"] if m.heldout else ["–", "–"]
        for task, context in recall:
            r = m.recall_score(task, context)
            cells.append(f"{r.exact:.2f} ({r.delta:+.1f})" if r else "–")
        for task, metric in harness:
            value = m.lm_eval.get(task, {}).get(metric)
            cells.append(f"{value:.4f}" if value is not None else "–")
        rows.append("| " + " | ".join(cells) + " |")
    notes = []
    if recall:
        samples = sorted({r.samples for m in report.models for r in m.recall})
        notes.append(f"Recall cells: greedy exact match (continuous score: log-probability of the answer with the "
                     f"needle minus without it, nats). Samples per cell: {', '.join(map(str, samples))}.")
    if has_heldout:
        h = next(m.heldout for m in report.models if m.heldout)
        notes.append(f"Held-out: {h.tokens} tokens in blocks of {h.seq_len}; KL(teacher || model) in nats/token.")
    skipped = [f"{m.name}: {what} ({why})" for m in report.models for what, why in m.skipped.items()]
    if skipped:
        notes.append("Not measured: " + "; ".join(skipped) + ".")
    notes += [f"Warning ({m.name}): {w}" for m in report.models for w in m.warnings]
    if report.interrupted:
        notes.append("**Interrupted**: the table holds what was measured before Ctrl-C.")
    return "\n".join(rows) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def depth_table(report: EvalReport) -> str:
    """Where the recall misses are: exact match by the quarter of the filler the answer's needle starts in, and
    how often the answer's first token is right (a first token right and a later one wrong: the needle was
    found, and copying it failed). Empty when no score recorded depths (results written before 2026-12-06)."""
    rows = [(m, r) for m in report.models for r in m.recall if r.depth_samples]
    if not rows:
        return ""
    quarters = ["needle in 1st quarter (farthest)", "2nd", "3rd", "4th (nearest the question)"]
    lines = ["## Where the misses are", "",
             "| model | task@context | exact | " + " | ".join(quarters) + " | first answer token right |",
             "|" + "---|" * (len(quarters) + 4)]
    for m, r in rows:
        by_depth = [f"{x:.2f} ({n})" if x is not None else "–" for x, n in zip(r.exact_by_depth, r.depth_samples)]
        first = f"{r.first_token_hits / r.samples:.2f}" if r.first_token_hits is not None else "–"
        lines.append(f"| {m.name} | {r.task}@{r.context} | {r.exact:.2f} | " + " | ".join(by_depth) + f" | {first} |")
    return "\n".join(lines) + "\n\nDepth cells: exact match (samples whose needle starts in that quarter).\n"


def write_markdown(report: EvalReport, path: Path) -> None:
    header = f"# hybrid eval\n\n{report.date}, {report.device}\n\n`{report.command}`\n\n"
    depths = depth_table(report)
    path.write_text(header + markdown_table(report) + ("\n" + depths if depths else ""))


def plot(report: EvalReport, path: Path) -> Path | None:
    """Exact match and continuous score vs context per recall task, and held-out KL per model (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(task for task, _ in _recall_columns(report)))
    has_heldout = any(m.heldout for m in report.models)
    columns = len(tasks) + (1 if has_heldout else 0)
    if columns == 0:
        return None
    fig, axes = plt.subplots(2, columns, figsize=(3.6 * columns + 1, 6.4), squeeze=False)
    for col, task in enumerate(tasks):
        exact_ax, delta_ax = axes[0][col], axes[1][col]
        for i, m in enumerate(report.models):
            scores = sorted((r for r in m.recall if r.task == task), key=lambda r: r.context)
            if not scores:
                continue
            xs = [r.context for r in scores]
            style = {"marker": "o", "color": f"C{i}", "label": m.name, "linestyle": "--" if m.role == "teacher" else "-"}
            exact_ax.plot(xs, [r.exact for r in scores], **style)
            delta_ax.plot(xs, [r.delta for r in scores], **style)
        lengths = sorted({r.context for m in report.models for r in m.recall if r.task == task})
        for ax in (exact_ax, delta_ax):
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(x) for x in lengths])
            ax.minorticks_off()
            ax.set_xlabel("context (tokens)")
            ax.grid(alpha=0.3)
        exact_ax.set_ylim(-0.05, 1.05)
        exact_ax.set_title(f"{task}: greedy exact match")
        delta_ax.set_title(f"{task}: needle's log p gain")
        delta_ax.set_ylabel("log p(answer) with - without (nats)" if col == 0 else "")
    if has_heldout:
        names = [m.name for m in report.models if m.heldout]
        kl_ax, ppl_ax = axes[0][-1], axes[1][-1]
        colors = [f"C{i}" for i, m in enumerate(report.models) if m.heldout]
        kl_ax.bar(names, [m.heldout.kl for m in report.models if m.heldout], color=colors)
        kl_ax.set_title("held-out KL(teacher || model)")
        ppl_ax.bar(names, [m.heldout.perplexity for m in report.models if m.heldout], color=colors)
        ppl_ax.set_title("held-out perplexity")
        for ax in (kl_ax, ppl_ax):
            ax.tick_params(axis="x", rotation=30)
    if tasks:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"hybrid eval, {report.device}, {report.date}" + (" (interrupted)" if report.interrupted else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(report: EvalReport, out_dir: Path) -> dict[str, Path]:
    """results.json, results.md and results.png in `out_dir` (the plot only when there is something to plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    report.save(paths["json"])
    write_markdown(report, paths["markdown"])
    png = plot(report, out_dir / "results.png")
    if png is not None:
        paths["plot"] = png
    return paths
