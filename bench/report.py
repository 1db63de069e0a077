"""Markdown reports and PNG plots for `bench compare` (served, CPU) and `bench decode` (model level, GPU).

Both renderers take the JSON result their runner wrote, so a report can be re-rendered without
re-measuring: `hybrid bench report RESULT.json --out DIR`.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path

GiB = 2**30
MiB = 2**20


def command_line() -> str:
    """The command as a user would retype it (`hybrid bench ...` or `python -m bench.X ...`)."""
    prog = Path(sys.argv[0]).name
    if prog.endswith(".py"):
        prog = f"python -m bench.{Path(sys.argv[0]).stem}"
    return " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: float | None, spec: str = ".0f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def _provenance(result: dict) -> list[str]:
    lines = [
        f"- Command: `{result.get('command', '?')}`",
        f"- Machine: {result.get('machine', '?')}",
        f"- Date: {result.get('date', '?')}",
    ]
    if result.get("note"):
        lines.append(f"- Note: {result['note']}")
    return lines


# ----------------------------------------------------------------------------------------------
# bench decode
# ----------------------------------------------------------------------------------------------


def _best_tps(p: dict) -> float | None:
    return p.get("tokens_per_s_graph") or p.get("tokens_per_s_eager")


def decode_pairs(result: dict) -> list[dict]:
    """Teacher and hybrid points matched by (context, batch rule)."""
    by_key: dict[tuple, dict] = {}
    for p in result["points"]:
        by_key.setdefault((p["context"], p["batch_rule"]), {})[p["model"]] = p
    pairs = []
    for (context, rule), pair in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1] != "1", kv[0][1])):
        t, h = pair.get("teacher"), pair.get("hybrid")
        if t is None or h is None:
            continue
        pairs.append({
            "context": context, "rule": rule, "teacher": t, "hybrid": h,
            "speedup": _ratio(_best_tps(h), _best_tps(t)),
            "speedup_eager": _ratio(h.get("tokens_per_s_eager"), t.get("tokens_per_s_eager")),
            "roofline_speedup": _ratio(h.get("roofline_tokens_per_s"), t.get("roofline_tokens_per_s")),
        })
    return pairs


def render_decode_report(result: dict, out_dir: Path, prefix: str = "decode", extra: list[dict] | None = None) -> str:
    """Write {prefix}_report.md and {prefix}_*.png into out_dir; returns the markdown.

    extra: other decode results (e.g. the same run with another GDN step kernel) summarised at the end.
    """
    out_dir = Path(out_dir)
    cfg, models = result["config"], result["models"]
    pairs = decode_pairs(result)
    bw = result.get("copy_bandwidth_bytes_per_s")
    lines = [
        "# Decode throughput: teacher vs hybrid (model level, preallocated caches)",
        "",
        *_provenance(result),
        f"- Models: random weights with the shape of `{cfg['teacher']}`; teacher = all {models['teacher']['layers']} "
        f"layers softmax; hybrid = softmax at layers {models['hybrid']['softmax_layers']}, Gated DeltaNet elsewhere. "
        f"Same `transformers` implementation (`distill.model.modeling.HybridForCausalLM`) for both.",
        f"- Cache budget: {cfg['budget_gib']:g} GiB of KV/state per model; batch `max` = the most sequences whose "
        f"cache fits it (capped at {cfg['max_batch']}). {cfg['dtype']} weights and KV, {cfg['state_dtype']} GDN state, "
        f"GDN step: `{result['gdn_step']}`.",
        "- One step = every sequence emits one token attending to `context` cached tokens; tokens/s = batch / step "
        "time (CUDA-graph replay, median of repeats; eager in brackets). Caches filled with random values "
        "instead of a prefill (decode cost does not depend on them).",
    ]
    if bw:
        lines.append(f"- Measured device copy bandwidth: {bw / 1e12:.2f} TB/s (read + write). Roofline = batch / "
                     "(bytes a step must move: weights + KV read + GDN state read and write) / that bandwidth.")
    checks = result.get("checks", {})
    if checks:
        lines.append("- Static-cache check (float32, prefill + 4 greedy steps through the static cache vs the plain forward): " + "; ".join(
            f"{name}: FAILED ({c['error']})" if "error" in c else
            f"{name}: max rel. logit diff {c['max_rel_diff']:.2e}, argmax agreement {c['argmax_agreement']:.0%}"
            for name, c in checks.items()))
    lines += [
        "",
        "## Tokens/s, side by side",
        "",
        "| context | batch | teacher batch | hybrid batch | teacher tok/s | hybrid tok/s | hybrid / teacher | "
        "roofline ratio | teacher % of roofline | hybrid % of roofline |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pr in pairs:
        t, h = pr["teacher"], pr["hybrid"]

        def cell(p):
            return f"{_fmt(_best_tps(p))} ({_fmt(p.get('tokens_per_s_eager'))})"

        def pct(p):
            r = _ratio(_best_tps(p), p.get("roofline_tokens_per_s"))
            return _fmt(r * 100 if r else None, ".0f") + ("%" if r else "")

        lines.append(
            f"| {pr['context']:,} | {pr['rule']} | {t['batch']} | {h['batch']} | {cell(t)} | {cell(h)} | "
            f"**{_fmt(pr['speedup'], '.2f')}x** | {_x(pr['roofline_speedup'])} | {pct(t)} | {pct(h)} |"
        )
    lines += [
        "",
        "## Memory",
        "",
        "| context | batch | model | batch size | cache bytes / sequence | cache GiB | peak allocated GiB |",
        "|---:|:---|:---|---:|---:|---:|---:|",
    ]
    for pr in pairs:
        for name in ("teacher", "hybrid"):
            p = pr[name]
            peak = p.get("peak_allocated_bytes")
            lines.append(
                f"| {pr['context']:,} | {pr['rule']} | {name} | {p['batch']} | {p['bytes_per_sequence'] / MiB:,.2f} MiB | "
                f"{p['cache_bytes'] / GiB:.2f} | {_fmt(peak / GiB if peak else None, '.2f')} |"
            )
    on_gpu = result.get("config", {}).get("device", "cuda").startswith("cuda")
    for key, prof in (result.get("profiles") or {}).items():
        name, _, ctx = key.partition("@")
        point = next((p for p in result["points"] if p["model"] == name and p["context"] == int(ctx)
                      and p["batch_rule"] == "max"), None)
        step = f"; the graph-replayed step takes {point['step_ms_graph']:.2f} ms" if point and point["step_ms_graph"] else ""
        lines += ["", f"### Where a {name} step's device time goes (context {int(ctx):,}, largest batch)", "",
                  f"Kernels of eager steps under torch.profiler, largest first{step}. (aten:: rows, which repeat "
                  "the time of the kernels they launch, are left out.)", "",
                  "| kernel | µs / step | calls / step |", "|:---|---:|---:|"]
        for row in prof["top"]:
            if on_gpu and row["kernel"].startswith("aten::"):
                continue
            kernel = row["kernel"].replace("|", "/")
            lines.append(f"| `{kernel[:90]}` | {row['us_per_step']:,.0f} | {row['calls_per_step']:.0f} |")
    notes = [p for p in result["points"] if p.get("note")]
    if notes:
        lines += ["", "Notes: " + "; ".join(f"{p['model']} ctx {p['context']} batch {p['batch']}: {p['note']}"
                                            for p in notes)]
    lines += ["", "## Where the hybrid wins and where it does not", "", *decode_verdict(pairs)]
    for other in extra or []:
        lines += ["", f"## Variant: GDN step `{other['gdn_step']}` (a separate run)", "",
                  *_provenance(other), "",
                  "| context | batch | teacher tok/s | hybrid tok/s | hybrid / teacher |", "|---:|:---|---:|---:|---:|"]
        for pr in decode_pairs(other):
            lines.append(f"| {pr['context']:,} | {pr['rule']} ({pr['teacher']['batch']} vs {pr['hybrid']['batch']}) | "
                         f"{_fmt(_best_tps(pr['teacher']))} | {_fmt(_best_tps(pr['hybrid']))} | {_x(pr['speedup'])} |")
    if _plot_decode(pairs, out_dir, prefix):
        lines += ["", f"![decode tokens/s]({prefix}_throughput.png)", "",
                  f"![cache bytes per sequence]({prefix}_memory.png)"]
    text = "\n".join(lines) + "\n"
    (out_dir / f"{prefix}_report.md").write_text(text)
    return text


def decode_verdict(pairs: list[dict]) -> list[str]:
    out = []
    for pr in pairs:
        s = pr["speedup"]
        if s is None:
            continue
        where = f"context {pr['context']:,}, batch {pr['rule']} ({pr['teacher']['batch']} vs {pr['hybrid']['batch']})"
        roof = pr["roofline_speedup"]
        roof_txt = f"; the bandwidth roofline predicts {roof:.2f}x, measured is {s / roof:.0%} of that" if roof else ""
        if s >= 1.2:
            out.append(f"- **Wins** at {where}: {s:.2f}x the teacher's tokens/s{roof_txt}.")
        elif s >= 0.9:
            out.append(f"- About even at {where}: {s:.2f}x{roof_txt}.")
        else:
            out.append(f"- **Loses** at {where}: {s:.2f}x{roof_txt}.")
    out.append("- Physics: per token a softmax layer reads its whole KV cache (grows with context); a GDN layer "
               "reads and writes a fixed state. The hybrid's advantage is the softmax layers it removed, at long "
               "context and at the large batches its smaller cache admits; at batch 1 or short context the "
               "weights and the fixed GDN state dominate and it gains little or loses.")
    return out


def _plot_decode(pairs: list[dict], out_dir: Path, prefix: str) -> bool:
    try:
        plt = _plt()
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, rule in zip(axes, ["max", "1"]):
        sel = [p for p in pairs if p["rule"] == rule]
        if not sel:
            ax.set_visible(False)
            continue
        x = range(len(sel))
        ax.bar([i - 0.2 for i in x], [_best_tps(p["teacher"]) or 0 for p in sel], 0.4, label="teacher")
        ax.bar([i + 0.2 for i in x], [_best_tps(p["hybrid"]) or 0 for p in sel], 0.4, label="hybrid")
        for i, p in zip(x, sel):
            if p["speedup"]:
                ax.annotate(f"{p['speedup']:.2f}x", (i + 0.2, _best_tps(p["hybrid"]) or 0), ha="center",
                            va="bottom", fontsize=8)
        ax.set_xticks(list(x), [f"{p['context'] // 1024}K" if p["context"] >= 1024 else str(p["context"]) for p in sel])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("largest batch in the budget" if rule == "max" else f"batch {rule}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"{prefix}_throughput.png", dpi=110)
    plt.close(fig)

    sel = [p for p in pairs if p["rule"] == "max"] or pairs
    fig, ax = plt.subplots(figsize=(6, 4))
    ctx = [p["context"] for p in sel]
    ax.plot(ctx, [p["teacher"]["bytes_per_sequence"] / MiB for p in sel], "o-", label="teacher")
    ax.plot(ctx, [p["hybrid"]["bytes_per_sequence"] / MiB for p in sel], "o-", label="hybrid")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("cache MiB per sequence")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"{prefix}_memory.png", dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# bench compare
# ----------------------------------------------------------------------------------------------

MODELS = ("teacher", "hybrid")


def _capacity_table(result: dict) -> tuple[list[str], list[dict]]:
    budget = result["config"]["budget_gib"] * GiB
    layout = result.get("layout", {})
    by_ctx: dict[int, dict] = {}
    for c in result.get("capacity", []):
        by_ctx.setdefault(c["context"], {})[c["model"]] = c
    rows = []
    lines = [
        "| context | teacher max concurrency | hybrid max concurrency | hybrid / teacher | teacher 'KV cache size' tokens | "
        "hybrid 'KV cache size' tokens | teacher bytes/seq (vLLM) | hybrid bytes/seq (vLLM) | teacher bytes/seq (formula) | "
        "hybrid bytes/seq (formula) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ctx in sorted(by_ctx):
        t, h = by_ctx[ctx].get("teacher"), by_ctx[ctx].get("hybrid")
        if t is None or h is None:
            continue
        tc, hc = t["max_concurrency"], h["max_concurrency"]

        def per_seq_vllm(c):
            return budget / c if c else None

        def per_seq_formula(name):
            lay = layout.get(name)
            if not lay:
                return None
            return lay["kv_bytes_per_token_bf16"] * ctx + lay["state_bytes_per_sequence"]

        ratio = _ratio(hc, tc)
        row = {"context": ctx, "teacher": tc, "hybrid": hc, "ratio": ratio,
               "teacher_bytes_vllm": per_seq_vllm(tc), "hybrid_bytes_vllm": per_seq_vllm(hc),
               "teacher_bytes_formula": per_seq_formula("teacher"), "hybrid_bytes_formula": per_seq_formula("hybrid")}
        rows.append(row)

        def mib(x):
            return f"{x / MiB:,.1f} MiB" if x else "-"

        lines.append(
            f"| {ctx:,} | {tc:.2f} | {hc:.2f} | **{_x(ratio)}** | {_fmt(t.get('kv_cache_tokens'), ',')} | "
            f"{_fmt(h.get('kv_cache_tokens'), ',')} | {mib(row['teacher_bytes_vllm'])} | {mib(row['hybrid_bytes_vllm'])} | "
            f"{mib(row['teacher_bytes_formula'])} | {mib(row['hybrid_bytes_formula'])} |"
        )
    return lines, rows


def _load_rows(result: dict) -> dict[tuple[int, int], dict]:
    out: dict[tuple[int, int], dict] = {}
    for p in result.get("load", []):
        out.setdefault((p["context"], p["concurrency"]), {})[p["model"]] = p
    return out


def render_compare_report(result: dict, out_dir: Path) -> str:
    """Write report.md and compare_*.png into out_dir; returns the markdown."""
    out_dir = Path(out_dir)
    cfg = result["config"]
    lay = result.get("layout", {})
    lines = [
        "# Served comparison: teacher vs hybrid (vLLM OpenAI server, locust)",
        "",
        *_provenance(result),
        f"- Software: " + ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items()),
        f"- Teacher: `{cfg['teacher']}` ({lay.get('teacher', {}).get('layers', '?')} softmax layers); hybrid: "
        f"`{cfg['hybrid']}` ({lay.get('hybrid', {}).get('softmax_layers', '?')} softmax + "
        f"{lay.get('hybrid', {}).get('linear_layers', '?')} Gated DeltaNet layers).",
        f"- Same KV/state memory budget for both servers: {cfg['budget_gib']:g} GiB "
        "(VLLM_CPU_KVCACHE_SPACE). Both served on 127.0.0.1.",
    ]
    argv = result.get("server_argv", {})
    if argv:
        lines.append("- Server command: `" + " ".join(argv.get("hybrid") or argv.get("teacher") or []) + "`")
    lines += [
        "",
        "## Capacity: most concurrent sequences the engine can hold (vLLM's own figure, same budget)",
        "",
        "Read from each server's start-up log (`KV cache size: N tokens, Maximum concurrency for L tokens per "
        "request: X`), with `--max-model-len` = the context. Bytes/seq (vLLM) = budget / max concurrency "
        "(what vLLM actually reserves, page rounding included); formula = bf16 KV x context + fp32 GDN state.",
        "",
    ]
    cap_lines, cap_rows = _capacity_table(result)
    lines += cap_lines
    errs = [c for c in result.get("capacity", []) if c.get("error")]
    for c in errs:
        lines.append(f"\n- {c['model']} at {c['context']:,}: {c['error']}")

    load = _load_rows(result)
    if load:
        lines += [
            "",
            "## Load runs (locust, streaming, closed loop)",
            "",
            f"Each run: `concurrency` users, {cfg['requests_per_user']} requests each, prompt = the context in "
            f"random tokens, {cfg['output_tokens']} output tokens (ignore_eos), endpoint `{cfg['endpoint']}`; "
            f"bounded at {cfg['max_run_time_s']} s. Latencies in seconds (TTFT, E2E) and milliseconds (TPOT, ITL), "
            "percentiles from our per-request records (bench/metrics.py). Server columns from /metrics and psutil.",
            "",
            "| prompt | users | model | ok/err | req/s | out tok/s | TTFT p50/p90/p99 s | TPOT p50/p90/p99 ms | "
            "ITL p50/p99 ms | E2E p50/p90/p99 s | KV use max | running max | waiting max | preempt | PSS peak GiB |",
            "|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for (ctx, users), pair in sorted(load.items()):
            for name in MODELS:
                p = pair.get(name)
                if p is None:
                    continue
                s, srv = p["summary"], p["server"]

                def pct(d, scale, spec, keys=("p50", "p90", "p99")):
                    return "/".join(_fmt(d[k] * scale if d[k] is not None else None, spec) for k in keys)

                kv = srv.get("kv_cache_usage_max")
                pss = srv.get("pss_peak_bytes")
                lines.append(
                    f"| {ctx} | {users} | {name} | {s['completed']}/{s['errors']} | {s['requests_per_s']:.3f} | "
                    f"{s['output_tokens_per_s']:.2f} | {pct(s['ttft'], 1, '.2f')} | {pct(s['tpot'], 1e3, '.0f')} | "
                    f"{pct(s['itl'], 1e3, '.0f', ('p50', 'p99'))} | {pct(s['e2e'], 1, '.2f')} | "
                    f"{_fmt(kv * 100 if kv is not None else None, '.1f')}% | {_fmt(srv.get('running_max'), '.0f')} | "
                    f"{_fmt(srv.get('waiting_max'), '.0f')} | {_fmt(srv.get('preemptions'), '.0f')} | "
                    f"{_fmt(pss / GiB if pss else None, '.2f')} |"
                )
        errors = {(p["model"], p["context"], p["concurrency"]): p["summary"]["error_kinds"]
                  for p in result["load"] if p["summary"]["errors"]}
        if errors:
            lines += ["", "Errors: " + "; ".join(f"{m} prompt {c} users {u}: {k}" for (m, c, u), k in errors.items())]
    idle = result.get("idle_memory", {})
    if idle:
        lines += ["", "Idle server memory after start-up (process tree): " + "; ".join(
            f"{name} RSS {m.get('rss_bytes', 0) / GiB:.2f} GiB, PSS {m.get('pss_bytes', 0) / GiB:.2f} GiB "
            f"({m.get('processes', '?')} processes)" for name, m in idle.items())]
    info = result.get("hybrid_endpoint")
    if info:
        engine = info.get("engine", {})
        lines += ["", "The hybrid server's own account (GET /v1/hybrid): "
                  f"KV {_fmt(info.get('kv_bytes_per_token'), ',')} bytes/token, GDN state "
                  f"{_fmt(info.get('state_bytes_per_sequence'), ',')} bytes/sequence, dtypes "
                  f"{json.dumps(info.get('dtypes', {}))}, engine {json.dumps(engine)}."]
    lines += ["", "## Where the hybrid wins and where it does not", "", *compare_verdict(cap_rows, load)]
    for png, title in _plot_compare(result, cap_rows, load, out_dir):
        lines += ["", f"![{title}]({png})"]
    text = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(text)
    return text


def compare_verdict(cap_rows: list[dict], load: dict) -> list[str]:
    out = []
    for row in cap_rows:
        if row["ratio"] is None:
            continue
        verb = "holds" if row["ratio"] >= 1 else "holds only"
        out.append(f"- Capacity at {row['context']:,} tokens: the hybrid {verb} {row['ratio']:.2f}x the teacher's "
                   f"concurrent sequences on the same memory ({row['hybrid']:.1f} vs {row['teacher']:.1f}).")
    ratios = []
    for (ctx, users), pair in sorted(load.items()):
        t, h = pair.get("teacher"), pair.get("hybrid")
        if not t or not h:
            continue
        r = _ratio(h["summary"]["output_tokens_per_s"], t["summary"]["output_tokens_per_s"])
        if r is not None:
            ratios.append((ctx, users, r))
    if ratios:
        lo, hi = min(ratios, key=lambda x: x[2]), max(ratios, key=lambda x: x[2])
        out.append(f"- Served throughput at the short prompts that finish on this machine: hybrid / teacher output "
                   f"tokens/s ranges from {lo[2]:.2f}x (prompt {lo[0]}, {lo[1]} users) to {hi[2]:.2f}x (prompt "
                   f"{hi[0]}, {hi[1]} users). At these lengths the KV cache is small next to the weights and the "
                   "fixed GDN state, so there is no bandwidth to win: expect about 1x, and less where the GDN "
                   "layers' CPU kernels are slower than the attention they replace.")
    out.append("- The hybrid's win is memory: per sequence it keeps KV for its softmax layers only, plus a fixed "
               "state, so at long contexts the same pool holds several times more sequences (table above), and "
               "decode moves fewer bytes per token (see the GPU decode report). It does not win at short prompts "
               "or batch 1.")
    return out


def _plot_compare(result: dict, cap_rows: list[dict], load: dict, out_dir: Path) -> list[tuple[str, str]]:
    try:
        plt = _plt()
    except ImportError:
        return []
    made = []
    contexts = sorted({ctx for ctx, _ in load})
    if contexts:
        # throughput vs concurrency, one panel per prompt length
        fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 3.8), squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            for name in MODELS:
                pts = sorted((u, pair[name]["summary"]["output_tokens_per_s"])
                             for (c, u), pair in load.items() if c == ctx and name in pair)
                if pts:
                    ax.plot([u for u, _ in pts], [v for _, v in pts], "o-", label=name)
            ax.set_title(f"prompt {ctx} tokens")
            ax.set_xlabel("concurrent users")
            ax.set_ylabel("output tokens/s")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "compare_throughput.png", dpi=110)
        plt.close(fig)
        made.append(("compare_throughput.png", "throughput vs concurrency"))

        # TTFT and TPOT percentiles vs concurrency
        fig, axes = plt.subplots(2, len(contexts), figsize=(5 * len(contexts), 7), squeeze=False)
        for col, ctx in enumerate(contexts):
            for row, (metric, scale, unit) in enumerate((("ttft", 1, "s"), ("tpot", 1e3, "ms"))):
                ax = axes[row][col]
                for name, color in zip(MODELS, ("tab:blue", "tab:orange")):
                    pts = sorted((u, pair[name]["summary"][metric]) for (c, u), pair in load.items()
                                 if c == ctx and name in pair)
                    for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
                        ys = [d[q] * scale if d[q] is not None else float("nan") for _, d in pts]
                        ax.plot([u for u, _ in pts], ys, style, color=color, label=f"{name} {q}")
                ax.set_title(f"{metric.upper()}, prompt {ctx}")
                ax.set_xlabel("concurrent users")
                ax.set_ylabel(unit)
                ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "compare_latency.png", dpi=110)
        plt.close(fig)
        made.append(("compare_latency.png", "TTFT and TPOT percentiles"))

    if cap_rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        x = range(len(cap_rows))
        labels = [f"{r['context'] // 1024}K" for r in cap_rows]
        ax = axes[0]
        ax.bar([i - 0.2 for i in x], [r["teacher"] for r in cap_rows], 0.4, label="teacher")
        ax.bar([i + 0.2 for i in x], [r["hybrid"] for r in cap_rows], 0.4, label="hybrid")
        for i, r in zip(x, cap_rows):
            if r["ratio"]:
                ax.annotate(f"{r['ratio']:.2f}x", (i + 0.2, r["hybrid"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), labels)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("max concurrent sequences (vLLM)")
        ax.set_title(f"same {result['config']['budget_gib']:g} GiB KV/state pool")
        ax.legend()
        ax = axes[1]
        for key, name, style in (("teacher_bytes_vllm", "teacher (vLLM)", "o-"), ("hybrid_bytes_vllm", "hybrid (vLLM)", "o-"),
                                 ("teacher_bytes_formula", "teacher (formula)", "x--"),
                                 ("hybrid_bytes_formula", "hybrid (formula)", "x--")):
            ys = [r[key] / MiB if r[key] else float("nan") for r in cap_rows]
            ax.plot([r["context"] for r in cap_rows], ys, style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("MiB per sequence")
        ax.set_title("cache bytes per sequence")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "compare_capacity.png", dpi=110)
        plt.close(fig)
        made.append(("compare_capacity.png", "capacity and bytes per sequence"))
    return made
