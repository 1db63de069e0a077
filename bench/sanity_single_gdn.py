"""Sanity check: SmolLM2 with ONE layer turned into Gated DeltaNet (29 softmax layers kept) must keep its
passkey retrieval. If it does not, suspect a bug (the GDN layer, the transfer, the stages) before the budget.

    python -m bench.sanity_single_gdn --layers 0 9 19 29 --lengths 512 1024 --samples 10 \\
        --out bench/results/sanity_single_gdn

For each layer: Stage 0 (weight transfer) -> a short Stage 1 on that layer alone (its GDN mixer learns the
teacher's attention output from the teacher's own input to it) -> a short Stage 2 (all parameters, KL to
the teacher). Passkey retrieval (`distill.recall_tasks`, greedy exact match and the needle's
log-probability gain) and held-out KL are measured for the teacher, after Stage 0 and after Stage 2.
Writes OUT.json and OUT.md (table, command, machine, date, wall times).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distill.data import BlockOrder, DataSpec, PackedData, batch_for_step, prepare_data
from distill.distributed import Runtime, init_runtime
from distill.eval_recall import score_recall
from distill.eval_results import HeldoutScore, RecallScore
from distill.evaluate import EvalSet, heldout_scores
from distill.model.config import FULL_ATTENTION, LINEAR_ATTENTION
from distill.model.modeling import HybridForCausalLM
from distill.model.teacher import load_teacher
from distill.model.transfer import hybrid_from_teacher
from distill.recall_tasks import RecallTaskSpec, build_recall_task
from distill.stages import Stage2Config, alignment_loss, capture_attention, run_stage2
from distill.train import TrainConfig, train


@dataclass
class Checkpoint:
    """One model's scores."""

    label: str
    heldout: HeldoutScore
    passkey: list[RecallScore]
    seconds: float


@dataclass
class LayerRun:
    layer: int
    stage1_loss: list[float] = field(default_factory=list)  # first and last training loss
    stage2_loss: list[float] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    train_seconds: float = 0.0


def align_one_layer(teacher, student: HybridForCausalLM, layer: int, data: PackedData, cfg: TrainConfig,
                    work_dir: Path, runtime: Runtime) -> list[dict]:
    """Stage 1 for a single GDN layer: only its mixer trains, on the teacher's input to that block."""
    mixer = student.model.layers[layer].linear_attn
    student.requires_grad_(False)
    for name, p in mixer.named_parameters():
        p.requires_grad_(name != "conv1d.weight" or student.config.linear_conv_trainable)
    order = BlockOrder(len(data.train), cfg.seed)
    accum = cfg.grad_accum(runtime.world)

    def get_batch(step: int, micro: int) -> torch.Tensor:
        return batch_for_step(data, order, step, micro, cfg.micro_batch, accum)

    def loss_fn(model: HybridForCausalLM, ids: torch.Tensor):
        x, y = (taps[layer] for taps in capture_attention(teacher, ids.to(runtime.device)))
        return alignment_loss(model.model.layers[layer].linear_attn(x)[0], y), {}

    params = [p for p in mixer.parameters() if p.requires_grad]
    log = train(f"stage1 layer {layer}", student, [{"params": params, "lr": cfg.lr, "name": "mixer"}], loss_fn,
                get_batch, cfg, work_dir, runtime, units=[mixer])
    student.requires_grad_(True)
    return log


def measure(label: str, model, eval_set: EvalSet, tasks, runtime: Runtime, seq_len: int, batch: int) -> Checkpoint:
    started = time.perf_counter()
    heldout = heldout_scores(model, eval_set, runtime, seq_len, desc=f"{label}: held-out")
    passkey = [score_recall(model, spec, samples, runtime, batch_size=batch, desc=f"{label}: {spec.name}")
               for spec, samples in tasks]
    result = Checkpoint(label, heldout, passkey, time.perf_counter() - started)
    cells = ", ".join(f"{r.task}@{r.context} {r.exact:.2f} ({r.delta:+.1f})" for r in passkey)
    print(f"{label}: KL {heldout.kl:.4f}, {cells}", flush=True)
    return result


def markdown(result: dict) -> str:
    lengths = result["settings"]["lengths"]
    head = "| model | held-out KL | " + " | ".join(f"passkey@{n}" for n in lengths) + " |"
    rows = [head, "|" + "---|" * (2 + len(lengths))]

    def row(name: str, ckpt: dict) -> str:
        cells = [f"{p['exact']:.2f} ({p['logprob'] - p['logprob_without']:+.1f})" for p in ckpt["passkey"]]
        return f"| {name} | {ckpt['heldout']['kl']:.4f} | " + " | ".join(cells) + " |"

    rows.append(row("teacher (all softmax)", result["teacher"]))
    for run in result["layers"]:
        for ckpt in run["checkpoints"]:
            rows.append(row(ckpt["label"], ckpt))
    s = result["settings"]
    return "\n".join([
        "# Sanity check: 29 softmax layers + one Gated DeltaNet layer (SmolLM2-135M)",
        "",
        f"Date {result['date']}, machine: {result['machine']}, device {result['device']}, float32. "
        f"Wall time {result['seconds'] / 60:.1f} min.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Budgets per layer: Stage 1 on that layer alone {s['stage1_steps']} steps x {s['batch']} x {s['seq_len']} "
        f"tokens (LR {s['stage1_lr']}, cosine); Stage 2 (all parameters, KL) {s['stage2_steps']} steps x "
        f"{s['batch']} x {s['seq_len']} tokens (LR 1e-4 mixers and attention, 7e-6 the rest). Data: "
        f"{', '.join(s['data'])} (held-out split never trained on: {result['heldout_tokens']} tokens).",
        "",
        f"Passkey cells: greedy exact match over **{s['samples']} samples per length** "
        "(continuous score in brackets: log-probability of the 5-digit key with the needle minus without it, nats).",
        "",
        *rows,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--data", nargs="+", default=["demo"])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 9, 19, 29], help="the layer made GDN, one run each")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--samples", type=int, default=10, help="passkey samples per length")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=512)
    parser.add_argument("--stage1-steps", type=int, default=16)
    parser.add_argument("--stage1-lr", type=float, default=5e-3)
    parser.add_argument("--stage2-steps", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=1, help="passkey prompts per forward")
    parser.add_argument("--machine", default=platform.node(), help="machine description for the report")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="CPU threads (1 is fastest on shared cores: no OpenMP spinning)")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = init_runtime(args.device)
    teacher, tokenizer = load_teacher(args.teacher)
    teacher = teacher.to(runtime.device).eval().requires_grad_(False)
    num_layers = teacher.config.num_hidden_layers
    if any(not 0 <= layer < num_layers for layer in args.layers):
        parser.error(f"--layers must lie in 0..{num_layers - 1}")
    data = prepare_data(DataSpec(tuple(args.data), args.seq_len, args.eval_tokens), tokenizer)
    eval_set = EvalSet.build(teacher, data, args.batch, runtime)
    tasks = []
    for length in args.lengths:
        spec = RecallTaskSpec("passkey", length, args.samples, seed=0)
        tasks.append((spec, build_recall_task(spec, tokenizer)))

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": args.machine,
        "device": torch.cuda.get_device_name() if runtime.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
        "command": " ".join(["python -m bench.sanity_single_gdn", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "heldout_tokens": eval_set.num_tokens,
        "teacher": asdict(measure("teacher", teacher, eval_set, tasks, runtime, args.seq_len, args.eval_batch)),
        "layers": [],
    }

    def save() -> None:
        result["seconds"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(markdown(result))

    stage1 = TrainConfig(steps=args.stage1_steps, seq_len=args.seq_len, batch=args.batch, micro_batch=args.batch,
                         lr=args.stage1_lr, schedule="cosine", save_every=0)
    stage2 = Stage2Config(TrainConfig(steps=args.stage2_steps, seq_len=args.seq_len, batch=args.batch,
                                      micro_batch=args.batch, lr=1e-4, schedule="constant", save_every=0))
    for layer in args.layers:
        run = LayerRun(layer)
        layer_types = [LINEAR_ATTENTION if i == layer else FULL_ATTENTION for i in range(num_layers)]
        hybrid = hybrid_from_teacher(teacher, layer_types, {"teacher": args.teacher}).to(runtime.device)
        run.checkpoints.append(measure(f"GDN layer {layer}, stage 0", hybrid, eval_set, tasks, runtime, args.seq_len,
                                       args.eval_batch))
        with tempfile.TemporaryDirectory() as work:
            t0 = time.perf_counter()
            log1 = align_one_layer(teacher, hybrid, layer, data, stage1, Path(work) / "s1", runtime)
            log2 = run_stage2(teacher, hybrid, data, stage2, Path(work) / "s2", runtime)
            run.train_seconds = time.perf_counter() - t0
        run.stage1_loss = [log1[0]["loss"], log1[-1]["loss"]]
        run.stage2_loss = [log2[0]["loss"], log2[-1]["loss"]]
        hybrid.eval()
        run.checkpoints.append(measure(f"GDN layer {layer}, stage 1+2", hybrid, eval_set, tasks, runtime, args.seq_len,
                                       args.eval_batch))
        result["layers"].append(asdict(run))
        save()
        del hybrid
    save()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
