"""Bits per byte, loss and perplexity on a corpus, read with the data stage's reader."""

import json
import math

import pytest
import torch

from raylm.config import ModelConfig
from raylm.data import DataError
from raylm.eval.bpb import corpus_bpb
from raylm.model import build_model


class ByteTok:
    """Token = byte + 1 (0 is EOS): tokens per byte is exactly 1 plus the separators."""

    eos_id = 0

    def encode(self, text):
        return [b + 1 for b in text.encode("utf-8")]

    encode_plain = encode  # what bits_per_byte encodes documents with: plain text, as pre-training does


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, max_seq_len=16), seed=0)


def nats_by_hand(model, ids: list[int], seq_len: int) -> float:
    """Summed -log p of every non-EOS target ids[t], t >= 1, one forward pass each: a target in
    the full blocks after its block's preceding tokens (block k: inputs k*seq_len..), a tail
    target after the last seq_len inputs."""
    n = len(ids) - 1
    full = n // seq_len * seq_len
    total = 0.0
    with torch.no_grad():
        for t in range(1, n + 1):
            if ids[t] == 0:
                continue
            start = (t - 1) // seq_len * seq_len if t <= full else max(0, n - seq_len)
            logits, _ = model(torch.tensor([ids[start:t]]))
            total -= float(torch.log_softmax(logits[0, -1].double(), -1)[ids[t]])
    return total


def test_corpus_bpb_is_summed_nats_over_the_documents_bytes(model, tmp_path, one_thread):
    """lm-eval's bits_per_byte: every document token scored once (the first after EOS, the tail
    that does not fill a block too), EOS separators not scored, over the documents' bytes."""
    docs = ["hello world, " * 6, "naïve café " * 4]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    r = corpus_bpb(model, ByteTok(), str(tmp_path / "*.jsonl"), text_field="body", seq_len=16)
    ids = [0] + ByteTok().encode(docs[0]) + [0] + ByteTok().encode(docs[1])  # each document after EOS
    assert (len(ids) - 1) % 16 != 0  # a tail shorter than a block
    n_bytes = sum(len(d.encode()) for d in docs)
    nats = nats_by_hand(model, ids, 16)
    assert r["bytes"] == n_bytes and r["tokens_scored"] == n_bytes  # one token per byte: every byte scored
    assert r["bpb"] == pytest.approx(nats / n_bytes / math.log(2), rel=1e-6)
    assert r["loss"] == pytest.approx(nats / n_bytes, rel=1e-6) and r["tokens_per_byte"] == 1.0
    assert r["ppl"] == pytest.approx(math.exp(nats / n_bytes), rel=1e-6)


def test_corpus_shorter_than_a_block_is_scored_whole(model, tmp_path, one_thread):
    (tmp_path / "c.txt").write_text("short")
    r = corpus_bpb(model, ByteTok(), str(tmp_path / "c.txt"), seq_len=16)
    ids = [0] + ByteTok().encode("short")
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    nats = -sum(float(torch.log_softmax(logits[0, t - 1].double(), -1)[ids[t]]) for t in range(1, len(ids)))
    assert r["tokens_scored"] == 5 and r["bpb"] == pytest.approx(nats / 5 / math.log(2), rel=1e-6)


def test_bad_corpus_record_and_empty_corpus(model, tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: no field 'text'"):
        corpus_bpb(model, ByteTok(), str(tmp_path / "b.jsonl"))
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match=r"e\.jsonl: holds no text$"):
        corpus_bpb(model, ByteTok(), str(tmp_path / "e.jsonl"))
