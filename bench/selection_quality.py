"""Quality of hybrids that differ only in which layers stay softmax: held-out KL and in-context recall.

    python -m bench.selection_quality --teacher T --data VALIDATION --hybrid ga-s2=DIR --hybrid uniform=DIR \
        [--seq-len 1024] [--eval-tokens 65536] [--recall-pairs 16 64 128] --out results.json

For each hybrid: KL(teacher || hybrid) per token on held-out text (the `--data` files' held-out
split), and in-context recall with the teacher as the ceiling: passkey retrieval (a 5-digit key
hidden at a random depth in filler text, then asked for; a sample counts when every digit is the
argmax) and the ablation selector's associative recall (`k1 v1 ... kP vP` then the keys again,
shuffled; accuracy of the greedy value). Writes one JSON object and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from distill.data import DataSpec, prepare_data
from distill.distributed import init_runtime
from distill.evaluate import EvalSet, heldout_kl
from distill.model.teacher import load_teacher
from distill.pipeline import load_hybrid
from distill.selection import recall_accuracy, recall_task, recall_vocabulary


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_task(tokenizer, samples: int, context: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [samples, context], positions [samples, D], answers [samples, D]): the key's D digit tokens
    follow `positions`; the key sits at a uniformly random depth of the filler."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    gen = torch.Generator().manual_seed(seed)
    filler = encode(FILLER * (context // 8))
    question = encode(" What is the pass key? The pass key is")
    def draw_key(answer_len: int | None) -> str:
        # keys whose answer is `answer_len` tokens, so samples stack (SmolLM2 splits digits: always equal)
        for _ in range(1000):
            key = str(int(torch.randint(10_000, 100_000, (1,), generator=gen)))
            if answer_len is None or len(encode(f" {key}")) == answer_len:
                return key
        raise ValueError(f"no 5-digit key encodes to {answer_len} tokens with this tokenizer")

    ids, positions, answers = [], [], []
    answer_len = None
    for _ in range(samples):
        key = draw_key(answer_len)
        needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
        answer = encode(f" {key}")
        answer_len = len(answer)
        room = context - len(needle) - len(question) - len(answer)
        before = int(torch.randint(0, room + 1, (1,), generator=gen))
        seq = filler[:before] + needle + filler[: room - before] + question + answer
        ids.append(seq)
        positions.append(list(range(len(seq) - len(answer) - 1, len(seq) - 1)))
        answers.append(answer)
    return torch.tensor(ids), torch.tensor(positions), torch.tensor(answers)


@torch.no_grad()
def passkey_accuracy(model, ids, positions, answers, runtime, batch: int = 4) -> float:
    """Fraction of samples whose every answer token is the model's argmax (greedy exact match)."""
    hits = 0
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch].to(runtime.device)
        pos = positions[start : start + batch].to(runtime.device)
        with runtime.autocast():
            hidden = model.model(input_ids=chunk, use_cache=False).last_hidden_state
        at = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))
        predicted = model.lm_head(at).argmax(-1)
        hits += (predicted == answers[start : start + batch].to(runtime.device)).all(-1).sum().item()
    return hits / len(ids)


def parse_named(items: list[str]) -> dict[str, Path]:
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--hybrid expects NAME=DIR, got {item!r}")
        named[name] = Path(path)
    return named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", nargs="+", required=True, help="held-out text (files `--data` of convert accepts)")
    parser.add_argument("--hybrid", action="append", required=True, help="NAME=DIR (repeatable)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--passkey-contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--recall-pairs", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--recall-samples", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    hybrids = parse_named(args.hybrid)

    runtime = init_runtime(args.device)
    teacher, tokenizer = load_teacher(args.teacher)
    teacher.to(runtime.device)
    data = prepare_data(DataSpec(tuple(args.data), args.seq_len, args.eval_tokens), tokenizer)
    eval_set = EvalSet.build(teacher, data, 8, runtime)
    vocab = recall_vocabulary(tokenizer)
    passkeys = {c: passkey_task(tokenizer, args.recall_samples, c, seed=c) for c in args.passkey_contexts}
    tasks = {p: recall_task(vocab, args.recall_samples, p, seed=p) for p in args.recall_pairs}

    def recall(model) -> dict[str, float]:
        scores = {f"passkey@{c}": round(passkey_accuracy(model, *task, runtime), 4) for c, task in passkeys.items()}
        for p, task in tasks.items():
            scores[f"pairs@{4 * p}"] = round(recall_accuracy(model, *task, runtime)[0], 4)
        return scores

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if runtime.device.type == "cuda" else "cpu",
        "command": " ".join(["python -m bench.selection_quality", *(argv if argv is not None else sys.argv[1:])]),
        "heldout_tokens": eval_set.num_tokens,
        "teacher": {"recall": recall(teacher)},
        "hybrids": {},
    }
    for name, path in hybrids.items():
        model = load_hybrid(path, runtime)
        result["hybrids"][name] = {
            "path": str(path),
            "softmax_layers": model.config.softmax_layers,
            "heldout_kl": round(heldout_kl(model, eval_set, runtime), 4),
            "recall": recall(model),
        }
        del model
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    return 0


def markdown_table(result: dict) -> str:
    contexts = list(result["teacher"]["recall"])
    head = "| model | softmax layers | held-out KL | " + " | ".join(contexts) + " |"
    rows = [head, "|" + "---|" * (3 + len(contexts))]
    rows.append("| teacher | all | 0 | " + " | ".join(f"{result['teacher']['recall'][c]:.3f}" for c in contexts) + " |")
    for name, h in result["hybrids"].items():
        rows.append(f"| {name} | {h['softmax_layers']} | {h['heldout_kl']:.4f} | "
                    + " | ".join(f"{h['recall'][c]:.3f}" for c in contexts) + " |")
    return "\n".join(rows)


def plot(results_dir: Path) -> Path:
    """selection.png in `results_dir` from its ranking-ga-s2.json and selection_quality.json: the GA-S2
    score of every layer with each selector's chosen layers marked, and the hybrids' held-out KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranking = json.loads((results_dir / "ranking-ga-s2.json").read_text())
    quality = json.loads((results_dir / "selection_quality.json").read_text())
    layers = list(range(ranking["num_layers"]))
    scores = [ranking["scores"][str(i)] for i in layers]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 1]})
    low, high = min(scores), max(scores)
    base = low - 0.1 * (high - low)  # bars start here; each selector's chosen layers are marked below
    left.bar(layers, [v - base for v in scores], bottom=base, color="#b0b7c3")
    left.set_ylim(base - 0.3 * (high - low), high + 0.25 * (high - low))
    for row, (name, h) in enumerate(quality["hybrids"].items()):
        y = base - (0.07 + 0.08 * row) * (high - low)
        left.scatter(h["softmax_layers"], [y] * len(h["softmax_layers"]), marker="s", s=28, label=f"{name} softmax layers")
    left.set_xticks(layers)
    left.set_xlabel("layer")
    left.set_ylabel("GA-S2 score\n(KL with only this layer softmax)")
    left.legend(loc="upper center", fontsize=8, ncol=3)
    names = list(quality["hybrids"])
    right.bar(names, [quality["hybrids"][n]["heldout_kl"] for n in names], color=["C0", "C1", "C2"][: len(names)])
    right.set_ylabel("held-out KL after Stage 2")
    fig.suptitle(f"Layer selection, {quality['device']}, {quality['date']}")
    fig.tight_layout()
    out = results_dir / "selection.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "plot":  # python -m bench.selection_quality plot RESULTS_DIR
        print(plot(Path(sys.argv[2])))
        sys.exit(0)
    sys.exit(main())
