"""How well one GDN layer imitates its teacher attention layer, position by position, before and after a
Stage 1 on that layer alone (bench/sanity_single_gdn.py's recipe). A position-dependent error at lengths
beyond the training length points at a length-generalisation problem (or a bug in the recurrence);
a flat one at a layer that is simply hard to linearise.

    python -m bench.gdn_layer_profile --layer 0 --length 1024 --stage1-steps 16

Prints, per bucket of positions, ||GDN(x) - attn(x)|| / ||attn(x)|| on one held-out block of --length
tokens of --data, teacher-forced (x is the teacher's own input to that block).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.sanity_single_gdn import align_one_layer
from distill.data import DataSpec, prepare_data
from distill.distributed import init_runtime
from distill.model.config import FULL_ATTENTION, LINEAR_ATTENTION
from distill.model.teacher import load_teacher
from distill.model.transfer import hybrid_from_teacher
from distill.stages import capture_attention
from distill.train import TrainConfig


@torch.no_grad()
def relative_error_by_position(teacher, mixer, layer: int, ids: torch.Tensor, bucket: int) -> list[float]:
    x, y = (taps[layer] for taps in capture_attention(teacher, ids))
    err = (mixer(x)[0] - y).float().norm(dim=-1) / y.float().norm(dim=-1).clamp_min(1e-6)  # [b, T]
    return [round(err[:, s : s + bucket].mean().item(), 4) for s in range(0, ids.shape[1], bucket)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--data", nargs="+", default=["demo"])
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--length", type=int, default=1024, help="tokens of the held-out block profiled")
    parser.add_argument("--bucket", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256, help="Stage 1 training length")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--stage1-steps", type=int, default=16)
    parser.add_argument("--stage1-lr", type=float, default=5e-3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = init_runtime(args.device)
    teacher, tokenizer = load_teacher(args.teacher)
    teacher = teacher.to(runtime.device).requires_grad_(False)
    train_data = prepare_data(DataSpec(tuple(args.data), args.seq_len, 2 * args.seq_len), tokenizer)
    probe = prepare_data(DataSpec(tuple(args.data), args.length, args.length), tokenizer)
    ids = torch.from_numpy(probe.eval[:1].astype("int64")).to(runtime.device)
    num_layers = teacher.config.num_hidden_layers
    types = [LINEAR_ATTENTION if i == args.layer else FULL_ATTENTION for i in range(num_layers)]
    hybrid = hybrid_from_teacher(teacher, types).to(runtime.device)
    mixer = hybrid.model.layers[args.layer].linear_attn
    print(f"layer {args.layer}, {args.length} tokens, relative error per {args.bucket}-token bucket")
    print("stage 0:", relative_error_by_position(teacher, mixer, args.layer, ids, args.bucket), flush=True)
    cfg = TrainConfig(steps=args.stage1_steps, seq_len=args.seq_len, batch=args.batch, micro_batch=args.batch,
                      lr=args.stage1_lr, schedule="cosine", save_every=0)
    with tempfile.TemporaryDirectory() as work:
        align_one_layer(teacher, hybrid, args.layer, train_data, cfg, Path(work), runtime)
    print(f"stage 1 ({args.stage1_steps} steps x {args.batch} x {args.seq_len} tokens):",
          relative_error_by_position(teacher, mixer, args.layer, ids, args.bucket), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
