"""Where a model's softmax heads look when it must recall a passkey: attention on the needle, per head.

    python -m bench.retrieval_heads --teacher smollm2-135m --hybrid ga-s2=PATH --lengths 2048 4096 \\
        --samples 32 --out bench/results/retrieval_heads

For every passkey prompt (`distill.recall_tasks`, the same samples `hybrid eval` scores) and every softmax
attention layer, the attention probabilities of the position that predicts the answer's first token are
summed over the needle's tokens: a head's *needle mass*, from 0 (it looks elsewhere) to 1 (it looks only at
the needle). Heads with a high mass are the model's retrieval heads. The teacher's show which layers long-range
recall runs through; a hybrid's (its softmax layers only; GDN layers have no attention to read) show whether the
heads it kept still find the needle when it is far from the question, and whether the samples it misses are
those where they do not. Masses are kept per quarter of the filler in which the needle starts (0: farthest).

With --restore-each, each hybrid is measured again once per GDN layer, that one layer put back to the teacher's
softmax attention (`distill.model.transfer.restore_softmax`), on the samples of the longest length whose needle
lies in the farthest quarter: which layer, as GDN, takes the far needle away (a restored layer below a kept
retrieval head changes that head's input), and which restored layer recalls it by itself.

Writes OUT/retrieval_heads.json, OUT/retrieval_heads.md and OUT/retrieval_heads.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from distill.distributed import Runtime, init_runtime
from distill.eval_recall import DEPTH_BINS, depth_bin
from distill.model.transfer import restore_softmax
from distill.provenance import machine_description
from distill.recall_tasks import RecallSample, RecallTaskSpec, build_recall_task
from distill.retrieval_heads import SampleMass, layer_scores, mean_mass, measure, softmax_attention_layers

TOP_HEADS = 12  # teacher heads listed in the report


@dataclass
class ModelHeads:
    """One model at one context length: mean needle mass per head, overall, per depth quarter, hits vs misses."""

    name: str
    context: int
    samples: int
    recalled: float
    mean: dict[int, list[float]]
    by_depth: list[dict[int, list[float]]] = field(default_factory=list)  # one per quarter (empty where no sample)
    depth_samples: list[int] = field(default_factory=list)
    hits_mean: dict[int, list[float]] = field(default_factory=dict)
    misses_mean: dict[int, list[float]] = field(default_factory=dict)


def summarise(name: str, context: int, rows: list[SampleMass]) -> ModelHeads:
    quarters = [[r for r in rows if r.depth == q] for q in range(DEPTH_BINS)]
    return ModelHeads(
        name=name, context=context, samples=len(rows), recalled=sum(r.hit for r in rows) / len(rows),
        mean=mean_mass(rows), by_depth=[mean_mass(q) for q in quarters], depth_samples=[len(q) for q in quarters],
        hits_mean=mean_mass([r for r in rows if r.hit]), misses_mean=mean_mass([r for r in rows if not r.hit]),
    )


def top_heads(heads: ModelHeads, n: int = TOP_HEADS) -> list[tuple[int, int, float]]:
    """(layer, head, mean needle mass), largest first."""
    flat = [(layer, h, m) for layer, masses in heads.mean.items() for h, m in enumerate(masses)]
    return sorted(flat, key=lambda x: -x[2])[:n]


@dataclass
class RestoredLayer:
    """A hybrid with one GDN layer (None: none) put back to the teacher's softmax, on far-needle samples."""

    layer: int | None
    recalled: float
    mean: dict[int, list[float]]  # needle mass per softmax layer (the restored one included) and head


def restore_each(model: nn.Module, teacher: nn.Module, samples: list[RecallSample], runtime: Runtime,
                 name: str) -> list[RestoredLayer]:
    """The hybrid as trained, then once per GDN layer with only that layer restored to the teacher's softmax."""
    gdn = [i for i in range(len(model.model.layers)) if i not in softmax_attention_layers(model)]
    rows = []
    for layer in [None, *gdn]:
        variant = model if layer is None else restore_softmax(model, teacher, [layer])
        masses = measure(variant, samples, runtime, f"{name} restored {layer}")
        rows.append(RestoredLayer(layer, sum(m.hit for m in masses) / len(masses), mean_mass(masses)))
        del variant
    return rows


# ---- report ------------------------------------------------------------------------------------------------


def _cell(masses: dict[int, list[float]], layer: int, head: int) -> str:
    return f"{masses[layer][head]:.2f}" if layer in masses else "—"


def render(teacher: list[ModelHeads], hybrids: dict[str, list[ModelHeads]], softmax: dict[str, list[int]],
           restored: dict[str, list[RestoredLayer]], command: str, machine: str, seconds: float) -> str:
    lines = ["# Retrieval heads: where softmax heads look when a passkey must be recalled", "",
             f"{datetime.date.today()}, {machine}; {seconds:.0f} s", "", f"`{command}`", "",
             "Needle mass: the attention probability that the position predicting the answer's first token puts on "
             "the needle's tokens, averaged over samples. Quarters: of the filler in which the needle starts, "
             "farthest from the question first.", ""]
    for t in teacher:
        hyb = {name: next(h for h in runs if h.context == t.context) for name, runs in hybrids.items()}
        lines += [f"## passkey@{t.context} ({t.samples} samples; depth quarters hold {t.depth_samples})", "",
                  f"Recalled (first answer token): teacher {t.recalled:.2f}"
                  + "".join(f", {n} {h.recalled:.2f}" for n, h in hyb.items()) + ".", ""]
        head = ["teacher head", "mass", "by quarter (far → near)"]
        for n in hyb:
            head += [f"softmax in {n}", f"{n}: by quarter", f"{n}: hits / misses"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for layer, h, m in top_heads(t):
            cells = [f"L{layer}.H{h}", f"{m:.2f}", " / ".join(_cell(q, layer, h) for q in t.by_depth)]
            for n, hh in hyb.items():
                kept = layer in softmax[n]
                cells += ["yes" if kept else "no (GDN)",
                          " / ".join(_cell(q, layer, h) for q in hh.by_depth) if kept else "—",
                          f"{_cell(hh.hits_mean, layer, h)} / {_cell(hh.misses_mean, layer, h)}" if kept else "—"]
            lines.append("| " + " | ".join(cells) + " |")
        scores = layer_scores(t.mean)
        order = sorted(scores, key=lambda i: -scores[i])
        lines += ["", "Teacher layers by their strongest head's needle mass: "
                  + ", ".join(f"{i} ({scores[i]:.2f})" for i in order[:12]) + "."]
        for n in hyb:
            k = len(softmax[n])
            kept = sorted(set(order[:k]) & set(softmax[n]))
            lines.append(f"Of the teacher's top {k} layers, {n} keeps {len(kept)} softmax: {kept or 'none'}.")
        lines.append("")
    if restored:
        lines += render_restored(teacher[-1], restored)
    return "\n".join(lines)


def render_restored(teacher: ModelHeads, restored: dict[str, list[RestoredLayer]]) -> list[str]:
    """One table per hybrid: far-needle recall and the teacher's strongest heads' mass, per restored layer."""
    heads = [(layer, h) for layer, h, _ in top_heads(teacher, 6)]
    lines = []
    for name, rows in restored.items():
        lines += [f"## {name} with one GDN layer restored to the teacher's softmax (passkey@{teacher.context}, "
                  f"needle in the farthest quarter)", "",
                  "Needle mass of the teacher's strongest heads where they are softmax in that variant (— where GDN); "
                  "teacher's own in the first row.", "",
                  "| restored layer | recalled | " + " | ".join(f"L{layer}.H{h}" for layer, h in heads) + " |",
                  "|---|---|" + "---|" * len(heads),
                  "| teacher | — | " + " | ".join(_cell(teacher.by_depth[0], layer, h) for layer, h in heads) + " |"]
        for row in rows:
            label = "none (as trained)" if row.layer is None else str(row.layer)
            lines.append(f"| {label} | {row.recalled:.2f} | "
                         + " | ".join(_cell(row.mean, layer, h) for layer, h in heads) + " |")
        lines.append("")
    return lines


def plot(teacher: list[ModelHeads], softmax: dict[str, list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(teacher), figsize=(4.5 * len(teacher), 6), squeeze=False)
    for ax, t in zip(axes[0], teacher):
        layers = sorted(t.mean)
        grid = torch.tensor([t.mean[i] for i in layers]).numpy()
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(float(grid.max()), 1e-6))
        ax.set_title(f"teacher needle mass, passkey@{t.context}")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
        for n, kept in softmax.items():
            for row, layer in enumerate(layers):
                if layer in kept:
                    ax.annotate("◀", (grid.shape[1] - 0.4, row), fontsize=8, color="red", va="center",
                                annotation_clip=False)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if softmax:
        fig.text(0.01, 0.01, "◀ softmax layer kept by " + ", ".join(softmax), color="red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m", help="teacher spec (as `hybrid convert --teacher`)")
    parser.add_argument("--hybrid", nargs="*", default=[], metavar="NAME=PATH", help="hybrid checkpoints to compare")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--samples", type=int, default=32, help="passkey samples per length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-attention", action="store_true",
                        help="also measure each hybrid with its softmax layers' attention weights put back to the "
                             "teacher's: tells a failure of the trained weights from one of their input")
    parser.add_argument("--restore-each", action="store_true",
                        help="also measure each hybrid once per GDN layer restored to the teacher's softmax, on the "
                             "longest length's samples with the needle in the farthest quarter")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from distill.eval_run import load_model
    from distill.model.teacher import load_teacher

    hybrid_paths = {}
    for spec in args.hybrid:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--hybrid {spec!r}: expected NAME=PATH")
        hybrid_paths[name] = path
    runtime = init_runtime(args.device)
    started = time.perf_counter()
    teacher, tokenizer = load_teacher(args.teacher)
    teacher = teacher.to(runtime.device).requires_grad_(False)
    tasks = {L: build_recall_task(RecallTaskSpec("passkey", L, args.samples, args.seed), tokenizer) for L in args.lengths}
    teacher_heads = [summarise("teacher", L, measure(teacher, s, runtime, f"teacher@{L}")) for L, s in tasks.items()]
    teacher_attention = {i: {k: v.clone() for k, v in attn.state_dict().items()}
                         for i, attn in softmax_attention_layers(teacher).items()}
    longest = max(tasks)
    far = [s for s in tasks[longest] if depth_bin(s) == 0]
    if args.restore_each and not far:
        parser.error(f"--restore-each: none of the {args.samples} samples at {longest} tokens has its needle in the "
                     "farthest quarter; use more --samples")
    hybrids, softmax, restored = {}, {}, {}
    for name, path in hybrid_paths.items():
        model, _ = load_model(path, runtime)
        if args.restore_each:
            restored[name] = restore_each(model, teacher, far, runtime, name)
        variants = [name]
        if args.teacher_attention:
            variants.append(f"{name}+teacher-attention")
        for variant in variants:
            if variant != name:  # the same hybrid, its softmax layers' weights put back to the teacher's
                for i, attn in softmax_attention_layers(model).items():
                    attn.load_state_dict(teacher_attention[i])
            softmax[variant] = sorted(softmax_attention_layers(model))
            hybrids[variant] = [summarise(variant, L, measure(model, s, runtime, f"{variant}@{L}"))
                                for L, s in tasks.items()]
        del model
    del teacher
    seconds = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.retrieval_heads " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = machine_description(runtime.device.type)
    report = {"command": command, "machine": machine, "date": str(datetime.date.today()), "seconds": seconds,
              "teacher": [asdict(t) for t in teacher_heads], "softmax_layers": softmax,
              "hybrids": {n: [asdict(h) for h in runs] for n, runs in hybrids.items()},
              "restored": {n: [asdict(r) for r in rows] for n, rows in restored.items()}}
    (args.out / "retrieval_heads.json").write_text(json.dumps(report, indent=1))
    (args.out / "retrieval_heads.md").write_text(render(teacher_heads, hybrids, softmax, restored, command, machine, seconds))
    plot(teacher_heads, softmax, args.out / "retrieval_heads.png")
    print(f"wrote {args.out}/retrieval_heads.json, .md, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
