"""Training throughput of Stage 1 and Stage 2 (tokens/s and model-FLOPs utilisation), through the real loop.

    python bench/train_throughput.py --teacher smollm2-135m --seq 2048 --micro-batch 8
    python bench/train_throughput.py --config teacher/config.json ...   # same architecture, random weights
    python bench/train_throughput.py --shape qwen2.5-1.5b ...            # a built-in shape, random weights
    ... --gdn-backends torch auto --baseline --profile-dir DIR            # before/after, plain fine-tuning, profiles

Both stages run `distill.stages.run_stage1` / `run_stage2` (the code `hybrid convert` runs: teacher
forward, student forward/backward, fused KL, AdamW, clipping) on random token blocks; the first
--warmup steps are excluded. Throughput does not depend on the weights' values, so a config-only
teacher (random init) measures the same thing as the trained one.

Model FLOPs per token (matmuls only, causal attention counted once, GDN as its recurrent form):
    forward of a dense matmul with P parameters: 2P;   causal softmax attention: 2 * T * heads * head_dim
    GDN recurrence: 6 * heads * d_k * d_v;             backward = 2 x forward
    Stage 1 = teacher body forward + 3 x (all GDN mixers forward)
    Stage 2 = teacher forward (with lm_head) + 3 x (hybrid forward with lm_head)
MFU = FLOPs/token x tokens/s / peak bf16 dense FLOP/s of the device.

Each --gdn-backends entry (kernels.gdn.GDN_BACKENDS; "torch" = the pure-torch chunked GDN, "auto" =
what `hybrid convert` runs) measures both stages with that GDN path set on the student explicitly, once
per --modes entry: 'auto' (what `hybrid convert` runs here), 'plain' (every mixer of Stage 1 in turn,
every op eager, every kernel launched) or switches joined by '+': stack (Stage 1's mixers as one batched
computation), compile (norms, MLPs and the GDN chain compiled), graph (each optimiser step replayed from a
CUDA graph after the warm-up steps).
--baseline adds plain fine-tuning of the teacher architecture (next-token cross-entropy, all
parameters, the same AdamW, clipping and bf16 autocast as our loop) in the same process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from distill.cuda_graph import WARMUP

GRAPH_WARMUP = WARMUP + 1  # the eager steps before a CUDA graph's capture, and the capture

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense, SXM


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def layer_flops(config, softmax: bool, seq: int) -> float:
    """Forward FLOPs per token of one decoder layer (mixer + MLP)."""
    d, hd = config.hidden_size, config.head_dim
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    mlp = 3 * d * config.intermediate_size
    if softmax:
        params = d * heads * hd * 2 + d * kv * hd * 2
        return 2 * (params + mlp) + 2 * seq * heads * hd
    gdn_params = 5 * d * heads * hd + 2 * d * heads
    return 2 * (gdn_params + mlp) + 6 * heads * hd * hd


def gdn_mixer_flops(config) -> float:
    d, hd, heads = config.hidden_size, config.head_dim, config.num_attention_heads
    return 2 * (5 * d * heads * hd + 2 * d * heads) + 6 * heads * hd * hd


def stage_flops(config, seq: int, softmax_layers: list[int], stage: int) -> float:
    L = config.num_hidden_layers
    lm_head = 2 * config.hidden_size * config.vocab_size
    teacher_body = sum(layer_flops(config, True, seq) for _ in range(L))
    if stage == 1:
        return teacher_body + 3 * L * gdn_mixer_flops(config)
    student = sum(layer_flops(config, i in softmax_layers, seq) for i in range(L)) + lm_head
    return teacher_body + lm_head + 3 * student


SHAPES = {
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        head_dim=64, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True, model_type="llama",
        attention_bias=False, rms_norm_eps=1e-5),
    "qwen2.5-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        head_dim=128, vocab_size=151936, rope_theta=1000000.0, tie_word_embeddings=True, model_type="qwen2",
        rms_norm_eps=1e-6),
}


def _published(family: str, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int, vocab: int,
               theta: float, tied: bool) -> dict:
    extra = {"attention_bias": False, "rms_norm_eps": 1e-5} if family == "llama" else {"rms_norm_eps": 1e-6}
    return dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, rope_theta=theta,
                tie_word_embeddings=tied, model_type=family, **extra)


# the teachers of the scale plan (bench/scale_plan.py, docs/scale-out.md): their published configs' shapes
SHAPES.update({
    "llama-3.2-1b": _published("llama", 16, 2048, 8192, 32, 8, 64, 128256, 500000.0, tied=True),
    "llama-3.2-3b": _published("llama", 28, 3072, 8192, 24, 8, 128, 128256, 500000.0, tied=True),
    "qwen2.5-7b": _published("qwen2", 28, 3584, 18944, 28, 4, 128, 152064, 1000000.0, tied=False),
    "llama-3.1-8b": _published("llama", 32, 4096, 14336, 32, 8, 128, 128256, 500000.0, tied=False),
    "llama-3.1-70b": _published("llama", 80, 8192, 28672, 64, 8, 128, 128256, 500000.0, tied=False),
})


def shape_config(name: str):
    from transformers import AutoConfig

    fields = dict(SHAPES[name])
    model_type, theta = fields.pop("model_type"), fields.pop("rope_theta")
    return AutoConfig.for_model(model_type, max_position_embeddings=32768,
                                rope_parameters={"rope_theta": theta, "rope_type": "default"}, **fields)


def baseline_flops(config, seq: int) -> float:
    """Plain fine-tuning: 3 x (forward of every softmax layer + lm_head)."""
    L = config.num_hidden_layers
    return 3 * (L * layer_flops(config, True, seq) + 2 * config.hidden_size * config.vocab_size)


def plain_finetune(teacher, data, micro: int, steps: int, warmup: int, runtime) -> list[dict]:
    """Next-token CE on a trainable copy of the teacher with distill.train.train (same loop as the stages)."""
    import copy

    import torch.nn.functional as F

    from distill.train import TrainConfig, train

    model = copy.deepcopy(teacher).requires_grad_(True)
    rows = iter(range(len(data.train)))

    def get_batch(step: int, m: int) -> torch.Tensor:
        return torch.as_tensor(np.stack([data.train[next(rows) % len(data.train)] for _ in range(micro)]))

    def loss_fn(trained, ids: torch.Tensor):
        h = trained.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        logits = trained.lm_head(h).float()
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()), {}

    cfg = TrainConfig(steps=steps + warmup, seq_len=data.train.shape[1], batch=micro, micro_batch=micro, lr=1e-5,
                      schedule="constant", save_every=0)
    groups = [{"params": list(model.parameters()), "lr": cfg.lr, "name": "all"}]
    with tempfile.TemporaryDirectory() as tmp:
        log = train("plain fine-tune", model, groups, loss_fn, get_batch, cfg, Path(tmp), runtime, show_progress=False,
                    units=list(model.model.layers))
    del model
    return log


MODE_SWITCHES = ("stack", "compile", "graph")


def parse_mode(text: str):
    """'auto' (the defaults `hybrid convert` runs), 'plain' or e.g. 'stack+compile+graph' -> the ParallelConfig
    that runs it."""
    from distill.distributed import ParallelConfig

    if text == "auto":
        return ParallelConfig()
    switches = [] if text == "plain" else text.split("+")
    unknown = set(switches) - set(MODE_SWITCHES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown switch {sorted(unknown)} in mode {text!r}; "
                                         f"use 'auto', 'plain' or '+'-joined {sorted(MODE_SWITCHES)}")

    def on(switch: str) -> str:
        return "on" if switch in switches else "off"

    return ParallelConfig(stack_mixers=on("stack"), compile=on("compile"), cuda_graph=on("graph"))


def mode_name(rt) -> str:
    """The switches that are on for runtime `rt` ('auto' named by what it turns on on this machine)."""
    from distill.stages import stacks_mixers

    on = {"stack": stacks_mixers(rt), "compile": rt.uses("compile"), "graph": rt.uses("cuda_graph")}
    return "+".join(name for name in MODE_SWITCHES if on[name]) or "plain"


def profile_one_step(run, skip: int, out: Path, title: str) -> None:
    """torch.profiler over step `skip + 2` of `run(after_step)`, a fresh run of `skip + 2` steps: the first
    `skip` (eager steps, compile, graph capture) and one more are not recorded, so the table shows a steady
    step (replayed from the CUDA graph where the mode has one), not one-time work. Writes the top ops table."""
    from torch.profiler import ProfilerActivity, profile, schedule

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                 schedule=schedule(wait=skip, warmup=1, active=1)) as prof:
        run(lambda _: prof.step())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=90)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(f"## {title}\n\n```\n{table}\n```\n\n{copies_by_shape(prof.key_averages(group_by_input_shape=True))}")


COPY_OPS = ("aten::_to_copy", "aten::copy_", "aten::cat")


def copies_by_shape(averages, rows: int = 25) -> str:
    """The step's copies and casts grouped by input shape, largest self time first: whether the cast kernels
    move weights or activations. A step replayed from a CUDA graph has no aten ops to show (profile a mode
    without `graph` for this table)."""
    def self_us(e) -> float:
        return getattr(e, "self_device_time_total", 0.0) or e.self_cpu_time_total

    copies = sorted((e for e in averages if e.key in COPY_OPS), key=self_us, reverse=True)
    if not copies:
        return "No aten copy ops recorded (a replayed CUDA graph shows only its kernels).\n\n"
    lines = ["| op | input shapes | calls | self time (µs; device time where there is a device) |", "|---|---|---:|---:|"]
    lines += [f"| {e.key} | {str(e.input_shapes)[:120]} | {e.count} | {self_us(e):.0f} |" for e in copies[:rows]]
    return "Copies and casts by input shape:\n\n" + "\n".join(lines) + "\n\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="teacher spec (hub id, dir, .gguf, smollm2-135m)")
    src.add_argument("--config", type=Path, help="a teacher config.json: same architecture, random weights")
    src.add_argument("--shape", choices=sorted(SHAPES), help="a built-in teacher shape, random weights")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--stage2-micro-batch", type=int, help="default: --micro-batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.25, help="softmax layers in Stage 2 (uniform placement)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--gdn-backends", nargs="+", default=["auto"], help="GDN paths to measure (kernels.gdn.GDN_BACKENDS)")
    p.add_argument("--modes", nargs="+", type=parse_mode, default=[parse_mode("auto")], metavar="MODE",
                   help="how the step runs, one measurement each: 'plain' or '+'-joined switches of "
                   f"{sorted(MODE_SWITCHES)} (e.g. plain stack stack+compile+graph), or 'auto' (the default): what "
                   "`hybrid convert` runs on this machine, stack+compile+graph on one GPU. Stage 2 and the baseline "
                   "run once per compile/graph combination")
    p.add_argument("--baseline", action="store_true", help="also time plain fine-tuning of the teacher")
    p.add_argument("--profile-dir", type=Path, help="profile one step per stage of the last backend into this dir")
    p.add_argument("--label", default="", help="a free-text label stored with each row")
    p.add_argument("--out", type=Path, help="append a JSON line per measurement")
    args = p.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.model.config import LINEAR_ATTENTION
    from distill.data import PackedData
    from distill.distributed import init_runtime
    from distill.model.gdn_mixer import set_gdn_backend
    from distill.placement import k_from_ratio, uniform_softmax_layers
    from distill.model.transfer import restore_softmax
    from distill.stages import Stage2Config, run_stage1, run_stage2, stacks_mixers
    from distill.model.teacher import load_teacher
    from distill.train import TrainConfig
    from distill.model.transfer import hybrid_from_teacher
    from kernels.gdn import describe_gdn_backend, resolve_gdn_backend

    runtime = init_runtime()
    cuda = runtime.device.type == "cuda"
    torch.manual_seed(0)
    if args.teacher:
        teacher, _ = load_teacher(args.teacher)
        name = args.teacher
    else:
        config = shape_config(args.shape) if args.shape else AutoConfig.from_pretrained(args.config.parent)
        with torch.device(runtime.device):
            teacher = AutoModelForCausalLM.from_config(config).float().eval()
        name = f"{args.shape or args.config} (random weights)"
    teacher = teacher.to(runtime.device).requires_grad_(False)
    config = teacher.config
    L, V = config.num_hidden_layers, config.vocab_size
    rng = np.random.default_rng(0)
    micro2 = args.stage2_micro_batch or args.micro_batch
    blocks = (args.steps + max(args.warmup, GRAPH_WARMUP) + 1) * max(args.micro_batch, micro2)
    data = PackedData(train=rng.integers(0, V, size=(blocks, args.seq), dtype=np.int64),
                      eval=rng.integers(0, V, size=(1, args.seq), dtype=np.int64), meta={}, path=Path("."))
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_flops(device_name)
    softmax = uniform_softmax_layers(L, k_from_ratio(args.ratio, L))

    timed_peak: list[int] = []  # bytes, the last stage's timed steps only (filled by after_warmup's reset)
    untimed_peak: list[int] = []  # bytes, the last stage's untimed steps (the reset would lose them)

    def reset_memory() -> None:
        timed_peak.clear()
        untimed_peak.clear()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def row(what: str, log: list[dict], micro: int, flops: float, seconds: float, backend: str | None,
            rt) -> dict:
        compiled, graphed = rt.uses("compile"), rt.uses("cuda_graph")
        stacked = stacks_mixers(rt) if what == "stage1" else None
        timed = log[warmup_of(rt) :]
        per_step = micro * args.seq * runtime.world
        tok_s = len(timed) * per_step / sum(per_step / r["tok_per_s"] for r in timed)
        out = {
            "what": what, "teacher": name, "device": device_name, "seq": args.seq, "micro_batch": micro,
            "gdn_backend": backend, "gdn_path": describe_gdn_backend(resolve_gdn_backend(backend, runtime.device, torch.bfloat16)) if backend else None,
            "softmax_layers": softmax if what == "stage2" else None, "timed_steps": len(timed), "tok_per_s": round(tok_s),
            "model_gflop_per_token": round(flops / 1e9, 3), "mfu": round(flops * tok_s / peak, 4) if peak else None,
            "peak_mem_gib": round(max(untimed_peak + [torch.cuda.max_memory_allocated()]) / 2**30, 2) if cuda else None,
            # the timed steps' own peak: after an out-of-memory retry the whole-stage peak is the failed attempt's
            "peak_mem_timed_gib": round(timed_peak[0] / 2**30, 2) if cuda and timed_peak else None,
            "pieces": log[-1].get("pieces", 1),
            "mode": mode_name(rt), "stack_mixers": stacked, "compile": compiled, "cuda_graph": graphed,
            "replayed_steps": sum(bool(r.get("replayed")) for r in timed),
            "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"],
            "losses": [round(r["loss"], 5) for r in log],
            "torch": torch.__version__, "wall_s": round(seconds, 1), "label": args.label,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        }
        print(json.dumps(out), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(out) + "\n")
        return out

    def stage_configs(steps: int) -> tuple[TrainConfig, Stage2Config]:
        s1 = TrainConfig(steps=steps, seq_len=args.seq, batch=args.micro_batch, micro_batch=args.micro_batch, lr=1e-3,
                         save_every=0)
        s2 = Stage2Config(TrainConfig(steps=steps, seq_len=args.seq, batch=micro2, micro_batch=micro2, lr=1e-4,
                                      schedule="constant", save_every=0))
        return s1, s2

    def after_warmup(rt):
        """after_step hook: start counting peak memory again once the untimed steps are done.

        A replayed step allocates nothing: its activations live in the CUDA graph's private pool, which the
        allocator counts as reserved, never as allocated. So with a graph the timed peak is the memory reserved
        (the cache emptied first, so only live tensors and the graph's pool remain)."""
        graphed = rt.uses("cuda_graph")

        def hook(done: int) -> None:
            if not cuda:
                return
            if done == warmup_of(rt):
                torch.cuda.synchronize()
                untimed_peak[:] = [torch.cuda.max_memory_allocated()]
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            elif done > warmup_of(rt):
                timed_peak[:] = [torch.cuda.max_memory_reserved() if graphed else torch.cuda.max_memory_allocated()]
        return hook

    def warmup_of(rt) -> int:
        """Untimed steps: --warmup, and with a CUDA graph also the eager steps before capture and the capture."""
        return max(args.warmup, GRAPH_WARMUP) if rt.uses("cuda_graph") else args.warmup

    def measure_stages(backend: str, rt, stages: list[int], profile: Path | None) -> None:
        tag = f"GDN {backend}, mode {mode_name(rt)}"
        student = hybrid_from_teacher(teacher, [LINEAR_ATTENTION] * L).to(runtime.device)
        set_gdn_backend(student, backend)
        s1, s2 = stage_configs(args.steps + warmup_of(rt))
        with tempfile.TemporaryDirectory() as tmp:
            if 1 in stages:
                reset_memory()
                t0 = time.perf_counter()
                log = run_stage1(teacher, student, data, s1, Path(tmp) / "s1", rt, after_step=after_warmup(rt))
                row("stage1", log, args.micro_batch, stage_flops(config, args.seq, [], 1), time.perf_counter() - t0,
                    backend, rt)
                if profile:
                    one, _ = stage_configs(warmup_of(rt) + 2)
                    profile_one_step(lambda hook: run_stage1(teacher, student, data, one, Path(tmp) / "p1", rt,
                                                             after_step=hook),
                                     warmup_of(rt), profile / "profile.md",
                                     f"Stage 1 step, {name}, {tag}, {args.micro_batch} x {args.seq}")
            if 2 in stages:
                hybrid = restore_softmax(student, teacher, softmax)
                del student
                reset_memory()
                t0 = time.perf_counter()
                log = run_stage2(teacher, hybrid, data, s2, Path(tmp) / "s2", rt, after_step=after_warmup(rt))
                row("stage2", log, micro2, stage_flops(config, args.seq, softmax, 2), time.perf_counter() - t0,
                    backend, rt)
                if profile:
                    _, one = stage_configs(warmup_of(rt) + 2)
                    profile_one_step(lambda hook: run_stage2(teacher, hybrid, data, one, Path(tmp) / "p2", rt,
                                                             after_step=hook),
                                     warmup_of(rt), profile / "profile.md",
                                     f"Stage 2 step, {name}, {tag}, {micro2} x {args.seq}")
                del hybrid
            else:
                del student

    seen = set()  # (compile, graph) combinations whose baseline and Stage 2 are measured: stacking is Stage 1's
    for parallel in args.modes:
        rt = replace(runtime, parallel=parallel)
        first_of_kind = (parallel.compile, parallel.cuda_graph) not in seen
        seen.add((parallel.compile, parallel.cuda_graph))
        if args.baseline and first_of_kind:
            reset_memory()
            t0 = time.perf_counter()
            log = plain_finetune(teacher, data, args.micro_batch, args.steps, warmup_of(rt), rt)
            row("plain_finetune", log, args.micro_batch, baseline_flops(config, args.seq), time.perf_counter() - t0,
                None, rt)
        stages = [s for s in args.stages if s == 1 or first_of_kind]
        for i, backend in enumerate(args.gdn_backends):
            last = i == len(args.gdn_backends) - 1 and parallel is args.modes[-1]
            measure_stages(backend, rt, stages, args.profile_dir if (args.profile_dir and last) else None)


if __name__ == "__main__":
    main()
