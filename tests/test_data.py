"""Data: reading every supported source, packing with EOS, the held-out split, the cache, clear errors."""

from __future__ import annotations

import gzip
import json
import lzma
import sys

import numpy as np
import pytest
import torch

from distill.data import (
    BlockOrder,
    CopySpans,
    DataSpec,
    batch_for_step,
    copy_spans,
    demo_files,
    prepare_data,
    resolve_sources,
    split_long,
    tokenizer_fingerprint,
)
from distill.errors import UserError
from tests.tiny_models import make_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def random_docs(n: int, seed: int, words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"doc{seed}-{i} " + " ".join(rng.choice(WORDS, size=words)) for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def spec(*sources, seq_len=32, eval_tokens=64, **kw) -> DataSpec:
    return DataSpec(tuple(str(s) for s in sources), seq_len, eval_tokens, **kw)


def test_packing_puts_eos_between_documents_and_cuts_full_blocks(tmp_path, tok, cache):
    docs = random_docs(30, seed=1)
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = prepare_data(spec(path), tok, cache)

    eos = tok.eos_token_id
    expected_total = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert data.meta["tokens"] == expected_total
    assert data.meta["documents"] == 30
    assert data.train.shape[1] == data.eval.shape[1] == 32
    assert data.eval.shape[0] == 2  # eval_tokens // seq_len
    # every block is a window of the document stream: decoding its EOS-separated pieces gives document text
    train_stream = np.asarray(data.train).reshape(-1)
    assert (train_stream == eos).sum() >= 20
    pieces = tok.decode(train_stream.tolist()).split(tok.eos_token)
    assert all(p in docs or any(d.startswith(p) or d.endswith(p) for d in docs) for p in pieces[1:-1] if p)
    # no document is both held out and trained on
    held = {p for p in tok.decode(np.asarray(data.eval).reshape(-1).tolist()).split(tok.eos_token) if len(p) > 20}
    trained = set(pieces[1:-1])
    assert held and not held & trained


def test_held_out_documents_do_not_depend_on_file_order_or_seq_len(tmp_path, tok, cache):
    docs = random_docs(40, seed=2)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    b.write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))

    def held_docs(data):
        text = tok.decode(np.asarray(data.eval).reshape(-1).tolist())
        return {d for d in docs if d[:25] in text}  # held-out blocks may end inside a document

    d1 = prepare_data(spec(a, seq_len=32, eval_tokens=128), tok, cache)
    d2 = prepare_data(spec(b, seq_len=32, eval_tokens=128), tok, cache)
    d3 = prepare_data(spec(a, seq_len=64, eval_tokens=128), tok, cache)
    assert held_docs(d1) and held_docs(d1) == held_docs(d2) == held_docs(d3)


def test_min_doc_tokens_trains_on_long_documents_only_and_keeps_the_held_out_text(tmp_path, tok, cache):
    """Random documents of 10 to 120 words: with min_doc_tokens the training blocks hold only the long ones, the
    held-out blocks are unchanged, and the filtered data is a cache entry of its own."""
    rng = np.random.default_rng(7)
    docs = [f"doc{i} " + " ".join(rng.choice(WORDS, size=int(n))) for i, n in enumerate(rng.integers(10, 120, 60))]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    length = {d: len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs}
    threshold = int(np.median(list(length.values())))

    def trained_docs(data):
        text = tok.decode(np.asarray(data.train).reshape(-1).tolist())
        return {d for d in docs if d.split(" ", 1)[0] + " " in text}  # each document starts with its own tag

    every = prepare_data(spec(path, eval_tokens=128), tok, cache)
    long_only = prepare_data(spec(path, eval_tokens=128, min_doc_tokens=threshold), tok, cache)

    assert np.array_equal(np.asarray(every.eval), np.asarray(long_only.eval))
    assert long_only.path != every.path and long_only.meta["min_doc_tokens"] == threshold
    short = {d for d in docs if length[d] < threshold}
    assert short & trained_docs(every)
    assert trained_docs(long_only) and not short & trained_docs(long_only)
    assert len(long_only.train) < len(every.train)

    with pytest.raises(UserError, match="min_doc_tokens.*the longest has"):
        prepare_data(spec(path, eval_tokens=128, min_doc_tokens=max(length.values()) + 1), tok, cache)
    with pytest.raises(UserError, match="min_doc_tokens 5 was asked for"):
        prepare_data(spec(long_only.path, eval_tokens=128, min_doc_tokens=5), tok, cache)


def test_every_local_format_and_folders(tmp_path, tok, cache):
    docs = random_docs(12, seed=3)
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(docs[:3]))
    (folder / "b.md").write_text("# Title\n\n" + "\n\n".join(docs[3:6]))
    with gzip.open(folder / "sub" / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs[6:9])
    with lzma.open(folder / "sub" / "d.txt.xz", "wt") as f:
        f.write("\n\n".join(docs[9:]))
    (folder / "ignored.csv").write_text("x,y\n")
    sources = resolve_sources((str(folder),))
    assert [s.name.rsplit("/", 1)[-1] for s in sources] == ["a.txt", "b.md", "c.jsonl.gz", "d.txt.xz"]
    data = prepare_data(spec(folder, text_field="body"), tok, cache)
    text = tok.decode(np.concatenate([np.asarray(data.train).reshape(-1), np.asarray(data.eval).reshape(-1)]).tolist())
    found = sum(d[:40] in text for d in docs)
    assert found >= 10  # the packed stream drops at most a partial block's worth of text


def test_parquet(tmp_path, tok, cache):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    docs = random_docs(20, seed=4)
    pq.write_table(pa.table({"text": docs, "n": list(range(20))}), tmp_path / "x.parquet")
    data = prepare_data(spec(tmp_path / "x.parquet"), tok, cache)
    assert data.meta["documents"] == 20
    with pytest.raises(UserError, match="no column 'content'"):
        prepare_data(spec(tmp_path / "x.parquet", text_field="content"), tok, cache)


def test_cache_is_reused_and_keyed_by_tokenizer(tmp_path, tok, cache, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(random_docs(30, seed=5)))
    first = prepare_data(spec(path), tok, cache)
    import distill.data as data_module

    def boom(*a, **k):
        raise AssertionError("re-tokenised although the cache holds this data")

    monkeypatch.setattr(data_module, "tokenize_documents", boom)
    again = prepare_data(spec(path), tok, cache)
    assert again.path == first.path and np.array_equal(again.train, first.train)
    # another sequence length or document filter packs the tokens already cached, and packs them as a fresh run would
    longer = prepare_data(spec(path, seq_len=64), tok, cache)
    filtered = prepare_data(spec(path, seq_len=64, min_doc_tokens=40), tok, cache)
    monkeypatch.undo()
    for packed in (longer, filtered):
        fresh = prepare_data(spec(path, seq_len=64, min_doc_tokens=packed.meta["min_doc_tokens"]), tok,
                             tmp_path / f"fresh{packed.meta['min_doc_tokens']}")
        assert np.array_equal(packed.train, fresh.train) and np.array_equal(packed.eval, fresh.eval)
    monkeypatch.setattr(data_module, "tokenize_documents", boom)
    other_tok = make_tokenizer(vocab_size=320)
    assert tokenizer_fingerprint(other_tok) != tokenizer_fingerprint(tok)
    monkeypatch.undo()
    other = prepare_data(spec(path), other_tok, cache)
    assert other.path != first.path


def test_data_tokenised_for_another_tokenizer_is_refused(tmp_path, tok, cache):
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(random_docs(30, seed=6)))
    prepared = prepare_data(spec(path), tok, cache)
    with pytest.raises(UserError, match="tokenised with tokenizer .* but the teacher's tokenizer"):
        prepare_data(spec(prepared.path), make_tokenizer(vocab_size=320), cache)
    rows = tmp_path / "ids.jsonl"
    rows.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    with pytest.raises(UserError, match="token ids cannot be used"):
        prepare_data(spec(rows), tok, cache)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "no such file or folder"),
        ("empty.txt", "", "need at least"),
        ("emptydir/", None, "holds no text files"),
        ("x.csv", "a,b", "unsupported type"),
        ("bad.jsonl", '{"text": "ok"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
        ("t.jsonl", '{"title": "x"}\n', "expected a JSON object with a 'text' field"),
        ("short.txt", "just a few words", "need at least"),
    ],
)
def test_bad_data_gives_a_clear_error(tmp_path, tok, cache, name, content, message):
    path = tmp_path / name
    if name.endswith("/"):
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        prepare_data(spec(path), tok, cache)


def test_hugging_face_name_without_datasets_is_a_clear_error(tok, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError, match="needs the `datasets` package"):
        prepare_data(spec("someorg/somecorpus"), tok, cache)
    assert resolve_sources(("hf:org/name:cfg@validation",))[0].split == "validation"


def test_demo_corpus_ships_with_the_package(tok, cache):
    assert {p.name for p in demo_files()} == {"bible_web.txt.gz", "devil.txt.gz", "shakespeare.txt.gz"}
    data = prepare_data(spec("demo", seq_len=128, eval_tokens=512), tok, cache)
    assert data.meta["tokens"] > 100_000 and len(data.eval) == 4


def test_a_long_text_reaches_training_as_one_run_of_tokens(tmp_path, tok, cache):
    """A jsonl row of 3x DOC_CHARS is one piece; the same text as a .txt file is cut into pieces of at most
    DOC_CHARS (so the held-out split can take one), but only its last piece ends in EOS, and min_doc_tokens
    measures the whole text, not a piece."""
    from distill.data import DOC_CHARS

    rng = np.random.default_rng(11)
    paragraphs, length = [], 0
    while length < 3 * DOC_CHARS:
        paragraphs.append(" ".join(rng.choice(WORDS, size=40)))
        length += len(paragraphs[-1]) + 2
    long_text = "\n\n".join(paragraphs)
    rows = tmp_path / "long.jsonl"
    rows.write_text(json.dumps({"text": long_text}) + "\n" + "".join(json.dumps({"text": d}) + "\n"
                                                                       for d in random_docs(40, seed=12)))
    text_file = tmp_path / "long.txt"
    text_file.write_text(long_text)
    as_row = prepare_data(spec(rows, eval_tokens=64), tok, cache)
    as_text = prepare_data(spec(text_file, eval_tokens=64), tok, cache)
    assert as_row.meta["documents"] == as_row.meta["pieces"] == 41
    assert as_text.meta["documents"] == 1 and as_text.meta["pieces"] >= 3
    eos = tok.eos_token_id
    assert int((np.asarray(as_text.train) == eos).sum()) <= 1  # at most the text's own end: no EOS between pieces

    longer_than_a_piece = as_text.meta["tokens"] // 2
    whole = prepare_data(spec(text_file, eval_tokens=64, min_doc_tokens=longer_than_a_piece), tok, cache)
    assert np.array_equal(whole.train, as_text.train)


def test_split_long_cuts_at_paragraphs():
    text = "\n\n".join("x" * 30 for _ in range(10))
    pieces = list(split_long(text, limit=100))
    assert all(len(p) <= 100 for p in pieces) and len(pieces) == 4  # 3 + 3 + 3 + 1 paragraphs
    assert [q for p in pieces for q in p.split("\n\n")] == ["x" * 30] * 10  # no paragraph is cut


def test_block_order_is_a_function_of_the_step(tmp_path, tok, cache):
    order = BlockOrder(num_blocks=10, seed=3)
    first_epoch = order.indices(0, 10)
    assert sorted(first_epoch) == list(range(10))
    assert not np.array_equal(order.indices(10, 10), first_epoch)  # a new permutation each epoch
    assert np.array_equal(BlockOrder(10, 3).indices(7, 6), np.concatenate([first_epoch[7:], order.indices(10, 3)]))

    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(random_docs(40, seed=7)))
    data = prepare_data(spec(path), tok, cache)
    order = BlockOrder(len(data.train), seed=0)
    # 2 processes x 1 micro-batch read the same blocks as 1 process x 2 micro-batches
    two_procs = torch.cat([batch_for_step(data, order, 3, 0, 2, 1, rank=r, world=2) for r in range(2)])
    one_proc = torch.cat([batch_for_step(data, order, 3, m, 2, 2) for m in range(2)])
    assert torch.equal(two_procs, one_proc)


def test_copy_spans_repeat_earlier_tokens_far_back_and_depend_only_on_the_sequence_index():
    """Rows of distinct token ids: every token a copy changed is found earlier in the original row at least
    tokens + min_distance back; a row's copies follow its index in the data order, not its batch."""
    copies = CopySpans(per_sequence=3, tokens=8, min_distance=40)
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(10_000, generator=gen)[:128] for _ in range(4)])
    before = ids.clone()
    out = copy_spans(ids, np.array([10, 11, 12, 13]), copies, seed=5)
    for row in range(4):
        changed = (out[row] != ids[row]).nonzero().flatten().tolist()
        assert 0 < len(changed) <= copies.per_sequence * copies.tokens
        first_seen = {int(v): i for i, v in enumerate(ids[row])}
        assert all(p - first_seen[int(out[row, p])] >= copies.tokens + copies.min_distance for p in changed)
    assert torch.equal(copy_spans(ids[2:3], np.array([12]), copies, seed=5)[0], out[2])
    assert not torch.equal(copy_spans(ids[2:3], np.array([14]), copies, seed=5)[0], out[2])
    assert not torch.equal(copy_spans(ids[2:3], np.array([12]), copies, seed=6)[0], out[2])
    assert torch.equal(ids, before)  # the input is left as it was


def test_batches_with_copies_follow_the_data_order(tmp_path, tok, cache):
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(random_docs(40, seed=7)))
    data = prepare_data(spec(path), tok, cache)
    copies = CopySpans(per_sequence=2, tokens=4, min_distance=16)
    plain = batch_for_step(data, BlockOrder(len(data.train), 0), 2, 1, 2, 2)
    assert torch.equal(batch_for_step(data, BlockOrder(len(data.train), 0), 2, 1, 2, 2, copies=CopySpans()), plain)
    copied = batch_for_step(data, BlockOrder(len(data.train), 0), 2, 1, 2, 2, copies=copies)
    assert copied.shape == plain.shape and not torch.equal(copied, plain)
    # a run that goes on after 10 sequences (hybrid distill --from) reads what one longer run read, copies included
    later = batch_for_step(data, BlockOrder(len(data.train), 0, first=10), 0, 0, 2, 1, copies=copies)
    assert torch.equal(later, batch_for_step(data, BlockOrder(len(data.train), 0), 5, 0, 2, 1, copies=copies))


def test_copy_settings_are_checked_against_the_sequence_length():
    CopySpans(per_sequence=1, tokens=32, min_distance=1024).check(1088, "stage2")
    with pytest.raises(UserError, match="do not fit in a sequence of 1087.*stage2.copies.min_distance"):
        CopySpans(per_sequence=1, tokens=32, min_distance=1024).check(1087, "stage2")
    CopySpans(per_sequence=0, tokens=32, min_distance=1024).check(64, "stage2")  # off: nothing to fit
    with pytest.raises(UserError, match="score.candidate.copies: per_sequence must be 0 or more"):
        CopySpans(per_sequence=-1).check(4096, "score.candidate")


def test_streamed_dataset_through_datasets(tmp_path, tok, cache):
    """The Hugging Face path, offline: `hf:` + a local dataset folder, read as a stream up to max_tokens."""
    pytest.importorskip("datasets")
    folder = tmp_path / "hub_like"
    folder.mkdir()
    docs = random_docs(200, seed=8)
    (folder / "train.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    data = prepare_data(spec(f"hf:{folder}@train", text_field="content", max_tokens=3000), tok, cache)
    assert 3000 <= data.meta["tokens"] < 3000 + 250  # stopped at the document that crossed max_tokens
    assert data.meta["documents"] < 200 and data.meta["sources"][0]["kind"] == "hf"
    with pytest.raises(UserError, match="expected a JSON object with a 'text' field"):
        prepare_data(spec(f"hf:{folder}"), tok, cache)
