"""Subcommands of `hybrid` for the conversion pipeline (registered by distill.cli).

    hybrid convert  --teacher T [--data D ...] (--ratio R | --k K) --out DIR     everything, resumable
    hybrid align    --teacher T [--data D ...] --out DIR                         Stage 0 + Stage 1 (all linear)
    hybrid score    --teacher T --stage1 DIR --selector S --out DIR             rank the layers
    hybrid distill  --teacher T --stage1 DIR (--ranking F (--ratio|--k) | --softmax-layers L) --out DIR
    hybrid finetune --model DIR [--teacher T] --out DIR --steps N               Stage 3 (cross-entropy)
    hybrid presets  [demo|small|paper]                                           the budgets; --set KEY=VALUE edits them

Every command keeps its resumable state in OUT.work (or --work-dir): rerun the same command after a
crash and it continues. Under `torchrun --nproc_per_node N -m distill.cli ...` the stages train
FSDP2-sharded over the processes (distill/sharding.py) and `score` spreads its candidates over them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from distill.errors import UserError
from distill.selection import DEFAULT_SELECTOR

PRESET_HELP = "budget preset: demo (2 CPU cores, minutes), small (one GPU), paper (the reference budgets)"


def _common(p: argparse.ArgumentParser, teacher_required: bool = True) -> None:
    p.add_argument("--teacher", required=teacher_required, help="hub id, local dir, .gguf file, or smollm2-135m")
    p.add_argument("--data", nargs="+", default=["demo"],
                   help="text/markdown/jsonl/parquet files or folders, a Hugging Face dataset name (hf:org/name"
                        "[:config][@split]), or 'demo' (the default: a small corpus shipped with the package)")
    p.add_argument("--text-field", default="text", help="jsonl/parquet/dataset field holding the text")
    p.add_argument("--preset", default="demo", help=PRESET_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --set stage2.train.steps=50 --set eval_tokens=4096")
    p.add_argument("--seed", type=int, default=0, help="seed for the new GDN parameters and the data order")
    p.add_argument("--work-dir", type=Path, help="resumable state (default: OUT.work next to --out)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="teacher -> hybrid in one resumable command (all stages + selection)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ratio", type=float, help="fraction of layers kept softmax (K = round-half-up(ratio x L))")
    which.add_argument("--k", type=int, help="number of layers kept softmax")
    p.add_argument("--selector", default=DEFAULT_SELECTOR,
                   help="ga-s2+reach (the default: the layers whose long-range attention far-needle recall needs "
                        "first, then the KL-guided GA-S2 ranking) | ga-s2 (KL-guided only) | kl-restore (GA-S2 with "
                        "no training, cheap) | kl-restore+reach | ga-s1 | ablation (zero one teacher attention "
                        "layer, score the drop on synthetic associative recall, or on score.ablation_task's "
                        "prompts; no training) | ablation+reach "
                        "(teacher-only as a whole) | retrieval (the teacher's retrieval heads, no training) | reach "
                        "(alone, no training) | uniform")
    p.add_argument("--out", required=True, type=Path, help="output directory: HF checkpoint + report.md")
    p.set_defaults(func=run_convert)

    p = subparsers.add_parser("presets", help="print a budget preset's settings (the names --set takes)")
    p.add_argument("name", nargs="?", default="demo", help="demo | small | paper")
    p.set_defaults(func=run_presets)

    p = subparsers.add_parser("align", help="Stage 0 + Stage 1: all-linear student aligned to the teacher's attention")
    _common(p)
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=run_align)

    p = subparsers.add_parser("score", help="rank layers for softmax attention (GA-S2 and baselines)")
    _common(p)
    p.add_argument("--stage1", type=Path, help="output of `hybrid align` (needed by ga-s2, kl-restore and ga-s1)")
    p.add_argument("--selector", default=DEFAULT_SELECTOR,
                   help="ga-s2+reach (default) | ga-s2 | kl-restore | kl-restore+reach | ga-s1 | ablation | "
                        "ablation+reach | retrieval | reach | uniform (see `hybrid convert --help`)")
    p.add_argument("--k", type=int, help="highlight the top K in the plot")
    p.add_argument("--out", required=True, type=Path, help="directory for ranking.json and plots")
    p.set_defaults(func=run_score)

    p = subparsers.add_parser(
        "distill", help="Stage 2: restore softmax in chosen layers, full-vocabulary KL",
        description="Stage 2: restore the teacher's softmax attention in the chosen layers of a Stage-1 model "
                    "(--stage1 with --ranking and --k/--ratio, or --softmax-layers) and distill every parameter "
                    "on KL(teacher || hybrid); or, with --from, give a hybrid that has had its Stage 2 "
                    "stage2.train.steps more steps (the same layers; with the same --seed the data order goes "
                    "on where that run stopped; AdamW starts afresh).")
    _common(p)
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--stage1", type=Path, help="output of `hybrid align`")
    start.add_argument("--from", dest="from_hybrid", type=Path, metavar="HYBRID",
                       help="output of an earlier `hybrid distill` (or `convert`) to train further")
    p.add_argument("--ranking", type=Path, help="ranking.json (or its directory) from `hybrid score`")
    p.add_argument("--ratio", type=float)
    p.add_argument("--k", type=int)
    p.add_argument("--softmax-layers", help="explicit comma-separated layers instead of a ranking")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=run_distill)

    p = subparsers.add_parser("finetune", help="Stage 3: next-token cross-entropy fine-tune of a hybrid")
    _common(p, teacher_required=False)
    p.add_argument("--model", required=True, type=Path, help="hybrid checkpoint directory")
    p.add_argument("--steps", type=int, help="training steps (default: the preset's stage3.steps)")
    p.add_argument("--out", required=True, type=Path)
    p.set_defaults(func=run_finetune)


# ---------------------------------------------------------------------------------------------


def _runtime(args):
    import torch

    from distill.distributed import init_runtime

    runtime = init_runtime(args.device)
    if args.threads:  # after init_runtime, which shares the cores among a node's processes by default
        torch.set_num_threads(args.threads)
    return runtime


def _check_out(args) -> None:
    from distill.atomic_io import check_output_dir

    check_output_dir(args.out, args.overwrite)


def _run_spec(args, command: str, extra: dict):
    """The run the arguments describe, and what a rerun must match to continue its work dir."""
    from distill.pipeline import RunSpec
    from distill.presets import get_preset

    preset = get_preset(args.preset, args.overrides, args.seed)
    work_dir = args.work_dir or args.out.with_name(args.out.name + ".work")
    spec = RunSpec(args.teacher, tuple(args.data), preset, work_dir, args.seed, args.text_field)
    identity = {"command": command, "teacher": args.teacher, "data": list(args.data), "seed": args.seed,
                "preset": preset.identity(), **extra}
    return spec, identity


def _session(args, runtime, command: str, extra: dict, read_data: bool = True):
    from distill.pipeline import Session

    spec, identity = _run_spec(args, command, extra)
    return Session.open(spec, runtime, identity, read_data)


def _asdict(obj):
    from dataclasses import asdict

    return asdict(obj)


def _finish(runtime) -> None:
    from distill.distributed import shutdown

    shutdown(runtime)


def run_presets(args) -> None:
    from distill.presets import format_preset_budget, get_preset

    preset = get_preset(args.name)
    print(json.dumps(_asdict(preset), indent=2))
    print(format_preset_budget(preset))


def run_convert(args) -> None:
    from distill.pipeline import ConvertRequest, convert

    _check_out(args)
    runtime = _runtime(args)
    req = ConvertRequest(
        teacher=args.teacher, out=args.out, data=tuple(args.data), ratio=args.ratio, k=args.k,
        selector=args.selector, preset=args.preset, overrides=tuple(args.overrides), seed=args.seed,
        work_dir=args.work_dir, overwrite=args.overwrite, text_field=args.text_field,
    )
    out = convert(req, runtime)
    if runtime.is_main:
        metrics = json.loads((out / "metrics.json").read_text())
        print(f"wrote {out} (report: {out / 'report.md'})")
        for label, kl in metrics["kl"].items():
            print(f"  held-out KL {label}: {kl:.4f}")
    _finish(runtime)


def _save_stage_output(s, model, out: Path, stage: str, with_metrics: bool = True) -> None:
    """The stage's model, the teacher's tokenizer, its training log and (optionally) metrics, atomically."""
    from distill.atomic_io import atomic_directory

    with atomic_directory(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        s.tokenizer.save_pretrained(tmp)
        shutil.copy(s.work_dir / stage / "log.jsonl", tmp / "log.jsonl")
        if with_metrics:
            (tmp / "metrics.json").write_text(json.dumps(s.metrics(), indent=2))


def run_align(args) -> None:
    from distill.pipeline import step_stage1

    _check_out(args)
    runtime = _runtime(args)
    s = _session(args, runtime, "align", {})
    model = step_stage1(s)
    if runtime.is_main:
        _save_stage_output(s, model, args.out, "stage1")
        print(f"wrote {args.out}: all-linear Stage-1 hybrid; held-out KL {s.metrics()['kl']}")
    _finish(runtime)


def run_score(args) -> None:
    from distill.pipeline import load_hybrid, save_ranking_outputs, step_score
    from distill.selection import NEEDS_STAGE1, TEACHER_ONLY

    if args.selector.partition("+")[0] in NEEDS_STAGE1 and args.stage1 is None:
        raise UserError(f"--selector {args.selector} needs --stage1 DIR (the output of `hybrid align`)")
    _check_out(args)
    runtime = _runtime(args)
    s = _session(args, runtime, "score", {"selector": args.selector, "stage1": str(args.stage1)},
                 read_data=args.selector not in TEACHER_ONLY)
    stage1 = load_hybrid(args.stage1, runtime) if args.stage1 else None
    if stage1 is not None and stage1.config.softmax_layers:
        raise UserError(f"--stage1 {args.stage1} is not all-linear (softmax layers {stage1.config.softmax_layers})")
    ranking = step_score(s, stage1, args.selector)
    if runtime.is_main:
        save_ranking_outputs(ranking, args.out, args.k)
        print(f"wrote {args.out / 'ranking.json'}: {args.selector} order (most important first) {ranking.order}")
    _finish(runtime)


def run_distill(args) -> None:
    from distill.pipeline import load_hybrid, step_stage2
    from distill.placement import k_from_ratio, parse_layer_list
    from distill.selection import Ranking

    _check_out(args)
    if args.from_hybrid is not None:
        return _distill_further(args)
    if (args.softmax_layers is None) == (args.ranking is None):
        raise UserError("pass either --ranking (with --ratio or --k) or --softmax-layers")
    runtime = _runtime(args)
    s = _session(args, runtime, "distill", {"stage1": str(args.stage1)})
    stage1 = load_hybrid(args.stage1, runtime)
    L = stage1.config.num_hidden_layers
    if args.softmax_layers is not None:
        chosen = parse_layer_list(args.softmax_layers, L)
        ranking = Ranking("explicit", L, chosen, metric="layers given with --softmax-layers")
    else:
        if (args.ratio is None) == (args.k is None):
            raise UserError("with --ranking, pass exactly one of --ratio or --k")
        ranking = Ranking.load(args.ranking)
        if ranking.num_layers != L:
            raise UserError(f"--ranking {args.ranking} ranks {ranking.num_layers} layers; the model has {L}")
        chosen = ranking.choose(args.k if args.k is not None else k_from_ratio(args.ratio, L))
    model = step_stage2(s, stage1, chosen, ranking)
    if runtime.is_main:
        _save_stage_output(s, model, args.out, "stage2")
        print(f"wrote {args.out}: softmax layers {chosen}; held-out KL {s.metrics()['kl']}")
    _finish(runtime)


def _distill_further(args) -> None:
    from distill.pipeline import load_hybrid, step_stage2_more

    chosen_elsewhere = [f"--{name.replace('_', '-')}" for name in ("ranking", "ratio", "k", "softmax_layers")
                        if getattr(args, name) is not None]
    if chosen_elsewhere:
        raise UserError(f"--from keeps the hybrid's own softmax layers; drop {', '.join(chosen_elsewhere)}")
    runtime = _runtime(args)
    s = _session(args, runtime, "distill", {"from": str(args.from_hybrid)})
    model = step_stage2_more(s, load_hybrid(args.from_hybrid, runtime), args.from_hybrid)
    if runtime.is_main:
        _save_stage_output(s, model, args.out, "stage2")
        print(f"wrote {args.out}: softmax layers {model.config.softmax_layers}, Stage 2 now "
              f"{model.config.provenance['tokens']['stage2']:,} tokens; held-out KL {s.metrics()['kl']}")
    _finish(runtime)


def run_finetune(args) -> None:
    from transformers import AutoTokenizer

    from distill.pipeline import Session, load_hybrid, step_stage3

    _check_out(args)
    runtime = _runtime(args)
    spec, identity = _run_spec(args, "finetune", {"model": str(args.model), "steps": args.steps})
    if args.steps is not None:
        spec = replace(spec, preset=replace(spec.preset, stage3=replace(spec.preset.stage3, steps=args.steps)))
    if spec.preset.stage3.steps == 0:
        raise UserError("pass --steps N (the preset has no Stage 3 steps)")
    model = load_hybrid(args.model, runtime)
    if args.teacher:
        s = Session.open(spec, runtime, identity)
    else:
        s = Session.without_teacher(spec, runtime, AutoTokenizer.from_pretrained(args.model))
    model = step_stage3(s, model)
    if runtime.is_main:
        _save_stage_output(s, model, args.out, "stage3", with_metrics=False)
        print(f"wrote {args.out}")
    _finish(runtime)
