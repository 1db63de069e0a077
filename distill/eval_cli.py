"""`hybrid eval`: teacher and hybrids side by side (registered by distill.cli)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from distill.errors import UserError
from distill.recall_tasks import DEFAULT_NEEDLES, RECALL_KINDS

HELDOUT_TASKS = ("heldout", "kl")
DEFAULT_TASKS = ("heldout",) + RECALL_KINDS

DESCRIPTION = """\
Evaluate a teacher and hybrids side by side: one markdown table, JSON and a plot in --out.

Tasks (--tasks, any mix):
  heldout (or kl)  held-out KL(teacher || model) and perplexity on the held-out split of --data
                   (the split `hybrid convert` holds out from the same --data: a conversion never
                   trains on it as long as --eval-tokens is at most the conversion's eval_tokens)
  passkey          a 5-digit key hidden at a random depth of filler text, then asked for
  multikey         several keys for differently named doors; one is asked for
  assoc            associative recall: a block of "The code of <word> is <number>." facts; one is asked for
  vartrack         variable tracking: VAR A = 12345 ... VAR B = A; the value of the last is asked for
  lm:TASK          an lm-evaluation-harness task by name (lm:hellaswag), through lm-eval's `hf` model
  PATH.yaml        a local lm-eval task file (its dataset may be a local json/jsonl file)
Recall tasks run at every --lengths, --samples each, and report greedy exact match and a continuous
score: log p(answer) with the needle minus without it (nats). The samples are generated locally and
are the same for the same --seed.

--server URL points lm-eval's `local-completions` model at a running `hybrid serve` (log-likelihoods
through echo + logprobs; --server-tokenizer is the served checkpoint, read locally).

Ctrl-C stops cleanly: results.json/.md/.png keep what was measured, marked interrupted.
"""

EXAMPLES = """\
examples:
  hybrid eval runs/hybrid --teacher smollm2-135m --data ./validation.jsonl --out eval/
  hybrid eval ga-s2=runs/a uniform=runs/b --tasks passkey --lengths 512 1024 --samples 10 --out eval/
  hybrid eval runs/hybrid --tasks lm:hellaswag --lm-eval-limit 200 --out eval/
  hybrid eval --server http://127.0.0.1:8000 --server-tokenizer runs/hybrid --tasks my_task.yaml --out eval/
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate teacher and hybrids side by side (KL, recall, lm-eval)",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="CKPT",
                   help="checkpoint directories (hybrid or plain) or hub ids; NAME=DIR names a row")
    p.add_argument("--teacher", help="hub id, local dir, .gguf file, or smollm2-135m "
                                     "(default: the teacher named in the first checkpoint's provenance)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), metavar="TASK",
                   help=f"what to measure (default: {' '.join(DEFAULT_TASKS)}; see above)")
    p.add_argument("--out", type=Path, default=Path("hybrid-eval"), help="output folder (default: ./hybrid-eval)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    g = p.add_argument_group("held-out text")
    g.add_argument("--data", nargs="+", default=["demo"], help="the --data of the conversion (default: demo)")
    g.add_argument("--text-field", default="text", help="jsonl/parquet field holding the text")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per held-out block (default 512)")
    g.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens (default 8192)")
    g.add_argument("--heldout-batch", type=int, default=4, help="held-out blocks per forward")
    g = p.add_argument_group("recall tasks")
    g.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                   help="context lengths in tokens (default 512 1024 2048 4096 8192; longer than the model's "
                        "max_position_embeddings are skipped and listed)")
    g.add_argument("--samples", type=int, default=100, help="samples per task and length (default 100; fewer on CPU)")
    g.add_argument("--seed", type=int, default=0, help="seed of the generated samples")
    g.add_argument("--needles", action="append", default=[], metavar="KIND=N",
                   help="needles of a task: multikey keys, assoc facts, vartrack variables "
                        f"(defaults: {', '.join(f'{k}={v}' for k, v in DEFAULT_NEEDLES.items() if k != 'passkey')})")
    g.add_argument("--batch-tokens", type=int, default=16384,
                   help="recall prompts per forward = batch_tokens // length (default 16384)")
    g = p.add_argument_group("lm-evaluation-harness")
    g.add_argument("--lm-eval-limit", type=int, help="examples per lm-eval task (default: all)")
    g.add_argument("--lm-eval-include", nargs="+", default=[], metavar="DIR", help="extra folders of task files")
    g.add_argument("--lm-eval-batch-size", type=int, default=1)
    g.add_argument("--num-fewshot", type=int)
    g.add_argument("--server", help="base URL of a running server for lm-eval's local-completions model")
    g.add_argument("--server-model", help="served model name (default: the server's first /v1/models entry)")
    g.add_argument("--server-tokenizer", help="the served checkpoint's tokenizer (default: the first CKPT)")
    g.add_argument("--api-key", help="the server's API key (default: $OPENAI_API_KEY)")
    g.add_argument("--server-max-length", type=int, default=2048, help="context the server accepts (default 2048)")
    p.set_defaults(func=run_eval)


def parse_models(items: list[str]):
    from distill.eval_run import ModelSpec

    specs, names = [], set()
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name or item, item
        if not name or not path:
            raise UserError(f"checkpoint {item!r}: expected DIR or NAME=DIR")
        if name in names or name == "teacher":
            raise UserError(f"checkpoint name {name!r} is used twice (or is 'teacher'); name rows with NAME=DIR")
        names.add(name)
        specs.append(ModelSpec(name, path))
    return tuple(specs)


def parse_tasks(tasks: list[str]) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
    """(held-out wanted, recall kinds, lm-eval tasks)."""
    heldout, recall, harness = False, [], []
    for task in tasks:
        if task in HELDOUT_TASKS:
            heldout = True
        elif task in RECALL_KINDS:
            recall.append(task)
        elif task.startswith("lm:") and len(task) > 3:
            harness.append(task[3:])
        elif task.endswith((".yaml", ".yml")):
            if not Path(task).is_file():
                raise UserError(f"--tasks {task}: no such task file")
            harness.append(task)
        else:
            raise UserError(f"--tasks {task!r}: expected one of {', '.join(DEFAULT_TASKS)}, lm:TASK or a .yaml file")
    return heldout, tuple(dict.fromkeys(recall)), tuple(dict.fromkeys(harness))


def parse_needles(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        kind, sep, value = item.partition("=")
        if not sep or kind not in RECALL_KINDS or kind == "passkey" or not value.isdigit() or int(value) < 1:
            raise UserError(f"--needles {item!r}: expected KIND=N with KIND multikey, assoc or vartrack and N >= 1")
        out[kind] = int(value)
    return out


def _server_target(args, models):
    from distill.eval_harness import ServerTarget

    if args.server is None:
        return None
    tokenizer = args.server_tokenizer or (models[0].path if models else None)
    if tokenizer is None:
        raise UserError("--server needs --server-tokenizer DIR (the served checkpoint) for lm-eval's token counts")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    target = ServerTarget(args.server, args.server_model or "", tokenizer, api_key, args.server_max_length)
    if not target.model:
        target = ServerTarget(target.base_url, _first_served_model(target), tokenizer, api_key, args.server_max_length)
    return target


def _first_served_model(target) -> str:
    import httpx

    url = target.completions_url.removesuffix("/completions") + "/models"
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=10, trust_env=False)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
        raise UserError(f"--server {target.base_url}: could not list its models at {url} ({err}); "
                        "pass --server-model NAME") from None


def run_eval(args) -> None:
    import torch

    from distill.distributed import init_runtime
    from distill.eval_harness import HarnessSpec
    from distill.eval_run import EvalRequest, Evaluation

    if args.threads:
        torch.set_num_threads(args.threads)
    heldout, recall, harness_tasks = parse_tasks(args.tasks)
    if args.server and not harness_tasks:
        raise UserError("--server answers lm-eval tasks only: pass --tasks lm:TASK or a task .yaml file")
    models = parse_models(args.checkpoints)
    harness = None
    if harness_tasks:
        harness = HarnessSpec(harness_tasks, tuple(args.lm_eval_include), args.lm_eval_limit,
                              args.lm_eval_batch_size, args.num_fewshot, args.seed)
    for name, value in (("--seq-len", args.seq_len), ("--eval-tokens", args.eval_tokens),
                        ("--batch-tokens", args.batch_tokens), ("--heldout-batch", args.heldout_batch)):
        if value < 1:
            raise UserError(f"{name} must be positive, got {value}")
    request = EvalRequest(
        models=models, out=args.out, teacher=args.teacher, heldout=heldout, recall_kinds=recall,
        lengths=tuple(args.lengths), samples=args.samples, seed=args.seed, needles=parse_needles(args.needles),
        batch_tokens=args.batch_tokens, data=tuple(args.data), text_field=args.text_field, seq_len=args.seq_len,
        eval_tokens=args.eval_tokens, heldout_batch=args.heldout_batch, harness=harness,
        server=_server_target(args, models), command=shlex.join(["hybrid", *sys.argv[1:]]),
    )
    runtime = init_runtime(args.device)
    evaluation = Evaluation(request, runtime)
    try:
        report = evaluation.run()
    except KeyboardInterrupt:
        print(f"\ninterrupted: what was measured is in {args.out}/results.json (marked interrupted)", file=sys.stderr)
        raise SystemExit(130) from None
    from distill.eval_report import markdown_table

    print(markdown_table(report))
    print(f"wrote {args.out}/results.json, results.md" + (", results.png" if (args.out / "results.png").exists() else ""))
