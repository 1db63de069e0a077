"""GPU benchmark of kernels/: fused linear + KL (Stage 2) and the GDN decode step, against libraries.

    python bench/kernels_bench.py bench/results/kernels.md [--sections kl,decode,sweep,dqkwg]

Every implementation is first checked against float64 references on fresh random inputs (never
zeros); then it is timed:
- KL: forward + backward at the issue's two shapes, median of several runs (CUDA events), and the
  peak memory above what was allocated before the call (torch.cuda.max_memory_allocated);
  ours vs naive torch, fla `fused_kl_div_loss`, Liger `LigerFusedLinearJSD(jsd_beta=0)`.
- GDN decode: one step for B sequences x 32 heads x 128 x 128, replayed from a CUDA graph that
  rotates over enough state-cache rows to defeat the L2 cache; ours vs fla
  `fused_recurrent_gated_delta_rule` (run in a subprocess: a crash there must not end this run)
  and vs a plain copy of the same bytes (the roofline).
- GDN chunk_bwd_dqkwg (section dqkwg, not in the default list): our Triton kernel's errors against the float64
  torch form on bf16 inputs, and its time per launch config against the torch form training runs today.
Writes markdown tables to the path given; prints them too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distill.provenance import package_versions  # noqa: E402
from kernels.gdn import naive_recurrent_gated_delta_rule  # noqa: E402
from kernels.gdn_decode import _gdn_decode_step_triton, decode_launch_config, gdn_decode_step  # noqa: E402
from kernels.kl import auto_chunk_tokens, fused_linear_kl, naive_kl  # noqa: E402

GiB = 2**30
KL_SHAPES = [(16384, 49152, 576), (16384, 151936, 2048)]  # tokens, vocab, hidden (student = teacher)
DECODE_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
HEADS, DK, DV = 32, 128, 128
ROTATE_BYTES = 256 * 2**20  # state bytes touched per graph replay, >> the 50 MB L2 of an H100


# ------------------------------------------------------------------------------------------ utils


def table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def time_ms(fn: Callable[[], None], reps: int, setup: Callable[[], None] = lambda: None) -> float:
    """Median wall time of fn on the device (CUDA events), setup excluded."""
    times = []
    for _ in range(reps):
        setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_us(fns: list[Callable[[], object]], replays: int = 30) -> float:
    """Capture fns (one call each) into one CUDA graph; median replay time / len(fns), in us."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile and allocate outside the capture
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(3):
        graph.replay()
    ms = time_ms(graph.replay, replays)
    del graph
    return 1000 * ms / len(fns)


def eager_time_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Back-to-back calls without graphs (launch overhead included), per call."""
    fn()
    return 1000 * time_ms(lambda: [fn() for _ in range(calls)], 3) / calls


# ------------------------------------------------------------------------------------- ceilings


def measure_ceilings() -> dict:
    x = torch.randn(GiB // 4, device="cuda")
    y = torch.empty_like(x)
    copy_ms = time_ms(lambda: y.copy_(x), 20)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b, 20)
    return {"copy_TBps": 2 * GiB / copy_ms / 1e9, "bf16_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def ceilings_section(c: dict) -> str:
    return "## Device ceilings (measured)\n\n" + table(
        ["device-to-device copy (read + write)", "bf16 matmul 8192^3"],
        [[f"{c['copy_TBps']:.2f} TB/s", f"{c['bf16_TFLOPs']:.0f} TFLOP/s"]],
    )


# ------------------------------------------------------------------------------------------- KL


def kl_impls() -> dict[str, Callable]:
    """name -> f(h_s, w_s, h_t, w_t) -> loss; libraries that fail to import are left out."""
    impls = {
        "ours (fused_linear_kl)": lambda hs, ws, ht, wt: fused_linear_kl(hs, ws, ht, wt),
        "naive torch": lambda hs, ws, ht, wt: naive_kl(hs, ws, ht, wt),
    }
    try:
        from fla.modules.fused_kl_div import fused_kl_div_loss

        impls["fla fused_kl_div_loss"] = lambda hs, ws, ht, wt: fused_kl_div_loss(hs, ht, ws, wt)
    except Exception as e:  # noqa: BLE001
        print("fla KL unavailable:", e)
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0)
        impls["Liger FusedLinearJSD(beta=0)"] = lambda hs, ws, ht, wt: jsd(hs, ws, ht, wt, None)  # no shift_labels
    except Exception as e:  # noqa: BLE001
        print("Liger unavailable:", e)
    return impls


def kl_inputs(n, vocab, hs, ht, dtype, seed, close=None):
    """Random hidden states and lm_heads with logits of std ~2; student and teacher independent, or
    (close = eps) the teacher is the student with its lm_head perturbed by eps (KL ~ 1e-3)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h_s = torch.randn(n, hs, device="cuda", generator=gen).to(dtype).requires_grad_()
    w_s = (torch.randn(vocab, hs, device="cuda", generator=gen) * 2 / hs**0.5).to(dtype).requires_grad_()
    if close is not None:
        noise = torch.randn(vocab, hs, device="cuda", generator=gen) * close * 2 / hs**0.5
        return h_s, w_s, h_s.detach().clone(), (w_s.detach().float() + noise).to(dtype)
    h_t = torch.randn(n, ht, device="cuda", generator=gen).to(dtype)
    w_t = (torch.randn(vocab, ht, device="cuda", generator=gen) * 2 / ht**0.5).to(dtype)
    return h_s, w_s, h_t, w_t


def kl_reference(h_s, w_s, h_t, w_t, temperature):
    hs64, ws64 = (x.detach().double().requires_grad_() for x in (h_s, w_s))
    loss = naive_kl(hs64, ws64, h_t.double(), w_t.double(), temperature=temperature)
    return (loss.detach(), *torch.autograd.grad(loss, (hs64, ws64)))


def kl_errors(fn, inputs, temperature, ref):
    h_s, w_s = inputs[0], inputs[1]
    h_s.grad = w_s.grad = None
    loss = fn(*inputs, temperature) if temperature is not None else fn(*inputs)
    loss.backward()
    return [rel_err(loss.detach(), ref[0]), rel_err(h_s.grad, ref[1]), rel_err(w_s.grad, ref[2])]


def kl_correctness(impls) -> tuple[str, bool]:
    tol = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-3, 2e-2)}  # (loss, gradients) relative
    rows, ok = [], True
    # (dtype, temperature, seed, teacher): independent models (KL ~ 2), or a close teacher (KL ~ 1e-3)
    cases = [(torch.float32, 1.0, 0, None), (torch.bfloat16, 1.0, 1, None), (torch.bfloat16, 0.7, 2, None),
             (torch.float32, 1.0, 3, 0.03), (torch.bfloat16, 1.0, 4, 0.03)]
    for dtype, temperature, seed, close in cases:
        inputs = kl_inputs(1000, 5003, 64, 96, dtype, seed, close)  # ragged: partial chunks and V blocks
        ref = kl_reference(*inputs, temperature)
        case = [str(dtype).split(".")[1], temperature, "close" if close else "independent", f"{ref[0].item():.2e}"]
        ours = kl_errors(
            lambda hs, ws, ht, wt, t: fused_linear_kl(hs, ws, ht, wt, temperature=t, chunk_tokens=384),
            inputs, temperature, ref,
        )
        passed = ours[0] <= tol[dtype][0] and max(ours[1:]) <= tol[dtype][1]
        ok &= passed
        rows.append(["ours", *case, *ours, "pass" if passed else "FAIL"])
        if temperature == 1.0:  # the libraries at their defaults (T = 1)
            for name, fn in impls.items():
                if not name.startswith("ours"):
                    try:
                        rows.append([name, *case, *kl_errors(fn, inputs, None, ref), "-"])
                    except Exception as e:  # noqa: BLE001
                        rows.append([name, *case, "error", type(e).__name__, "", str(e)[:60]])
    text = "### Correctness vs float64 (1,000 tokens, vocab 5,003, hidden 64 / 96)\n\n" + table(
        ["impl", "dtype", "T", "teacher", "KL", "loss rel err", "grad_hidden rel err", "grad_weight rel err",
         "ours within (loss, grads) fp32 1e-4 / bf16 (1e-3, 2e-2)"],
        rows,
    )
    return text, ok


def kl_measure(fn, inputs, reps) -> tuple[float, float]:
    """(median ms of forward + backward, peak GiB above what was allocated before the call)."""
    h_s, w_s = inputs[0], inputs[1]

    def clear():
        h_s.grad = w_s.grad = None

    def step():
        fn(*inputs).backward()

    clear()
    step()  # warm-up: compile, cuBLAS handles
    clear()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / GiB
    ms = time_ms(step, reps, setup=clear)
    clear()
    return ms, extra


def kl_timing(impls, ceilings) -> str:
    parts = []
    for n, vocab, hidden in KL_SHAPES:
        inputs = kl_inputs(n, vocab, hidden, hidden, torch.bfloat16, seed=10)
        gemm_flops = 2 * n * vocab * hidden * 4  # both logits, grad_hidden, grad_weight
        floor_ms = gemm_flops / (ceilings["bf16_TFLOPs"] * 1e9) if ceilings else float("nan")
        variants = dict(impls)
        auto = auto_chunk_tokens(n, vocab, hidden, 2, True)
        for chunk in (1024, 2048, 4096):
            variants[f"ours, chunk_tokens={chunk}"] = (
                lambda hs, ws, ht, wt, c=chunk: fused_linear_kl(hs, ws, ht, wt, chunk_tokens=c)
            )
        results = {}
        for name, fn in variants.items():
            try:
                results[name] = kl_measure(fn, inputs, reps=5)
            except torch.cuda.OutOfMemoryError:
                results[name] = (float("nan"), float("nan"))
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                print(f"KL {name} failed: {e}")
                traceback.print_exc()
                results[name] = (float("nan"), float("nan"))
            print(f"KL {n}x{vocab}x{hidden} {name}: {results[name]}", flush=True)
        naive_ms = results["naive torch"][0]
        rows = [
            [name, f"{ms:.1f}", f"{extra:.2f}", f"{ms / naive_ms:.2f}x", f"{floor_ms / ms:.0%}"]
            for name, (ms, extra) in results.items()
        ]
        parts.append(
            f"### {n:,} tokens x vocab {vocab:,} x hidden {hidden:,} (bf16, forward + backward; "
            f"ours picks chunk_tokens={auto})\n\n"
            + table(["impl", "ms (median of 5)", "extra GiB (peak)", "time / naive", "4-GEMM floor / time"], rows)
            + f"\n\n4-GEMM floor: {gemm_flops / 1e12:.1f} TFLOP at the measured matmul rate = {floor_ms:.1f} ms."
        )
        del inputs
        torch.cuda.empty_cache()
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------ GDN decode


def decode_inputs(batch, gen, dtype=torch.float32):
    """q, k [B, H, K] L2-normalised, v [B, H, V], g < 0, beta in (0, 1)."""
    q = F.normalize(torch.randn(batch, HEADS, DK, device="cuda", generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(batch, HEADS, DK, device="cuda", generator=gen), dim=-1).to(dtype)
    v = torch.randn(batch, HEADS, DV, device="cuda", generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(batch, HEADS, device="cuda", generator=gen) + 2)
    beta = torch.rand(batch, HEADS, device="cuda", generator=gen)
    return q, k, v, g, beta


def rotation(batch, state_bytes):
    """How many disjoint batches of rows one graph replay walks through (>= ROTATE_BYTES touched)."""
    per_batch = batch * HEADS * DK * DV * state_bytes
    return max(1, min(128, math.ceil(ROTATE_BYTES / per_batch)))


def decode_correctness() -> tuple[str, bool]:
    rows, ok = [], True
    gen = torch.Generator(device="cuda").manual_seed(20)
    for batch in (1, 7, 32, 256, 1024):
        for state_dtype in (torch.float32, torch.bfloat16):
            num_slots = batch + 19
            step = decode_inputs(batch, gen)
            cache = torch.randn(num_slots, HEADS, DK, DV, device="cuda", generator=gen).to(state_dtype)
            slots = torch.randperm(num_slots, device="cuda", generator=gen)[:batch].int()
            if batch == 7:
                slots[3] = -1  # a padded entry
            live = slots >= 0
            before = cache.clone()
            o_ref, s_ref = naive_recurrent_gated_delta_rule(
                *(x[live].double().unsqueeze(1) for x in step), initial_state=cache[slots[live].long()].double()
            )
            # Poison: free a NaN block of o's size so that the allocator hands it to the kernel's output.
            del_me = torch.full_like(step[2], float("nan"))
            del del_me
            o = gdn_decode_step(*step, cache, slots)
            untouched = torch.ones(num_slots, dtype=torch.bool, device="cuda")
            untouched[slots[live].long()] = False
            err_o = rel_err(o[live], o_ref[:, 0])
            err_s = rel_err(cache[slots[live].long()], s_ref)
            pad_ok = bool((o[~live] == 0).all())
            same = bool(torch.equal(cache[untouched], before[untouched]))
            tol_s = 1e-5 if state_dtype == torch.float32 else 6e-3
            passed = err_o <= 1e-5 and err_s <= tol_s and same and pad_ok and torch.isfinite(o).all()
            ok &= bool(passed)
            rows.append([batch, str(state_dtype).split(".")[1], err_o, err_s, same, "pass" if passed else "FAIL"])
            del cache, before, o_ref, s_ref
    torch.cuda.empty_cache()
    text = f"### Correctness vs float64 ({HEADS} heads x {DK} x {DV}, random slots; B=7 has a padded slot)\n\n" + table(
        ["B", "state", "o rel err", "state rel err", "other rows untouched", "within 1e-5 (bf16 state 6e-3)"], rows
    )
    return text, ok


def decode_case(batch, state_dtype, seed):
    """R disjoint input sets over one state cache of R*B rows (random slot order)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    reps = rotation(batch, torch.finfo(state_dtype).bits // 8)
    cache = torch.randn(reps * batch, HEADS, DK, DV, device="cuda", generator=gen).to(state_dtype)
    slots = torch.randperm(reps * batch, device="cuda", generator=gen).int().view(reps, batch)
    steps = [decode_inputs(batch, gen) for _ in range(reps)]
    return cache, slots, steps


def time_ours(batch, state_dtype, config: tuple | None = None) -> float:
    """us per step with the shipped launch config, or with config = (block_v, num_warps)."""
    cache, slots, steps = decode_case(batch, state_dtype, seed=batch)
    if config is None:
        fns = [lambda s=s, i=i: gdn_decode_step(*s, cache, i) for s, i in zip(steps, slots)]
    else:
        fns = [lambda s=s, i=i: _gdn_decode_step_triton(*s, cache, i, DK**-0.5, *config) for s, i in zip(steps, slots)]
    return graph_time_us(fns)


def time_copy(batch, state_dtype) -> float:
    """The roofline at this size: copy the same state bytes (B rows, rotated like the kernel's)."""
    cache, _, steps = decode_case(batch, state_dtype, seed=batch)
    dst = torch.empty_like(cache)
    blocks = [slice(r * batch, (r + 1) * batch) for r in range(len(steps))]
    fns = [lambda rows=rows: dst[rows].copy_(cache[rows]) for rows in blocks]
    return graph_time_us(fns)


def fla_decode_worker(batches: list[int]) -> None:
    """Subprocess: check and time fla's fused recurrent step (fp32 state); one JSON line per batch."""
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_step

    def call(step, state):
        q, k, v, g, beta = (x.unsqueeze(1) for x in step)  # [B, T=1, H, ...]
        return fla_step(q=q, k=k, v=v, g=g, beta=beta, initial_state=state, output_final_state=True)

    def check_and_time(batch: int) -> dict:
        gen = torch.Generator(device="cuda").manual_seed(batch)
        step = decode_inputs(batch, gen)
        state = torch.randn(batch, HEADS, DK, DV, device="cuda", generator=gen)
        o, final = call(step, state)
        o_ref, s_ref = naive_recurrent_gated_delta_rule(
            *(x.double().unsqueeze(1) for x in step), initial_state=state.double()
        )
        torch.cuda.synchronize()
        errs = [rel_err(o, o_ref), rel_err(final, s_ref)]
        cache, _, steps = decode_case(batch, torch.float32, seed=batch)
        states = cache.view(len(steps), batch, HEADS, DK, DV)
        us = graph_time_us([lambda s=s, h=h: call(s, h) for s, h in zip(steps, states)])
        eager = eager_time_us(lambda: call(steps[0], states[0])) if batch in (1, 128) else None
        return {"B": batch, "us": us, "eager_us": eager, "errs": errs}

    for batch in batches:
        print("RESULT " + json.dumps(check_and_time(batch)), flush=True)
        torch.cuda.empty_cache()


def run_fla_worker(batches: list[int]) -> tuple[dict, str]:
    """Results by batch, and the tail of stderr when the worker died before the end."""
    cmd = [sys.executable, os.path.abspath(__file__), "--fla-decode-worker", ",".join(map(str, batches))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        proc = subprocess.CompletedProcess(cmd, -1, e.stdout or "", f"timeout: {e}")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[7:])
            results[r["B"]] = r
    failure = "" if proc.returncode == 0 else (proc.stderr or "")[-1500:]
    return results, failure


def decode_timing(ceilings) -> str:
    copy_bw = ceilings["copy_TBps"] * 1e12
    torch.cuda.empty_cache()  # leave the fla subprocess the whole device
    fla, fla_failure = run_fla_worker([b for b in DECODE_BATCHES if b <= 1024])
    parts = []
    for state_dtype in (torch.float32, torch.bfloat16):
        elt = torch.finfo(state_dtype).bits // 8
        rows = []
        for batch in DECODE_BATCHES:
            state_bytes = 2 * batch * HEADS * DK * DV * elt  # read + write
            ours = time_ours(batch, state_dtype)
            copy = time_copy(batch, state_dtype)
            bv, nw = decode_launch_config(batch * HEADS, DV, elt)
            row = [batch, f"{state_bytes / 1e6:.1f}", f"{ours:.2f}", f"{state_bytes / ours / 1e3:.0f}",
                   f"{state_bytes / ours * 1e6 / copy_bw:.0%}", f"{copy:.2f}", f"BV={bv}, warps={nw}"]
            if state_dtype == torch.float32:
                r = fla.get(batch)
                row += [f"{r['us']:.2f}", f"{r['us'] / ours:.2f}x"] if r else ["crashed / not run", "-"]
            rows.append(row)
            print(f"decode {state_dtype} B={batch}: ours {ours:.2f} us, copy {copy:.2f} us", flush=True)
        header = ["B", "state MB moved (r+w)", "ours us", "ours GB/s", "% of copy BW", "copy same bytes us", "config"]
        if state_dtype == torch.float32:
            header += ["fla us", "fla / ours"]
        title = f"### State {str(state_dtype).split('.')[1]} (CUDA graphs, {HEADS} heads x {DK} x {DV})"
        parts.append(title + "\n\n" + table(header, rows))

    # launch-bound regime without graphs
    eager_rows = []
    for batch in (1, 128):
        cache, slots, steps = decode_case(batch, torch.float32, seed=batch)
        ours = eager_time_us(lambda: gdn_decode_step(*steps[0], cache, slots[0]))
        r = fla.get(batch)
        eager_rows.append([batch, f"{ours:.1f}", f"{r['eager_us']:.1f}" if r and r["eager_us"] else "-"])
    parts.append(
        "### Without CUDA graphs (back-to-back calls, fp32 state)\n\n"
        + table(["B", "ours us/call", "fla us/call"], eager_rows)
    )

    fla_checks = [[b, f"{r['errs'][0]:.2e}", f"{r['errs'][1]:.2e}"] for b, r in sorted(fla.items())]
    parts.append(
        "### fla checked against the same float64 reference\n\n"
        + table(["B", "o rel err", "state rel err"], fla_checks)
    )
    if fla_failure:
        last_ok = max(fla) if fla else None
        parts.append(
            f"fla's worker stopped after B={last_ok}; the tail of its stderr:\n\n"
            f"```\n{fla_failure.strip()[-1200:]}\n```"
        )
    return "\n\n".join(parts)


def decode_sweep() -> str:
    """Every (BV, warps) with 8..128 state elements per thread, at several B."""
    rows, full = [], []
    for state_dtype in (torch.float32, torch.bfloat16):
        dtype_name = str(state_dtype).split(".")[1]
        elt = torch.finfo(state_dtype).bits // 8
        for batch in (1, 2, 4, 8, 16, 32, 256, 1024):
            results = {}
            for block_v in (8, 16, 32, 64, 128):
                for num_warps in (1, 2, 4, 8):
                    if 8 <= DK * block_v // (32 * num_warps) <= 128:
                        results[(block_v, num_warps)] = time_ours(batch, state_dtype, (block_v, num_warps))
            best = min(results, key=results.get)
            chosen = decode_launch_config(batch * HEADS, DV, elt)
            rows.append([dtype_name, batch, str(best), f"{results[best]:.2f}", str(chosen), f"{results[chosen]:.2f}"])
            full += [[dtype_name, batch, str(c), f"{t:.2f}"] for c, t in sorted(results.items())]
            print("sweep", rows[-1], flush=True)
    return (
        "### Launch-config sweep (us per step, CUDA graphs; config = (BV, warps))\n\n"
        + table(["state", "B", "best config", "best us", "decode_launch_config", "its us"], rows)
        + "\n\n<details><summary>all configs</summary>\n\n"
        + table(["state", "B", "config", "us"], full)
        + "\n\n</details>"
    )


# -------------------------------------------------------------------------- GDN chunk_bwd_dqkwg

# (name, B, T, H, K = V): one stacked Stage-1 micro-batch of SmolLM2 (30 layers x 8 sequences) and part of the
# 1.5B shape's (28 of its 112 sequences: the torch form's float32 temporaries of all 112 would not fit)
DQKWG_SHAPES = [("smollm2 stacked 8x2048", 240, 2048, 9, 64), ("qwen2.5-1.5b 28x4096", 28, 4096, 12, 128)]
# largest tiles first: Triton 3.6 and 3.7 on Hopper have reports of illegal addresses in multi-dot kernels with
# 32-wide tiles (triton #10486, #11366), and the sweep stops after three crashed configs
DQKWG_CONFIGS = [(bk, bv, w, st) for bk in (64, 32) for bv in (64, 32) for w in (8, 4) for st in (2, 1)]


def dqkwg_inputs(B, T, H, D, seed, device="cuda"):
    """Arguments of chunk_bwd_dqkwg in training's dtypes: bf16 tensors, float32 in-chunk base-2 decays."""
    gen = torch.Generator(device).manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, device=device)  # noqa: E731
    N = -(-T // 64)
    q, k = (F.normalize(r(B, T, H, D), dim=-1).bfloat16() for _ in range(2))
    steps = -torch.rand(B, T, H, generator=gen, device=device) * 0.3
    g = torch.cat([steps[:, s : s + 64].cumsum(1) for s in range(0, T, 64)], 1) / math.log(2)
    h, dh = (0.5 * r(B, N, H, D, D)).bfloat16(), (0.5 * r(B, N, H, D, D)).bfloat16()
    v, do, dv = r(B, T, H, D).bfloat16(), r(B, T, H, D).bfloat16(), r(B, T, H, D).bfloat16()
    return q, k, v, g, h, dh, do, dv, D**-0.5


def dqkwg_worker(spec: str) -> None:
    """Subprocess, one shape: `index:first|config;config;...` (config = BK,BV,warps,stages). With `first`, checks
    the default config against the float64 torch form on the shape's first 8 sequences; then, at the full shape,
    each config against the float32 torch form and its time. Prints BEGIN before and RESULT after each config, so
    the parent can name a config whose kernel kills the CUDA context (an illegal address is not recoverable)."""
    from kernels.gdn_dqkwg import DEFAULT_CONFIG, chunk_bwd_dqkwg_triton
    from kernels.gdn_fla import chunk_bwd_dqkwg_torch

    head, configs = spec.split("|")
    index, first = head.split(":")[0], head.endswith(":first")
    _, B, T, H, D = DQKWG_SHAPES[int(index)]
    if first:
        args = dqkwg_inputs(min(B, 8), T, H, D, seed=1)
        ref = chunk_bwd_dqkwg_torch(*(a.double() if torch.is_tensor(a) else a for a in args))
        for config in (DEFAULT_CONFIG, (32, 32, 8, 2)):  # 32-wide with 4 warps is refused on Hopper
            errs = [rel_err(x, r) for x, r in zip(chunk_bwd_dqkwg_triton(*args, config=config), ref)]
            print("CHECK " + json.dumps({"config": str(config), "errs": errs}), flush=True)
        del args, ref
    args = dqkwg_inputs(B, T, H, D, seed=2)
    ref = chunk_bwd_dqkwg_torch(*args)
    torch_ms = time_ms(lambda: chunk_bwd_dqkwg_torch(*args), 5)
    print("RESULT " + json.dumps({"config": "torch form (float32)", "ms": torch_ms}), flush=True)
    for text in filter(None, configs.split(";")):
        config = tuple(int(x) for x in text.split(","))
        print("BEGIN " + str(config), flush=True)
        try:
            got = chunk_bwd_dqkwg_triton(*args, config=config)  # compiles outside the timing
        except ValueError as exc:  # a config the kernel refuses on this GPU and Triton
            print("RESULT " + json.dumps({"config": str(config), "error": f"refused: {exc}"}), flush=True)
            continue
        errs = [rel_err(x, r) for x, r in zip(got, ref)]
        del got
        ms = time_ms(lambda config=config: chunk_bwd_dqkwg_triton(*args, config=config), 5)
        print("RESULT " + json.dumps({"config": str(config), "ms": ms, "errs": errs}), flush=True)


def run_dqkwg_worker(index: int) -> tuple[list[dict], dict]:
    """Every config of one shape, a worker restarted past a config that crashes it (up to three): (check rows,
    results by config: {"ms", "errs"} or {"error": the last line of the worker's stderr})."""
    todo, checks, results, first, crashes = list(DQKWG_CONFIGS), [], {}, True, 0
    while (first or todo) and crashes < 3:  # three crashed configs: stop there, the rest are not run
        spec = f"{index}:{'first' if first else ''}|" + ";".join(",".join(map(str, c)) for c in todo)
        cmd = [sys.executable, os.path.abspath(__file__), "--dqkwg-worker", spec]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            proc = subprocess.CompletedProcess(cmd, -1, out, f"timeout after {e.timeout} s")
        begun = None
        for line in proc.stdout.splitlines():
            kind, _, payload = line.partition(" ")
            if kind == "CHECK":
                checks.append(json.loads(payload))
            elif kind == "BEGIN":
                begun = payload
            elif kind == "RESULT":
                r = json.loads(payload)
                results[r.pop("config")] = r
                begun = None
        first = False
        if proc.returncode == 0:
            break
        last_line = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
        print(f"dqkwg worker {index} stopped at {begun}: {last_line}", flush=True)
        if begun is None:  # died before any config: nothing to skip
            results["worker"] = {"error": last_line}
            break
        results[begun] = {"error": f"crashed: {last_line}"}
        todo = [c for c in todo if str(c) not in results]
        crashes += 1
    skipped = [str(c) for c in todo if str(c) not in results]
    results.update({c: {"error": "not run: three configs crashed before it"} for c in skipped})
    return checks, results


def dqkwg_section(ceilings: dict) -> tuple[str, bool]:
    """Our Triton chunk_bwd_dqkwg against the torch form training runs today: errors against the float64 torch
    form on the first sequences, then every launch config at the full shape (errors against the float32 torch
    form and time), each shape in a worker process that is restarted past a config that crashes it."""
    from kernels.gdn_dqkwg import DEFAULT_CONFIG

    names, ok, check_rows, config_rows, time_rows = ("dq", "dk", "dw", "dg"), True, [], [], []
    torch.cuda.empty_cache()  # leave the workers the whole device
    for index, (name, *_shape) in enumerate(DQKWG_SHAPES):
        checks, results = run_dqkwg_worker(index)
        print("dqkwg", name, json.dumps(results), flush=True)  # before the tables: a failed config stays visible
        for c in checks:
            ok &= max(c["errs"]) <= 2e-2
            check_rows.append([name, c["config"], *c["errs"]])
        ok &= len(checks) == 2 and "ms" in results.get(str(DEFAULT_CONFIG), {})
        for config, r in results.items():
            if "errs" in r:
                ok &= max(r["errs"]) <= 2e-2
                config_rows.append([name, config, *(f"{e:.1e}" for e in r["errs"]), f"{r['ms']:.3f}"])
            elif "error" in r:
                config_rows.append([name, config, r["error"], "", "", "", ""])
        timed = {c: r["ms"] for c, r in results.items() if "ms" in r and c != "torch form (float32)"}
        best = min(timed, key=timed.get) if timed else "none ran"
        ms = lambda key: f"{timed[key]:.3f}" if key in timed else "—"  # noqa: E731
        torch_ms = results.get("torch form (float32)", {}).get("ms")
        time_rows.append([name, f"{torch_ms:.3f}" if torch_ms else "—", ms(str(DEFAULT_CONFIG)), best, ms(best)])
    text = [
        "## GDN `chunk_bwd_dqkwg`: our Triton kernel (kernels/gdn_dqkwg.py) against the torch form",
        f"Relative error against the float64 torch form on the same bf16 inputs (first {min(8, DQKWG_SHAPES[0][1])} "
        "sequences; tolerance 2e-2, bf16 operands with float32 accumulation); config = (BK, BV, warps, stages):",
        table(["shape", "config", *names], check_rows),
        "Every config at the full shape: relative error against the float32 torch form, and time per call (ms, "
        "median of 5, CUDA events); a crash or a refusal: its error:",
        table(["shape", "config", *names, "ms"], config_rows),
        "Time per call (ms, median of 5, CUDA events):",
        table(["shape", "torch form", f"Triton {DEFAULT_CONFIG}", "best config", "its ms"], time_rows),
    ]
    return "\n\n".join(text), ok


# ------------------------------------------------------------------------------------------ main


def header(argv: list[str]) -> str:
    versions = package_versions(("torch", "triton", "fla-core", "liger-kernel"))
    props = torch.cuda.get_device_properties(0)
    return (
        "# kernels/ benchmark: fused linear + KL, GDN decode step\n\n"
        f"- command: `python {' '.join(argv)}`\n"
        f"- device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / GiB:.0f} GiB;"
        f" host {platform.node()}\n"
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
        f"- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())
    )


def kl_section(ceilings: dict) -> tuple[str, bool]:
    impls = kl_impls()
    text, ok = kl_correctness(impls)
    timing = kl_timing(impls, ceilings) if ok else "Timing skipped: ours failed the correctness check."
    return "\n\n".join(["## Full-vocabulary KL(teacher || student), forward + backward", text, timing]), ok


def decode_section(ceilings: dict) -> tuple[str, bool]:
    text, ok = decode_correctness()
    timing = decode_timing(ceilings) if ok else "Timing skipped: ours failed the correctness check."
    return "\n\n".join(["## GDN decode step", text, timing]), ok


def sweep_section(ceilings: dict) -> tuple[str, bool]:
    return decode_sweep(), True


SECTIONS = {"kl": kl_section, "decode": decode_section, "sweep": sweep_section, "dqkwg": dqkwg_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="markdown file to write (rewritten after every section)")
    parser.add_argument("--sections", default="kl,decode,sweep", help="comma-separated: kl, decode, sweep, dqkwg")
    parser.add_argument("--fla-decode-worker", help=argparse.SUPPRESS)
    parser.add_argument("--dqkwg-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fla_decode_worker:
        fla_decode_worker([int(b) for b in args.fla_decode_worker.split(",")])
        return
    if args.dqkwg_worker:
        dqkwg_worker(args.dqkwg_worker)
        return
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"

    ceilings = measure_ceilings()
    parts = [header(sys.argv), ceilings_section(ceilings)]
    checks_ok = True
    for name in args.sections.split(","):
        try:
            text, ok = SECTIONS[name](ceilings)
        except Exception:  # noqa: BLE001 - report it and keep what the other sections measure
            text, ok = f"Section {name} crashed:\n\n```\n{traceback.format_exc()[-3000:]}```", False
        checks_ok &= ok
        parts.append(text)
        print(text, flush=True)
        if args.out:  # rewritten after every section: a later crash or timeout keeps the earlier ones
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write("\n\n".join(parts) + "\n")
    sys.exit(0 if checks_ok else 1)


if __name__ == "__main__":
    main()
