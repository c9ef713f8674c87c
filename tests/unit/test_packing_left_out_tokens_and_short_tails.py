"""Tokens in against tokens out of `prepare` (in this process, no Ray), with a tokenizer of one
token per character: every kept document's tokens and its EOS reach a block exactly once, in
corpus order across block, batch and shard edges, or are counted as left out after a split's
last full block; and a document with no tail to hold out trains whole under
data.val_split=tail."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylm.config import DataConfig
from raylm.data import prepare
from raylm.documents import parse_and_clean, stable_fraction, tail_split

EOS = 0


class CharTokenizer:
    """One token per character (its code point + 1), EOS 0: token counts are known in advance."""

    sha256, eos_id, vocab_size = "c" * 64, EOS, 0x110000

    def fork(self):
        return self

    def encode_flat(self, texts):
        texts = texts.to_pylist() if hasattr(texts, "to_pylist") else list(texts)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in texts], out=offsets[1:])
        return np.array([ord(c) + 1 for t in texts for c in t], dtype=np.int32), offsets


def _ids(text: str) -> list[int]:
    return [ord(c) + 1 for c in text] + [EOS]


def _rows(out, manifest, split) -> list[list[int]]:
    return [r for s in manifest[split]["shards"] for r in pq.read_table(out / s["path"]).column("tokens").to_pylist()]


def _prepare(tmp_path, corpus, **overrides):
    cfg = DataConfig(path=str(corpus), seq_len=15, dedup="none", redact_pii=(), shuffle_window=1,
                     blocks_per_shard=7, **overrides)
    said = []
    manifest = prepare(cfg, CharTokenizer(), str(tmp_path / "out"), seed=1, log=said.append)
    return manifest, said


def test_every_token_is_in_one_block_or_counted_as_left_out(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    docs = []
    for f in range(3):  # three files: three batches, so blocks straddle batch edges
        with open(corpus / f"f{f}.jsonl", "w") as out:
            for i in range(40):
                letters = rng.integers(0, 26, int(rng.integers(1, 60)))
                text = f"doc {f}-{i} " + "".join(chr(97 + int(x)) for x in letters)
                docs.append(text)
                out.write(json.dumps({"text": text}) + "\n")
    manifest, said = _prepare(tmp_path, corpus, val_fraction=0.2)
    want = {"train": [t for d in docs if stable_fraction(d) >= 0.2 for t in _ids(d)],
            "val": [t for d in docs if stable_fraction(d) < 0.2 for t in _ids(d)]}
    left = manifest["stats"]["partial_block_tokens"]
    for split in ("train", "val"):
        got = [t for row in _rows(tmp_path / "out", manifest, split) for t in row]
        assert len(manifest[split]["shards"]) > 1  # shard edges crossed too
        assert got + want[split][len(got):] == want[split]  # in corpus order, none lost or repeated
        assert left[split] == len(want[split]) - len(got) < 16 and left[split] > 0
    card = (tmp_path / "out" / "DATACARD.md").read_text()
    assert (f"Left out: the {left['train']} training and {left['val']} validation tokens (EOS included) after "
            f"each split's last full block, too few to fill one.") in card
    assert f"({left['train']} + {left['val']} tokens past the last full blocks left out)" in said[-1]


@pytest.mark.parametrize("text, redact", [("x", ()), ("jane.doe@example.com", ("email",))])
def test_a_document_with_no_tail_to_hold_out_trains_whole(text, redact):
    assert tail_split(text if not redact else "<EMAIL>", 0.1)[1] == ""
    raw = json.dumps({"text": text}).encode() + b"\n" + json.dumps({"text": "word " * 20}).encode()
    out = parse_and_clean({"path": ["c/a.jsonl"], "bytes": [raw]}, DataConfig(val_fraction=0.1), redact=redact,
                          tail=True)
    assert list(out["tail"]) == [False, False, True]  # one row for it, no empty tail row
    assert list(out["val"]) == [False, False, True]
    assert out["text"][0] == ("<EMAIL>" if redact else "x")


def test_tail_split_corpus_counts_only_real_tails(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = ["\n".join(f"line {f}-{i} " + "abcdefghij" * (i % 4 + 1) for i in range(30)) for f in range(2)] + ["x"]
    for i, t in enumerate(texts):
        (corpus / f"{i}.txt").write_text(t)
    manifest, _ = _prepare(tmp_path, corpus, val_fraction=0.1)
    assert manifest["stats"]["val_documents"] == 2  # "x" has no tail
    heads, tails = zip(*[tail_split(t, 0.1) if len(t) > 1 else (t, "") for t in texts])
    for split, parts in (("train", heads), ("val", tails)):
        want = [t for p in parts if p for t in _ids(p)]
        got = [t for row in _rows(tmp_path / "out", manifest, split) for t in row]
        assert got + want[len(got):] == want
        assert manifest["stats"]["partial_block_tokens"][split] == len(want) - len(got)
