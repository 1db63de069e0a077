"""The before/after table of `bench/train_throughput.py` rows: one markdown table per teacher shape.

    python -m bench.throughput_table bench/results/train_throughput.jsonl [--label modes] [--date 2026-12-05]

Each row: the stage (plain fine-tuning baseline, Stage 1, Stage 2), the mode it ran in, tokens/s and its ratio
to the same stage's 'plain' row of the same run, MFU, peak GPU memory, how many timed steps were replayed
from a CUDA graph, and the first logged loss (a mode that changed the numbers would show it there). The
issue-14 targets (SmolLM2-135M at 8 x 2048 on one H100) are checked where those rows exist.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.data import jsonl_rows
from distill.errors import UserError

STAGE_NAMES = {"plain_finetune": "plain fine-tune (baseline)", "stage1": "Stage 1", "stage2": "Stage 2"}
TARGET_TOK_S = {"stage1": 150_000, "stage2": 100_000}  # SmolLM2-135M, 8 x 2048, one H100 (issue 14)


def load_rows(path: Path, label: str | None = None, date: str | None = None) -> list[dict]:
    rows = []
    for n, row in jsonl_rows(path):
        if "mode" not in row:
            raise UserError(f"{path}:{n}: row has no 'mode' field (written before --modes existed)")
        if (label is None or row.get("label") == label) and (date is None or row.get("date") == date):
            rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    """One table per (teacher, device, micro-batch x seq), rows in the order they were measured."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["teacher"], row["device"], row["micro_batch"], row["seq"]), []).append(row)
    out = []
    for (teacher, device, micro, seq), group in groups.items():
        plain = {r["what"]: r for r in group if r["mode"] == "plain"}
        out += [f"### {teacher}, {micro} x {seq}, {device}", "",
                "| run | mode | tokens/s | vs plain | MFU | peak GPU memory | replayed steps | first loss |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in group:
            base = plain.get(r["what"])
            ratio = f"{r['tok_per_s'] / base['tok_per_s']:.2f}×" if base and base is not r else ""
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "—"
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "—"
            if r.get("pieces", 1) > 1:  # ran out of memory, then ran each micro-batch in pieces: their own peak
                mem = f"{r['peak_mem_timed_gib']:.1f} GiB in {r['pieces']} forwards per micro-batch"
            out.append(f"| {STAGE_NAMES[r['what']]} | {r['mode']} | {r['tok_per_s']:,} | {ratio} | {mfu} | {mem} "
                       f"| {r.get('replayed_steps', 0)} of {r['timed_steps']} | {r['first_loss']:.5f} |")
        out += ["", *target_lines(teacher, device, micro, seq, group), ""]
    return "\n".join(out).rstrip() + "\n"


def target_lines(teacher: str, device: str, micro: int, seq: int, group: list[dict]) -> list[str]:
    if not (teacher.startswith("smollm2-135m") and micro == 8 and seq == 2048 and "H100" in device):
        return []
    lines = []
    for what, target in TARGET_TOK_S.items():
        best = max((r for r in group if r["what"] == what), key=lambda r: r["tok_per_s"], default=None)
        if best:
            verdict = "met" if best["tok_per_s"] >= target else "missed"
            lines.append(f"- {STAGE_NAMES[what]} target {target:,} tokens/s: **{verdict}** "
                         f"(best {best['tok_per_s']:,}, mode {best['mode']})")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", type=Path, help="a JSON-lines file written by bench/train_throughput.py --out")
    p.add_argument("--label", help="only rows with this --label")
    p.add_argument("--date", help="only rows of this date (YYYY-MM-DD)")
    args = p.parse_args(argv)
    if not args.rows.is_file():
        raise SystemExit(f"{args.rows}: no such file")
    try:
        rows = load_rows(args.rows, args.label, args.date)
    except UserError as err:
        raise SystemExit(str(err)) from None
    if not rows:
        raise SystemExit(f"{args.rows}: no rows match label={args.label!r} date={args.date!r}")
    print(render(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
