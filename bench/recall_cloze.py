"""A natural-text recall task for lm-evaluation-harness, written from documents the model never trained on.

    python bench/recall_cloze.py --data ../shared/data/en-mix-validation.jsonl.xz --out eval/recall_cloze
    hybrid eval CKPT --teacher smollm2-135m --tasks eval/recall_cloze/recall_cloze.yaml

Passkey retrieval plants a number in filler text; this asks the same of real prose. Each sample is a
document prefix that ends just before a name the document used earlier: a capitalised word, not the
first of its sentence, found in few documents of the corpus, whose latest earlier use lies at least
--min-distance characters back (so the answer must be recalled from far away, not copied from the
last sentence). The model is scored on the name's log-likelihood (lm-eval `loglikelihood`): `acc` is
greedy exact match, `perplexity` the per-sample perplexity of the name. Deterministic: the same data
and settings write the same files.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.data import read_file
from distill.errors import UserError

NAME = re.compile(r"(?<![A-Za-z'])[A-Z][a-z]{3,}(?![A-Za-z'])")  # Capitalised words of 4+ letters
SENTENCE_END = ".!?:;\"'“”\n"


@dataclass(frozen=True)
class ClozeSettings:
    min_distance: int = 1000  # characters (about 250 tokens) between the latest earlier use of the name and the blank
    max_context: int = 8000  # characters of context (about 2K tokens of English); the window holds an earlier use
    max_doc_freq: int = 5  # the name appears in at most this many documents of the corpus
    per_document: int = 8  # samples per document, at most (distinct names)
    samples: int = 200  # samples in all, at most (the first ones in corpus order)


def _mid_sentence(text: str, start: int) -> bool:
    before = text[:start].rstrip(" ")
    return bool(before) and before[-1] not in SENTENCE_END


def cloze_samples(docs: list[str], settings: ClozeSettings) -> list[dict]:
    """[{"context", "target", "distance", "doc"}] in corpus order; target is " Name" (its leading space
    belongs to the answer, as in lm-eval's lambada)."""
    doc_freq = Counter(name for doc in docs for name in {m.group() for m in NAME.finditer(doc)})
    out: list[dict] = []
    for index, doc in enumerate(docs):
        latest: dict[str, tuple[int, int]] = {}  # name -> (start, end) of its latest use so far
        used: set[str] = set()
        for match in NAME.finditer(doc):
            name, start = match.group(), match.start()
            previous = latest.get(name)
            latest[name] = match.span()
            window = max(0, start - 1 - settings.max_context)
            if (previous is None or name in used or doc_freq[name] > settings.max_doc_freq
                    or start - previous[1] < settings.min_distance or previous[0] < window
                    or doc[start - 1] != " " or not _mid_sentence(doc, start)):
                continue
            out.append({"context": doc[window:start - 1], "target": f" {name}", "distance": start - previous[1],
                        "doc": index})
            used.add(name)
            if len(used) == settings.per_document:
                break
        if len(out) >= settings.samples:
            break
    return out[: settings.samples]


def write_task(samples: list[dict], out: Path, task: str = "recall_cloze") -> Path:
    """The lm-eval task file (and its jsonl beside it) in `out`; returns the task file's path."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{task}.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    yaml = out / f"{task}.yaml"
    yaml.write_text(
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: "{{target}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return yaml


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="text, markdown or jsonl file (.xz/.gz/.bz2 too)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text")
    p.add_argument("--out", type=Path, required=True, help="folder for the task file and its data")
    defaults = ClozeSettings()
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = p.parse_args(argv)
    settings = ClozeSettings(**{k: getattr(args, k) for k in asdict(defaults)})
    if not args.data.is_file():
        raise UserError(f"--data {args.data}: no such file")
    samples = cloze_samples(list(read_file(args.data, args.text_field)), settings)
    if not samples:
        raise UserError(f"--data {args.data}: no name recurs {settings.min_distance}+ characters after its "
                        "earlier use; lower --min-distance or give longer documents")
    task = write_task(samples, args.out)
    meta = {"data": str(args.data), "settings": asdict(settings), "samples": len(samples),
            "documents": len({s["doc"] for s in samples}),
            "median_distance": sorted(s["distance"] for s in samples)[len(samples) // 2]}
    (args.out / "recall_cloze.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {task}: {meta['samples']} samples from {meta['documents']} documents, "
          f"median distance {meta['median_distance']} characters")
    return task


if __name__ == "__main__":
    main()
