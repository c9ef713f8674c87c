"""Pre-training text is plain text: a chat marker string in a document ("<|assistant|>",
"<|end|>", ...: a web page or source file about chat templates) is encoded as ordinary
pieces, exactly as `Tokenizer.encode_plain` encodes it, never as a marker id, on every path
that encodes documents (the bulk encoder's segment cache and both of its fallbacks, the
prepare / stream stage, prepared shards, the tokenizer's training sample, bits per byte on a
corpus). Text without markers encodes exactly as before, and datasets prepared before are
prepared again, not reused. Eval task text stays markup: an item may be a rendered chat."""

from __future__ import annotations

import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.config import load_config
from raylm.corpus import write_builtin_corpus
from raylm.data import TokenizeDocuments, corpus_files, dataset_key, prepare
from raylm.tokenizer import END, ROLE_TOKENS, SegmentCache, train_tokenizer

MARKERS = (*ROLE_TOKENS.values(), END)

# Each marker string alone, in words, mid-word, at both ends, back to back, nested in near
# misses, next to spaces and line breaks, and as a chat template written in code.
MARKED = [
    *MARKERS,
    *(f"see {m} here" for m in MARKERS),
    *(f"x{m}y" for m in MARKERS),
    *(f"{m} starts and ends {m}" for m in MARKERS),
    "<|end|><|user|><|assistant|><|system|>",
    "a<|end<|end|>b|>",
    "<|<|assistant|>|>",
    "  <|user|>  \n\t<|end|>\n\n",
    "<|end|\n<|",
    'def render(m):\n    return "<|" + m["role"] + "|>\\n" + m["content"] + "<|end|>\\n"\n',
    'TEMPLATE = "<|system|>\\n{s}<|end|>\\n<|user|>\\n{u}<|end|>\\n<|assistant|>\\n"  # chat format',
    "<|eos|> and <|bos|> are control tokens, never read from text",
]

# Marker-free text: prose, code, whitespace runs, "▁", digits, bytes outside the vocabulary,
# and "<|" and "|>" on their own (no marker, so no cut).
PLAIN = [
    "The quick brown fox jumps over the lazy dog. It's 3:14 p.m., isn't it?",
    "def f(x, y):\n    if x:\n\treturn  x   +  y  # two  spaces\n\n\n    return None\n",
    "   leading spaces and trailing ones   ",
    "naïve café — “quotes” 🎉 日本語のテキスト",
    "a <| b |> c <|| d <|unknown|> e",
    "\u2581 x\u2581 \u2581\u2581y",
    "",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    paths = write_builtin_corpus(str(tmp_path_factory.mktemp("corpus") / "c"), min_bytes=600_000)
    texts = (json.loads(line)["text"] for p in paths for line in open(p, encoding="utf-8"))
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tokenizer"), 1000, source="builtin")


def _marker_ids(tok) -> set[int]:
    return {tok.special_ids[m] for m in MARKERS}


def _docs(ids, offsets) -> list[list[int]]:
    return [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def _random_texts(seed: int, n: int, parts: list[str]) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(parts) for _ in range(rng.randint(0, 30))) for _ in range(n)]


_PARTS = ["the", " ", "  ", "\n", "\n    ", ".", "x", "(", "42", "é", "日本", "<|", "|>", "\u2581", "ab cd"]
_MARKED_PARTS = [*_PARTS, *MARKERS, *MARKERS]


def test_the_reference_encode_plain_gives_no_marker_id(tok):
    for text in MARKED:
        ids = tok.encode_plain(text)
        assert not _marker_ids(tok) & set(ids), text
        assert tok.decode(ids) == text
    assert _marker_ids(tok) & set(tok.encode(MARKED[-3]))  # markup: what documents were encoded as


# --------------------------------------------------------------------------- the bulk encoder


def _check_plain(tok, cache: SegmentCache, texts: list[str]) -> None:
    ids, offsets = cache.encode(pa.array(texts))
    assert not _marker_ids(tok) & set(ids.tolist())
    assert _docs(ids, offsets) == [tok.encode_plain(t) for t in texts]


def test_segment_cache_encodes_documents_as_plain_text(tok):
    cache = SegmentCache(tok._sp)
    assert cache.split == "space-runs"
    texts = MARKED + PLAIN + _random_texts(0, 1000, _MARKED_PARTS)
    for _ in range(2):  # cold, then served from the cache
        _check_plain(tok, cache, texts)
    # A cached segment holding a marker string (" <|end|>") holds the ids of its text.
    marked = [seg for seg in cache.slot if any(m in seg for m in MARKERS)]
    assert marked
    for seg in cache.slot:
        row = cache.slot[seg]
        assert cache.ids[cache.bounds[row]:cache.bounds[row + 1]].tolist() == tok.encode_plain(seg)
    # The same segments (" see", " <|end|>") arrive in other batches, alone and among plain text.
    for text in MARKED:
        _check_plain(tok, cache, [text])
        _check_plain(tok, cache, ["plain words", text, "more words"])


def test_segment_cache_with_spaces_before_every_segment(tmp_path):
    prose = [" ".join(random.Random(i).choice(["alpha", "beta", "gamma", "x.", "Yes,"]) for _ in range(200))
             for i in range(300)]
    small = train_tokenizer(prose, str(tmp_path / "t"), 300)
    cache = SegmentCache(small._sp)
    assert cache.split == "every-space"
    for _ in range(2):
        _check_plain(small, cache, MARKED + _random_texts(1, 300, _MARKED_PARTS))


def test_segments_too_long_to_cache_are_plain_too(tok):
    cache = SegmentCache(tok._sp, max_chars=8)
    _check_plain(tok, cache, [f"{m * 3}abc{m}" for m in MARKERS] + MARKED)
    assert all(len(k) <= 8 for k in cache.slot)


def test_the_nul_fallback_encodes_documents_as_plain_text(tok):
    cache = SegmentCache(tok._sp)
    texts = ["a\x00b <|end|> c", *MARKED, *PLAIN]
    _check_plain(tok, cache, texts)
    assert not cache.slot  # whole documents went to SentencePiece


def test_the_whole_document_fallback_encodes_documents_as_plain_text(tok):
    cache = SegmentCache(tok._sp)
    cache.split = None  # a model the cut rule does not cover
    _check_plain(tok, cache, MARKED + PLAIN + _random_texts(2, 200, _MARKED_PARTS))
    assert not cache.slot


def test_null_and_empty_documents(tok):
    cache = SegmentCache(tok._sp)
    for split in (cache.split, None):
        cache.split = split
        ids, offsets = cache.encode(pa.array(["<|end|>", None, "", "x <|user|>"], pa.string()))
        assert _docs(ids, offsets) == [tok.encode_plain("<|end|>"), [], [], tok.encode_plain("x <|user|>")]


def test_text_without_markers_encodes_exactly_as_before(tok):
    """Byte-identical ids to SentencePiece's own on every path, markers or not in the batch."""
    texts = PLAIN + _random_texts(3, 1000, _PARTS)
    expected = tok._sp.encode(texts)
    assert tok.encode_batch(texts) == expected and [tok.encode_plain(t) for t in texts] == expected
    cache = SegmentCache(tok._sp)
    for _ in range(2):
        assert _docs(*cache.encode(pa.array(texts))) == expected
    # Beside a marked document in the same batch: the plain ones are untouched.
    ids, offsets = cache.encode(pa.array([*texts, MARKED[-2]]))
    assert _docs(ids, offsets)[:-1] == expected
    assert _docs(*SegmentCache(tok._sp).encode(pa.array([*texts, "\x00"])))[:-1] == expected  # NUL fallback
    whole = SegmentCache(tok._sp)
    whole.split = None
    assert _docs(*whole.encode(pa.array(texts))) == expected
    assert _docs(*tok.fork().encode_flat(texts)) == expected


def test_the_prepare_and_stream_stage_encodes_documents_as_plain_text(tok):
    stage = TokenizeDocuments(tok.fork())
    texts = MARKED + PLAIN
    out = stage(pa.table({"text": texts, "file": [0] * len(texts)}))
    assert out.column("ids").to_pylist() == [tok.encode_plain(t) for t in texts]
    assert not _marker_ids(tok) & set(out.column("ids").combine_chunks().values.to_pylist())


def test_after_a_pickle_the_encoding_is_the_same(tok):
    """Ray ships the tokenizer to its actors pickled."""
    import pickle

    again = pickle.loads(pickle.dumps(tok))
    assert _docs(*again.encode_flat(MARKED)) == [tok.encode_plain(t) for t in MARKED]


# --------------------------------------------------------------------------- prepared data


def _key_before(sources, val_sources, cfg, tokenizer_sha, seed) -> str:
    """dataset_key as it was made before documents were plain text (FORMAT_VERSION 3, no
    text encoding named); this corpus is split by document."""
    relevant = {k: getattr(cfg, k) for k in ("text_field", "seq_len", "val_fraction", "min_chars",
                                             "max_chars", "shuffle_window", "blocks_per_shard", "dedup",
                                             "near_dup_threshold", "minhash_perm", "redact_pii")}
    blob = json.dumps({"sources": [[f.uri, f.size, f.etag_or_mtime] for f in sources],
                       "val_sources": [[f.uri, f.size, f.etag_or_mtime] for f in val_sources],
                       "cfg": relevant, "tokenizer": tokenizer_sha, "seed": seed, "version": 3}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@pytest.fixture
def marked_corpus(tmp_path, tok):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    lines = []
    for i in range(200):
        words = " ".join(rng.choice(["some", "words", "here", "and", "there", "code"]) for _ in range(30))
        lines.append(json.dumps({"text": f"document {i}: {words} {MARKED[i % len(MARKED)]} {words}"}))
    (corpus / "a.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(overrides=[f"data.path={corpus}", "data.seq_len=32", "data.dedup=none",
                                 "data.val_fraction=0.1", "data.min_chars=1"]).data
    return cfg


def _shard_tokens(out: str, manifest: dict) -> list[int]:
    ids = []
    for split in ("train", "val"):
        for shard in manifest[split]["shards"]:
            ids += pq.read_table(f"{out}/{shard['path']}").column("tokens").combine_chunks().values.to_pylist()
    return ids


def test_prepared_blocks_hold_no_marker_id(tok, marked_corpus, tmp_path):
    out = str(tmp_path / "out")
    manifest = prepare(marked_corpus, tok, out, seed=0, log=lambda *_: None)
    tokens = _shard_tokens(out, manifest)
    assert len(tokens) > 1000 and not _marker_ids(tok) & set(tokens)


def test_the_data_key_changes_so_datasets_prepared_before_are_prepared_again(tok, marked_corpus, tmp_path):
    files, val_files = corpus_files(marked_corpus, None)
    before = _key_before(files, val_files, marked_corpus, tok.sha256, 0)
    assert dataset_key(files, val_files, marked_corpus, tok.sha256, 0) != before
    # A dataset prepared before (its manifest holds the key made then) is not reused.
    out = tmp_path / "out"
    manifest = prepare(marked_corpus, tok, str(out), seed=0, log=lambda *_: None)
    old = dict(manifest, key=before)
    (out / "manifest.json").write_text(json.dumps(old, indent=1))
    said: list[str] = []
    again = prepare(marked_corpus, tok, str(out), seed=0, log=said.append)
    assert not any("reusing prepared dataset" in s for s in said)
    assert again["key"] == manifest["key"] != before
    said.clear()
    prepare(marked_corpus, tok, str(out), seed=0, log=said.append)  # one prepared now is reused
    assert any("reusing prepared dataset" in s for s in said)


def test_new_cleaning_rules_change_the_data_key(tok, marked_corpus, monkeypatch):
    """Cleaning or redaction that makes other text of the same documents (data.CLEANING):
    a dataset prepared under the old rules is prepared again, not reused with what they missed."""
    from raylm import data

    files, val_files = corpus_files(marked_corpus, None)
    now = dataset_key(files, val_files, marked_corpus, tok.sha256, 0)
    monkeypatch.setattr(data, "CLEANING", data.CLEANING + 1)
    assert dataset_key(files, val_files, marked_corpus, tok.sha256, 0) != now


@pytest.mark.parametrize("encoding", [None, 1])
def test_training_on_a_dataset_prepared_before_says_so(tok, marked_corpus, tmp_path, capsys, encoding):
    """A prepared dataset passed as data.path is trained on as it is; one an older raylm
    prepared (markers in documents as marker ids; its manifest names no text encoding, or 1)
    is named in a warning with the fix, not trained on without a word."""
    from raylm.pipeline import ensure_data

    out = tmp_path / "out"
    manifest = prepare(marked_corpus, tok, str(out), seed=0, log=lambda *_: None)
    cfg = load_config(overrides=[f"data.path={out}", "data.seq_len=32"])
    ensure_data(cfg, tok)
    assert "prepared by an older raylm" not in capsys.readouterr().out
    old = {k: v for k, v in manifest.items() if k != "text_encoding"}
    (out / "manifest.json").write_text(json.dumps(old if encoding is None else dict(old, text_encoding=encoding)))
    ensure_data(cfg, tok)
    said = capsys.readouterr().out
    assert f"data: warning: {out} was prepared by an older raylm" in said and "raylm data prepare" in said


# --------------------------------------------------------------------------- tokenizer training


def test_the_tokenizer_is_trained_on_marker_strings_as_text(tmp_path):
    """The training sample is cut as documents are encoded: a corpus whose only "|" is in
    chat markers (code about chat templates) gets "|" and "<|" pieces to encode them with,
    rather than byte fallback."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "x.", "Yes,", "no"]
    docs = [f'{rng.choice(words)} <|user|>\n{" ".join(rng.choice(words) for _ in range(20))}<|end|>\n'
            f'<|assistant|>\nok<|end|>' for _ in range(300)]
    small = train_tokenizer(docs, str(tmp_path / "t"), 320)
    pieces = {small.id_to_piece(i) for i in range(small.vocab_size)}
    assert {"|", "<|"} <= pieces
    byte_pieces = [p for p in map(small.id_to_piece, small.encode_plain(END)) if p.startswith("<0x")]
    assert not byte_pieces
    assert set(SegmentCache(small._sp).encode(pa.array(docs))[0].tolist()).isdisjoint(_marker_ids(small))


# --------------------------------------------------------------------------- evaluation text


def test_bits_per_byte_scores_documents_as_plain_text(tok):
    from raylm.config import ModelConfig
    from raylm.eval.bpb import bits_per_byte
    from raylm.model import build_model

    model = build_model(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=16), seed=0)
    texts = MARKED[-3:]
    out = bits_per_byte(model, tok, texts)
    assert out["tokens_scored"] == sum(len(tok.encode_plain(t)) for t in texts)
    assert out["tokens_scored"] != sum(len(tok.encode(t)) for t in texts)


def test_eval_task_text_is_read_as_markup(tok):
    """Not pre-training text: a task item may be a rendered chat (an SFT model's prompt, its
    choices ending in <|end|>), whose markers must stay markers (tests/unit/test_eval_scorers.py)."""
    from raylm.eval.loglik import encode_pair

    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ctx, cont = encode_pair(tok, prompt, "hello" + END)
    assert ctx[1:] + cont == tok.encode(prompt + "hello" + END)
    assert {tok.special_ids[ROLE_TOKENS["user"]], tok.special_ids[ROLE_TOKENS["assistant"]]} <= set(ctx)
    assert cont[-1] == tok.special_ids[END]
