"""Training text: find it, tokenise it with the teacher's tokenizer, pack it into blocks, cache it.

    --data SOURCE [SOURCE ...]     each SOURCE is one of
        demo                        the small public-domain corpus shipped in distill/demo_data
        a file                      .txt .md .markdown .rst .text .jsonl .ndjson .parquet (.gz/.xz/.bz2 too)
        a folder                    every such file below it, in sorted order
        a prepared-data folder      a cache entry written by this module (has hybrid-data.json)
        a Hugging Face dataset      "org/name", "hf:org/name", "hf:org/name:config@split" (streamed)

A text is a jsonl line, a parquet or dataset row, or a text file. It is cut into pieces at paragraph
breaks: a text file into pieces of at most DOC_CHARS characters, so that the held-out split can take
part of it; a row only beyond ROW_CHARS, to bound the tokenizer's memory. Each piece is tokenised
without special tokens, and the last piece of a text is followed by EOS, so a long text reaches
training as one run of tokens. The stream is cut into blocks of `seq_len` tokens (the tail that does
not fill a block is dropped). `min_doc_tokens` keeps only texts at least that long in the training
blocks, so a long block holds long-range dependencies instead of several unrelated texts.

The held-out split is fixed by content, not by position: pieces are ordered by a hash of their text
and the first ones, until they hold `eval_tokens` tokens, are held out and packed into
eval_tokens // seq_len blocks. The same files give the same held-out pieces whatever their order,
the sequence length or the run, so stages with different sequence lengths never train on each
other's held-out text.

The packed blocks are cached under $HYBRID_CACHE/data/<key>, where the key covers the tokenizer's
fingerprint, every file's path, size and mtime, and the packing settings.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import logging
import lzma
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.atomic_io import atomic_directory
from distill.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: EOS only after a text's last piece (1: after every piece)
DEMO = "demo"
DOC_CHARS = 8000  # text files are cut into pieces of at most this many characters
ROW_CHARS = 1_000_000  # rows (jsonl, parquet, datasets) are cut only beyond this many characters
META_FILE = "hybrid-data.json"
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}


# ---------------------------------------------------------------------------------------------
# What the user asked for
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    sources: tuple[str, ...] = (DEMO,)
    seq_len: int = 256
    eval_tokens: int = 2048  # held-out tokens (the same documents whatever seq_len is)
    max_tokens: int | None = None  # stop reading after this many tokens (needed for streamed datasets)
    text_field: str = "text"
    # training blocks come only from texts (a file of a text format, or a row) at least this many tokens long,
    # EOS included; 0 keeps every text. The held-out pieces are chosen before this filter, so the held-out text
    # is the same either way.
    min_doc_tokens: int = 0


def _base_suffix(path: Path) -> tuple[str, str | None]:
    """("x.jsonl.gz") -> (".jsonl", ".gz")."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in OPENERS:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def _is_supported(path: Path) -> bool:
    return _base_suffix(path)[0] in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or _is_supported(Path(source))


def demo_files() -> list[Path]:
    root = resources.files("distill") / "demo_data"
    files = sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".txt.gz"))
    if not files:
        raise UserError(f"the demo corpus is missing from the installed package ({root}); reinstall hybrid-llm")
    return files


@dataclass(frozen=True)
class Source:
    kind: str  # "file" | "hf" | "prepared"
    name: str  # file path, dataset id, or prepared dir
    config: str | None = None
    split: str = "train"


def resolve_sources(sources: tuple[str, ...]) -> list[Source]:
    """Expand --data arguments into files (sorted), HF datasets, or one prepared-data directory."""
    if not sources:
        raise UserError("--data is empty: pass files, folders, a Hugging Face dataset name, or 'demo'")
    out: list[Source] = []
    for source in sources:
        if source == DEMO:
            out += [Source("file", str(p)) for p in demo_files()]
            continue
        if source.startswith("hf:"):
            out.append(_hf_source(source[3:]))
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            if (path / META_FILE).is_file():
                out.append(Source("prepared", str(path.resolve())))
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_supported(p) and not p.name.startswith("."))
            if not files:
                raise UserError(
                    f"--data folder {path} holds no text files (looked for {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)}, "
                    "optionally compressed .gz/.xz/.bz2)"
                )
            out += [Source("file", str(p.resolve())) for p in files]
        elif path.is_file():
            if not _is_supported(path):
                raise UserError(
                    f"--data file {path} has an unsupported type; expected one of "
                    f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)} (optionally .gz/.xz/.bz2)"
                )
            out.append(Source("file", str(path.resolve())))
        elif _looks_like_path(source):
            raise UserError(f"--data {source}: no such file or folder")
        else:
            out.append(_hf_source(source))
    if any(s.kind == "prepared" for s in out) and len(out) > 1:
        raise UserError("a prepared-data folder must be the only --data source")
    return out


def _hf_source(text: str) -> Source:
    """'org/name[:config][@split]'."""
    name, _, split = text.partition("@")
    name, _, config = name.partition(":")
    if not name:
        raise UserError(f"--data hf:{text}: expected a dataset name like hf:org/name[:config][@split]")
    return Source("hf", name, config or None, split or "train")


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------


def _open_text(path: Path) -> io.TextIOBase:
    opener = OPENERS.get(_base_suffix(path)[1] or "", open)
    return opener(path, "rt", encoding="utf-8", errors="replace")


def split_long(text: str, limit: int = DOC_CHARS) -> Iterator[str]:
    """Cut text into pieces of at most `limit` characters, at paragraph breaks where possible."""
    text = text.strip()
    while len(text) > limit:
        cut = text.rfind("\n\n", 0, limit)
        if cut <= 0:
            cut = text.rfind(" ", 0, limit)
        if cut <= 0:
            cut = limit
        yield text[:cut].strip()
        text = text[cut:].strip()
    if text:
        yield text


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, parsed row) for each non-blank line of a JSON-lines file, compressed or not."""
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None


def read_file(path: Path, text_field: str) -> Iterator[str]:
    """The texts of one file, whole: the file itself (text formats) or each row's `text_field`."""
    base, _ = _base_suffix(path)
    if base in TEXT_SUFFIXES:
        with _open_text(path) as f:
            yield f.read()
    elif base in JSONL_SUFFIXES:
        for line_no, row in jsonl_rows(path):
            yield _text_of(row, text_field, f"{path}:{line_no}")
    elif base in PARQUET_SUFFIXES:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"reading {path} needs pyarrow: pip install 'hybrid-llm[data]'") from None
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise UserError(
                f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); pass --text-field NAME"
            )
        for batch in table.iter_batches(columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text


def _text_of(row, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        hint = (
            " Rows of token ids cannot be used: the ids of another tokenizer would be silently wrong; pass the raw text."
            if isinstance(row, dict) and ("input_ids" in row or "tokens" in row)
            else " Pass --text-field NAME to use another field."
        )
        raise UserError(f"{where}: expected a JSON object with a {text_field!r} field, found {keys}.{hint}")
    text = row[text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} must be a string, found {type(text).__name__}")
    return text


def read_hf(source: Source, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"--data {source.name!r} is not a local file or folder, so it is read as a Hugging Face dataset, "
            "which needs the `datasets` package: pip install 'hybrid-llm[data]'"
        ) from None
    try:
        stream = datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; the user needs the message
        raise UserError(f"could not open Hugging Face dataset {source.name!r} (split {source.split!r}): {err}") from None
    for i, row in enumerate(stream):
        yield _text_of(row, text_field, f"{source.name} row {i}")


# ---------------------------------------------------------------------------------------------
# Tokenising, splitting, packing
# ---------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides token ids: the vocabulary, merges, normaliser, EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    payload += f"|eos={tokenizer.eos_token_id}"
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _source_key(source: Source) -> dict:
    if source.kind == "file":
        stat = Path(source.name).stat()
        return {"file": source.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return asdict(source)


def _corpus_payload(spec: DataSpec, sources: list[Source], fingerprint: str) -> dict:
    """What the tokenised documents depend on (not how they are packed)."""
    return {
        "version": FORMAT_VERSION,
        "tokenizer": fingerprint,
        "sources": [_source_key(s) for s in sources],
        "max_tokens": spec.max_tokens,
        "text_field": spec.text_field,
        "doc_chars": DOC_CHARS,
        "row_chars": ROW_CHARS,
    }


def _names(sources: list[Source]) -> str:
    return ", ".join(s.name for s in sources[:3]) + (f" (+{len(sources) - 3} more)" if len(sources) > 3 else "")


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def cache_key(spec: DataSpec, sources: list[Source], fingerprint: str) -> str:
    """The packed blocks' cache entry."""
    return _digest(_corpus_payload(spec, sources, fingerprint)
                   | {"seq_len": spec.seq_len, "eval_tokens": spec.eval_tokens, "min_doc_tokens": spec.min_doc_tokens})


# One tokenised piece of a text: (content hash, token ids, followed by EOS when the piece ends its text,
# index of its text in the corpus)
Piece = tuple[bytes, np.ndarray, int]


def tokenized_corpus(spec: DataSpec, sources: list[Source], tokenizer, fingerprint: str, root: Path) -> list[Piece]:
    """Every piece of the corpus, tokenised once per corpus and tokenizer and cached in `root/tokens-<key>`:
    every sequence length and document filter of a run packs from the same tokens."""
    target = root / f"tokens-{_digest(_corpus_payload(spec, sources, fingerprint))}"
    if not (target / "offsets.npy").is_file():
        log.info("tokenising %s with %s", _names(sources), tokenizer.name_or_path)
        pieces = tokenize_documents(_pieces(sources, spec.text_field), tokenizer, spec.max_tokens)
        hashes, token_ids, texts = zip(*pieces) if pieces else ((), (), ())
        lengths = np.asarray([len(ids) for ids in token_ids], dtype=np.int64)
        with atomic_directory(target, overwrite=True) as tmp:
            np.save(tmp / "tokens.npy", np.concatenate(token_ids) if pieces else np.zeros(0, np.uint32))
            np.save(tmp / "hashes.npy", np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, 16))
            np.save(tmp / "texts.npy", np.asarray(texts, dtype=np.int64))
            np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    tokens = np.load(target / "tokens.npy", mmap_mode="r")
    hashes, texts, offsets = (np.load(target / f"{name}.npy") for name in ("hashes", "texts", "offsets"))
    return [(hashes[i].tobytes(), tokens[offsets[i]:offsets[i + 1]], int(texts[i])) for i in range(len(texts))]


def _pieces(sources: list[Source], text_field: str) -> Iterator[tuple[str, int, bool]]:
    """(piece, index of its text, whether it is the text's last piece) for every text of `sources`, in order:
    a text file is cut into pieces of at most DOC_CHARS characters, a row only beyond ROW_CHARS."""
    index = 0
    for source in sources:
        if source.kind == "file":
            path = Path(source.name)
            limit = DOC_CHARS if _base_suffix(path)[0] in TEXT_SUFFIXES else ROW_CHARS
            texts = read_file(path, text_field)
        else:
            texts, limit = read_hf(source, text_field), ROW_CHARS
        for text in texts:
            parts = list(split_long(text, limit))
            for i, part in enumerate(parts):
                yield part, index, i == len(parts) - 1
            index += 1


def tokenize_documents(
    pieces: Iterator[tuple[str, int, bool]], tokenizer, max_tokens: int | None, batch_docs: int = 256
) -> list[Piece]:
    """Each piece's hash, token ids (+ EOS after a text's last piece) and text index, until `max_tokens`."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"the teacher's tokenizer ({tokenizer.name_or_path}) has no EOS token to separate documents")
    dtype = np.uint32
    out: list[Piece] = []
    total = 0
    bar = tqdm(desc="tokenising", unit="tok", unit_scale=True, total=max_tokens, leave=False)
    batch: list[tuple[str, int, bool]] = []

    def flush() -> None:
        nonlocal total
        ids = tokenizer([text for text, _, _ in batch], add_special_tokens=False, verbose=False)["input_ids"]
        for (text, index, last), piece in zip(batch, ids):
            if max_tokens is not None and total >= max_tokens:
                break  # the rest of the batch is not needed
            piece = piece + [eos] if last else piece
            out.append((hashlib.blake2b(text.encode(), digest_size=16).digest(), np.asarray(piece, dtype=dtype), index))
            total += len(piece)
            bar.update(len(piece))
        batch.clear()

    for item in pieces:
        batch.append(item)
        if len(batch) == batch_docs:
            flush()
            if max_tokens is not None and total >= max_tokens:
                break
    if batch:
        flush()
    bar.close()
    return out


def pack(docs: list[np.ndarray], seq_len: int) -> np.ndarray:
    """Concatenate pieces (a text's last one ends in EOS) and cut into [n, seq_len] blocks."""
    if not docs:
        return np.zeros((0, seq_len), dtype=np.uint32)
    stream = np.concatenate(docs)
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def text_lengths(pieces: list[Piece]) -> dict[int, int]:
    """Tokens of each text, over all its pieces."""
    lengths: dict[int, int] = {}
    for _, ids, text in pieces:
        lengths[text] = lengths.get(text, 0) + len(ids)
    return lengths


def split_and_pack(
    pieces: list[Piece], seq_len: int, eval_tokens: int, min_doc_tokens: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the pieces with the smallest content hashes until they hold `eval_tokens` tokens; pack the
    others of texts that hold at least `min_doc_tokens` tokens into training blocks."""
    order = sorted(range(len(pieces)), key=lambda i: pieces[i][0])
    held_out: set[int] = set()
    tokens = 0
    for i in order:
        if tokens >= eval_tokens:
            break
        held_out.add(i)
        tokens += len(pieces[i][1])
    eval_ = pack([pieces[i][1] for i in sorted(held_out)], seq_len)[: max(eval_tokens // seq_len, 1)]
    lengths = text_lengths(pieces)
    kept = [ids for i, (_, ids, text) in enumerate(pieces) if i not in held_out and lengths[text] >= min_doc_tokens]
    return pack(kept, seq_len), eval_


# ---------------------------------------------------------------------------------------------
# The packed dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class PackedData:
    """Train and held-out blocks of token ids [n, seq_len] (memory-mapped), plus where they came from."""

    train: np.ndarray
    eval: np.ndarray
    meta: dict
    path: Path

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def train_batch(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.train[indices].astype(np.int64))

    def eval_batches(self, batch_size: int, max_blocks: int | None = None) -> Iterator[torch.Tensor]:
        blocks = self.eval[:max_blocks] if max_blocks else self.eval
        for start in range(0, len(blocks), batch_size):
            yield torch.from_numpy(blocks[start : start + batch_size].astype(np.int64))


def data_cache_root() -> Path:
    from distill.model.teacher import cache_root

    return cache_root() / "data"


def prepare_data(spec: DataSpec, tokenizer, cache_dir: Path | None = None) -> PackedData:
    """Tokenise and pack `spec` with `tokenizer` (or load the cached result); checks everything first."""
    if spec.seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {spec.seq_len}")
    if spec.eval_tokens < spec.seq_len:
        raise UserError(f"eval_tokens ({spec.eval_tokens}) must be at least one block of seq_len {spec.seq_len}")
    if spec.min_doc_tokens < 0:
        raise UserError(f"min_doc_tokens must be 0 (every document) or more, got {spec.min_doc_tokens}")
    sources = resolve_sources(tuple(spec.sources))
    fingerprint = tokenizer_fingerprint(tokenizer)
    if sources[0].kind == "prepared":
        return load_prepared(Path(sources[0].name), tokenizer, spec)

    target = (cache_dir or data_cache_root()) / cache_key(spec, sources, fingerprint)
    if (target / META_FILE).is_file():
        return load_prepared(target, tokenizer, spec)

    names = _names(sources)
    pieces = tokenized_corpus(spec, sources, tokenizer, fingerprint, cache_dir or data_cache_root())
    lengths = text_lengths(pieces)
    total = sum(lengths.values())
    eval_blocks = spec.eval_tokens // spec.seq_len
    need = (eval_blocks + 1) * spec.seq_len
    if total < need:
        raise UserError(
            f"--data {names}: {len(lengths)} documents, {total} tokens after tokenisation; need at least "
            f"{need} ({eval_blocks} held-out blocks + 1 training block of {spec.seq_len} tokens)"
        )
    train, eval_ = split_and_pack(pieces, spec.seq_len, spec.eval_tokens, spec.min_doc_tokens)
    if len(train) == 0 or len(eval_) < eval_blocks:
        longest = max(lengths.values())
        only_long = (f" from documents of at least {spec.min_doc_tokens} tokens (min_doc_tokens; the longest has "
                     f"{longest})" if spec.min_doc_tokens else "")
        raise UserError(
            f"--data {names}: {total} tokens in {len(lengths)} documents give {len(train)} training blocks"
            f"{only_long} and {len(eval_)} held-out blocks of {spec.seq_len} tokens; need at least 1 and "
            f"{eval_blocks} (add more text, or lower the sequence length, the held-out size or min_doc_tokens)"
        )
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": tokenizer.name_or_path, "fingerprint": fingerprint, "vocab_size": len(tokenizer)},
        "sources": [asdict(s) for s in sources],
        "documents": len(lengths),  # texts: a file of a text format, or a row
        "pieces": len(pieces),
        "tokens": total,
        "seq_len": spec.seq_len,
        "min_doc_tokens": spec.min_doc_tokens,
        "train_blocks": int(len(train)),
        "eval_blocks": int(len(eval_)),
    }
    with atomic_directory(target, overwrite=True) as tmp:
        np.save(tmp / "train.npy", train)
        np.save(tmp / "eval.npy", eval_)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return load_prepared(target, tokenizer, spec)


def load_prepared(path: Path, tokenizer, spec: DataSpec | None = None) -> PackedData:
    meta = json.loads((path / META_FILE).read_text())
    fingerprint = tokenizer_fingerprint(tokenizer)
    if meta["tokenizer"]["fingerprint"] != fingerprint:
        raise UserError(
            f"data {path} was tokenised with tokenizer {meta['tokenizer']['name']!r} "
            f"(fingerprint {meta['tokenizer']['fingerprint']}), but the teacher's tokenizer is "
            f"{tokenizer.name_or_path!r} ({fingerprint}); pass the raw text so it is tokenised for this teacher"
        )
    if spec is not None and meta["seq_len"] != spec.seq_len:
        raise UserError(f"data {path} is packed in blocks of {meta['seq_len']} tokens, but seq_len {spec.seq_len} was asked for")
    packed_from = meta.get("min_doc_tokens", 0)
    if spec is not None and packed_from != spec.min_doc_tokens:
        raise UserError(f"data {path} packs training blocks from documents of at least {packed_from} tokens, but "
                        f"min_doc_tokens {spec.min_doc_tokens} was asked for; pass the raw text instead")
    train = np.load(path / "train.npy", mmap_mode="r")
    eval_ = np.load(path / "eval.npy", mmap_mode="r")
    for name, arr in (("train", train), ("eval", eval_)):
        if len(arr) and int(arr.max()) >= len(tokenizer):
            raise UserError(f"data {path} ({name}) holds token id {int(arr.max())} >= the teacher's vocabulary size {len(tokenizer)}")
    return PackedData(train=train, eval=eval_, meta=meta, path=path)


# ---------------------------------------------------------------------------------------------
# Batch order: a pure function of (seed, step), so a resumed run reads exactly what it would have
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockOrder:
    """Global sequence i of a run is block perm_{epoch}[i mod n]; each epoch has its own permutation.
    `first` sequences were taken by an earlier run (a Stage 2 that goes on): this run's sequence i is the
    order's sequence first + i, so it reads what one longer run would have read next."""

    num_blocks: int
    seed: int
    first: int = 0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def indices(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            epoch, pos = divmod(self.first + start + j, self.num_blocks)
            out[j] = self._perm(epoch)[pos]
        return out

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache.clear()
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
        return self._cache[epoch]


def batch_for_step(data: PackedData, order: BlockOrder, step: int, micro: int, micro_batch: int, grad_accum: int,
                   rank: int = 0, world: int = 1, copies: CopySpans | None = None) -> torch.Tensor:
    """The micro-batch `micro` of optimiser step `step` on process `rank`: [micro_batch, seq_len]."""
    global_batch = micro_batch * grad_accum * world
    start = step * global_batch + (micro * world + rank) * micro_batch
    ids = data.train_batch(order.indices(start, micro_batch))
    if copies is None or not copies.per_sequence:
        return ids
    return copy_spans(ids, order.first + start + np.arange(micro_batch), copies, order.seed)


# ---------------------------------------------------------------------------------------------
# Long-range copies written into training sequences
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CopySpans:
    """`per_sequence` spans of `tokens` tokens, each copied from a random place of a training sequence to a random
    place at least `min_distance` tokens further on (`--set stage2.copies.per_sequence=4`; 0: off).

    Packed text rarely repeats itself thousands of tokens apart, so the KL target seldom asks a hybrid to find
    something that far back, and a passkey 3,000 tokens back is what the hybrids miss. The teacher reads the same
    sequence: at a copy's tokens it predicts from the earlier occurrence, which the student must then find too."""

    per_sequence: int = 0
    tokens: int = 32
    min_distance: int = 1024  # from the end of the source to the start of the copy

    def check(self, seq_len: int, name: str) -> None:
        if self.per_sequence < 0 or self.tokens < 1 or self.min_distance < 0:
            raise UserError(f"{name}.copies: per_sequence must be 0 or more, tokens 1 or more and min_distance 0 or "
                            f"more, got {self.per_sequence}, {self.tokens}, {self.min_distance}")
        if self.per_sequence and 2 * self.tokens + self.min_distance > seq_len:
            raise UserError(f"{name}.copies: two spans of {self.tokens} tokens {self.min_distance} apart do not fit in "
                            f"a sequence of {seq_len} (seq_len); lower {name}.copies.min_distance or tokens")


COPY_STREAM = 0xC0  # keeps the copies' random numbers apart from the block order's, which share the seed


def copy_spans(ids: torch.Tensor, sequences: np.ndarray, copies: CopySpans, seed: int) -> torch.Tensor:
    """ids [b, T] with `copies` written into each row. Row j's copies are a function of (seed, sequences[j]), its
    index in the run's data order, so a resumed or continued run writes the same ones."""
    out = ids.clone()
    T = ids.shape[1]
    last_source = T - 2 * copies.tokens - copies.min_distance
    for row, sequence in enumerate(sequences):
        rng = np.random.default_rng([seed, COPY_STREAM, int(sequence)])
        for _ in range(copies.per_sequence):
            src = int(rng.integers(0, last_source + 1))
            dst = int(rng.integers(src + copies.tokens + copies.min_distance, T - copies.tokens + 1))
            out[row, dst : dst + copies.tokens] = out[row, src : src + copies.tokens]
    return out
