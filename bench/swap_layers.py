"""Move a trained hybrid's softmax budget from one layer to another without another Stage 2.

    python -m bench.swap_layers --hybrid PATH --restore 7 --linearize 24 \\
        --data ../shared/data/en-mix-train.jsonl.xz --steps 150 --seq-len 1024 --batch 8 --out DIR

--restore puts GDN layers back to the teacher's softmax attention (`distill.model.transfer.restore_softmax`).
--linearize turns softmax layers into GDN. Each new mixer starts from that layer's own attention weights
(the Stage-0 transfer). It then learns, as in Stage 1, to reproduce the attention block's output from the
block's input. Both are captured in the hybrid itself, with the restored layers already in place, not in the
teacher, so the mixer aligns to the residual stream it will run in. Only the new mixers train: AdamW with a
cosine LR, resumable from DIR.work after a kill.

The question it answers (issue 15): does an 8-softmax-layer hybrid with a better layer choice keep what the
9-layer one recalls? `bench/results/quality_h100/plus_layer7/` gave the 65.5M GA-S2 hybrid layer 7 back. This
takes a layer away again with alignment only, cheap enough for a CPU where a Stage 2 run is out of reach. Writes
a hybrid checkpoint to DIR for `hybrid eval`, and DIR/swap_layers.json with the alignment losses (held-out,
before and after) and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from distill.data import BlockOrder, DataSpec, batch_for_step, prepare_data
from distill.distributed import init_runtime
from distill.errors import UserError
from distill.model.checkpoint import save_hybrid
from distill.model.config import FULL_ATTENTION, LINEAR_ATTENTION
from distill.model.gdn_mixer import GatedDeltaNet
from distill.model.transfer import restore_softmax, transfer_attention_to_gdn
from distill.provenance import machine_description
from distill.stages import alignment_loss, capture_attention
from distill.train import TrainConfig, train


def new_mixers(model: nn.Module, layers: list[int], seed: int) -> nn.ModuleList:
    """A GDN mixer per layer in `layers`, each initialised from the model's attention in that layer."""
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    torch.manual_seed(seed)  # the gates and decay the transfer does not set
    mixers = nn.ModuleList()
    for i in layers:
        attn = model.model.layers[i].self_attn
        param = next(attn.parameters())
        mixer = GatedDeltaNet(config, i).to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            transfer_attention_to_gdn(attn, mixer, config.num_key_value_heads, group)
        mixers.append(mixer)
    return mixers


def swap_loss(source: nn.Module, mixers: nn.ModuleList, layers: list[int], ids: torch.Tensor) -> torch.Tensor:
    """Mean over `layers` of each new mixer's alignment loss to the source's attention block there."""
    inputs, outputs = capture_attention(source, ids, layers)
    return torch.stack([alignment_loss(m(x)[0], y) for m, x, y in zip(mixers, inputs, outputs)]).mean()


@torch.no_grad()
def heldout_loss(source: nn.Module, mixers: nn.ModuleList, layers: list[int], batches) -> float:
    losses = [(float(swap_loss(source, mixers, layers, ids)), ids.numel()) for ids in batches]
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


@torch.no_grad()
def install(model: nn.Module, mixers: nn.ModuleList, layers: list[int]) -> None:
    """Replace each layer's attention with its trained GDN mixer (in place)."""
    for i, mixer in zip(layers, mixers):
        layer = model.model.layers[i]
        del layer.self_attn
        layer.linear_attn = mixer
        layer.layer_type = LINEAR_ATTENTION
        model.config.layer_types[i] = LINEAR_ATTENTION


def check_layers(model: nn.Module, restore: list[int], linearize: list[int]) -> None:
    types = model.config.layer_types
    for flag, layers, wanted in (("--restore", restore, LINEAR_ATTENTION), ("--linearize", linearize, FULL_ATTENTION)):
        for i in layers:
            if not 0 <= i < len(types):
                raise UserError(f"{flag} {i}: the hybrid has layers 0..{len(types) - 1}")
            if types[i] != wanted:
                raise UserError(f"{flag} {i}: layer {i} is {types[i]}, expected {wanted}")
    if not linearize:
        raise UserError("--linearize: name at least one softmax layer to turn into GDN")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hybrid", required=True, help="a hybrid checkpoint directory")
    parser.add_argument("--teacher", default="smollm2-135m", help="teacher spec (as `hybrid convert --teacher`)")
    parser.add_argument("--restore", type=int, nargs="*", default=[], help="GDN layers to put back to softmax")
    parser.add_argument("--linearize", type=int, nargs="+", required=True, help="softmax layers to turn into GDN")
    parser.add_argument("--data", nargs="+", required=True, help="training text (as `hybrid align --data`)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak LR (Stage 1's `small` preset: 1e-3)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for the alignment loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from distill.eval_run import load_model
    from distill.model.teacher import load_teacher

    started = time.perf_counter()
    runtime = init_runtime(args.device)
    model, tokenizer = load_model(args.hybrid, runtime)
    check_layers(model, args.restore, args.linearize)
    if args.restore:
        teacher, _ = load_teacher(args.teacher)
        model = restore_softmax(model, teacher.to(runtime.device), args.restore)
        del teacher
    model.requires_grad_(False)
    layers = sorted(args.linearize)
    mixers = new_mixers(model, layers, args.seed)

    cfg = TrainConfig(steps=args.steps, seq_len=args.seq_len, batch=args.batch, micro_batch=args.micro_batch,
                      lr=args.lr, schedule="cosine", warmup_steps=min(10, args.steps // 10), save_every=10,
                      seed=args.seed)
    spec = DataSpec(sources=tuple(args.data), seq_len=args.seq_len, eval_tokens=args.eval_tokens,
                    max_tokens=cfg.tokens + 2 * args.eval_tokens)
    data = prepare_data(spec, tokenizer)
    order = BlockOrder(len(data.train), cfg.seed)
    accum = cfg.grad_accum(runtime.world)
    heldout = [ids.to(runtime.device) for ids in data.eval_batches(args.micro_batch)]
    before = heldout_loss(model, mixers, layers, heldout)

    log = train(
        "swap align", mixers, [{"params": list(mixers.parameters()), "lr": cfg.lr, "name": "mixers"}],
        lambda _, ids: (swap_loss(model, mixers, layers, ids), {}),
        lambda step, micro: batch_for_step(data, order, step, micro, cfg.micro_batch, accum),
        cfg, args.out.with_name(args.out.name + ".work"), runtime,
    )
    after = heldout_loss(model, mixers, layers, heldout)
    install(model, mixers, layers)
    model.config.provenance.setdefault("stages", []).append("swap_layers")
    model.config.provenance["swap_layers"] = {"restored": args.restore, "linearized": layers, "tokens": cfg.tokens}
    save_hybrid(model, tokenizer, args.out, overwrite=True)

    command = "python -m bench.swap_layers " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command, "machine": machine_description(runtime.device.type),
              "date": str(datetime.date.today()), "seconds": time.perf_counter() - started,
              "restored": args.restore, "linearized": layers, "train": asdict(cfg), "tokens": cfg.tokens,
              "heldout_tokens": sum(ids.numel() for ids in heldout), "heldout_align_before": before,
              "heldout_align_after": after, "log": log}
    (args.out / "swap_layers.json").write_text(json.dumps(report, indent=1))
    print(f"{args.out}: softmax layers {model.config.softmax_layers}; held-out alignment {before:.4f} -> {after:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
