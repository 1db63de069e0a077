"""Training throughput of Stage 1 and Stage 2 (tokens/s and model-FLOPs utilisation), through the real loop.

    python bench/train_throughput.py --teacher smollm2-135m --seq 2048 --micro-batch 8
    python bench/train_throughput.py --config teacher/config.json ...   # same architecture, random weights

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


def _patch_gdn_for_training() -> str:
    """Two workarounds, until kernels.gdn.chunk_gated_delta_rule handles them itself:
    * under bf16 autocast the mixer's l2norm returns fp32 q/k beside a bf16 v, which fla's chunk kernel
      rejects ("Both operands must be same dtype"): cast q, k, beta to v's dtype;
    * fla 0.6.0 refuses its chunk backward on Hopper with Triton < 3.7.1 (fla issue #640, wrong
      gradients): when autograd needs the GDN's gradients on such a GPU, use the torch chunked form."""
    import distill.gdn_mixer as mixer
    from kernels.gdn import torch_chunk_gated_delta_rule

    inner = mixer.chunk_gated_delta_rule
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    triton_ok = False
    try:
        import triton

        triton_ok = tuple(int(x) for x in triton.__version__.split(".")[:3]) >= (3, 7, 1)
    except Exception:
        pass
    use_torch_for_grad = hopper and not triton_ok

    def chunk(q, k, v, g, beta, *args, **kw):
        q, k, beta = q.to(v.dtype), k.to(v.dtype), beta.to(v.dtype)
        if use_torch_for_grad and torch.is_grad_enabled():
            return torch_chunk_gated_delta_rule(q, k, v, g, beta, *args, **kw)
        return inner(q, k, v, g, beta, *args, **kw)

    mixer.chunk_gated_delta_rule = chunk
    return "torch chunked (fla backward refused on Hopper + Triton < 3.7.1)" if use_torch_for_grad else "fla chunk"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", help="teacher spec (hub id, dir, .gguf, smollm2-135m)")
    src.add_argument("--config", type=Path, help="a teacher config.json: same architecture, random weights")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--stage2-micro-batch", type=int, help="default: --micro-batch")
    p.add_argument("--steps", type=int, default=10, help="timed steps per stage")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.25, help="softmax layers in Stage 2 (uniform placement)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, help="append a JSON line with the results")
    args = p.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.config import LINEAR_ATTENTION
    from distill.data import PackedData
    from distill.distributed import init_runtime
    from distill.placement import k_from_ratio, uniform_softmax_layers
    from distill.stages import Stage2Config, restore_softmax, run_stage1, run_stage2
    from distill.teacher import load_teacher
    from distill.train import TrainConfig
    from distill.transfer import hybrid_from_teacher
    from kernels.gdn import fla_available

    runtime = init_runtime()
    gdn_training_path = _patch_gdn_for_training() if torch.cuda.is_available() else "torch chunked"
    if args.teacher:
        teacher, _ = load_teacher(args.teacher)
        name = args.teacher
    else:
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.config.parent)).float().eval()
        name = f"{args.config} (random weights)"
    teacher = teacher.to(runtime.device).requires_grad_(False)
    config = teacher.config
    L, V = config.num_hidden_layers, config.vocab_size
    rng = np.random.default_rng(0)
    micro2 = args.stage2_micro_batch or args.micro_batch
    blocks = (args.steps + args.warmup) * max(args.micro_batch, micro2)
    data = PackedData(train=rng.integers(0, V, size=(blocks, args.seq), dtype=np.int64),
                      eval=rng.integers(0, V, size=(1, args.seq), dtype=np.int64), meta={}, path=Path("."))
    device_name = torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu"
    peak = peak_flops(device_name)
    results = []

    def measure(stage: int, log: list[dict], micro: int, softmax: list[int], seconds: float) -> dict:
        timed = log[args.warmup :]
        per_step = micro * args.seq * runtime.world
        tok_s = len(timed) * per_step / sum(per_step / r["tok_per_s"] for r in timed)
        flops = stage_flops(config, args.seq, softmax, stage)
        row = {
            "stage": stage, "teacher": name, "device": device_name, "seq": args.seq, "micro_batch": micro,
            "softmax_layers": softmax, "timed_steps": len(timed), "tok_per_s": round(tok_s),
            "model_gflop_per_token": round(flops / 1e9, 3),
            "mfu": round(flops * tok_s / peak, 4) if peak else None,
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if runtime.device.type == "cuda" else None,
            "fla": fla_available(), "gdn_training_path": gdn_training_path, "torch": torch.__version__, "wall_s": round(seconds, 1),
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        }
        print(json.dumps(row), flush=True)
        return row

    student = hybrid_from_teacher(teacher, [LINEAR_ATTENTION] * L).to(runtime.device)
    with tempfile.TemporaryDirectory() as tmp:
        if 1 in args.stages:
            cfg = TrainConfig(steps=args.steps + args.warmup, seq_len=args.seq, batch=args.micro_batch,
                              micro_batch=args.micro_batch, lr=1e-3, save_every=0)
            if runtime.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            log = run_stage1(teacher, student, data, cfg, Path(tmp) / "s1", runtime)
            results.append(measure(1, log, args.micro_batch, [], time.perf_counter() - t0))
        if 2 in args.stages:
            softmax = uniform_softmax_layers(L, k_from_ratio(args.ratio, L))
            hybrid = restore_softmax(student, teacher, softmax)
            del student
            cfg = Stage2Config(TrainConfig(steps=args.steps + args.warmup, seq_len=args.seq, batch=micro2,
                                           micro_batch=micro2, lr=1e-4, schedule="constant", save_every=0))
            if runtime.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            log = run_stage2(teacher, hybrid, data, replace(cfg), Path(tmp) / "s2", runtime)
            results.append(measure(2, log, micro2, softmax, time.perf_counter() - t0))
    if args.out:
        with open(args.out, "a") as f:
            for row in results:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
