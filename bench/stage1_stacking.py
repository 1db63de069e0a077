"""One Stage-1 step with its mixers one after another and stacked: operations launched and wall time.

    python -m bench.stage1_stacking --shape smollm2-135m --batch 8 --seq 512 --device cpu
    python -m bench.stage1_stacking --shape smollm2-135m --batch 8 --seq 2048 --device cuda

The step is Stage 1's own loss (`distill.stages.stage1_loss`) forward and backward, on the built-in shape
with random weights. "aten ops" counts the operator calls torch.profiler records in one step (views included, and
without views): on a GPU each non-view call is host time, the cost a launch-bound step pays (on a CPU the
torch GDN path loops over 64-token chunks, so count there at a short --seq). Time: mean of
--repeats steps after one warm-up, the two ways alternating so drift hits both.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

VIEWS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::as_strided", "aten::slice",
    "aten::select", "aten::t", "aten::transpose", "aten::unsqueeze", "aten::squeeze", "aten::expand",
    "aten::split", "aten::split_with_sizes", "aten::unflatten", "aten::flatten", "aten::permute", "aten::detach",
    "aten::alias", "aten::unbind", "aten::narrow", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
    "aten::empty", "aten::empty_strided", "aten::empty_like",
}


def count_ops(step) -> tuple[int, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    return sum(counts.values()), sum(n for key, n in counts.items() if key not in VIEWS)


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    from bench.train_throughput import SHAPES, shape_config
    from distill.model.config import LINEAR_ATTENTION
    from distill.model.transfer import hybrid_from_teacher
    from distill.stages import freeze_all_but_mixers, stage1_loss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--no-count-ops", action="store_true",
                   help="time only (the profiler's records of a large stacked step can outgrow host memory)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = shape_config(args.shape)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(config).float().eval().requires_grad_(False)
    student = hybrid_from_teacher(teacher, [LINEAR_ATTENTION] * config.num_hidden_layers).to(device)
    freeze_all_but_mixers(student)
    mixers = [layer.linear_attn for layer in student.model.layers]
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def stage1_step(stacked: bool):
        def run() -> None:
            with autocast:
                loss = stage1_loss(teacher, mixers, ids, stacked)
            loss.backward()
        return run

    def timed(step) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        student.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    ways = {"one after another": stage1_step(stacked=False), "stacked": stage1_step(stacked=True)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for name, step in ways.items():
        timed(step)  # warm-up: autotuning, allocator
    for _ in range(args.repeats):
        for name, step in ways.items():
            seconds[name].append(timed(step))
    result = {"shape": args.shape, "batch": args.batch, "seq": args.seq, "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "ways": {}}
    for name, step in ways.items():
        result["ways"][name] = {"seconds_per_step": sum(seconds[name]) / len(seconds[name]), "seconds": seconds[name]}
        if not args.no_count_ops:
            ops, non_view = count_ops(step)
            student.zero_grad(set_to_none=True)
            result["ways"][name].update(aten_ops=ops, aten_ops_not_views=non_view)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
