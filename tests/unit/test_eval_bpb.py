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


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=2, max_seq_len=16), seed=0)


def test_corpus_bpb_is_mean_loss_times_tokens_per_byte(model, tmp_path, one_thread):
    docs = ["hello world, " * 6, "naïve café " * 5]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    r = corpus_bpb(model, ByteTok(), str(tmp_path / "*.jsonl"), text_field="body", seq_len=16)
    ids = ByteTok().encode(docs[0]) + [0] + ByteTok().encode(docs[1])  # documents joined by EOS
    n = (len(ids) - 1) // 16
    x = torch.tensor(ids[: n * 16 + 1])
    rows = torch.stack([x[j * 16:(j + 1) * 16 + 1] for j in range(n)])
    with torch.no_grad():
        _, loss = model(rows[:, :-1], rows[:, 1:])
    n_bytes = sum(len(d.encode()) for d in docs)
    assert r["tokens_scored"] == n * 16 and r["bytes"] == n_bytes
    assert r["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert r["bpb"] == pytest.approx(float(loss) * len(ids) / n_bytes / math.log(2), rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-6)


def test_bad_corpus_record_and_short_corpus(model, tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:2: no field 'text'"):
        corpus_bpb(model, ByteTok(), str(tmp_path / "b.jsonl"))
    # Shorter than one block: the user's file, named with the size that would do (not a bare ValueError).
    (tmp_path / "c.txt").write_text("short")
    with pytest.raises(DataError, match=r"c\.txt: 5 tokens, too few .* at least 17 tokens \(seq_len=16 \+ 1\)$"):
        corpus_bpb(model, ByteTok(), str(tmp_path / "c.txt"), seq_len=16)
