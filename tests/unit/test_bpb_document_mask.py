"""Bits per byte of a model trained with document masking is scored with that mask."""

import math

import pytest
import torch

from raylm.config import ModelConfig
from raylm.eval.bpb import bits_per_byte, trained_with_document_mask
from raylm.model import build_model


class ByteTok:
    """Token = byte + 1 (0 is EOS)."""

    eos_id = 0

    def encode(self, text):
        return [b + 1 for b in text.encode("utf-8")]

    encode_plain = encode


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=2, max_seq_len=64), seed=0)


def nats(r: dict) -> float:
    return r["bpb"] * r["bytes"] * math.log(2)


def plain_nats_by_hand(model, docs: list[str]) -> float:
    """-log p of every document token after EOS and all earlier tokens, no mask, one window."""
    ids = [t for d in docs for t in [0] + ByteTok().encode(d)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].double(), -1)
    return -sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if ids[t] != 0)


def test_masked_bpb_scores_each_document_as_if_alone(model, one_thread):
    """With the mask, a document's score does not depend on the documents before it in the
    window (the model never saw another document's tokens in training); without it, it does,
    and the unmasked score is the plain causal one, as before."""
    docs = ["héllo wörld ", "naïve café, ", "zzz"]  # non-ASCII: bytes, not characters, are counted
    assert sum(len(d.encode()) + 2 for d in docs) < 64  # one window: only the mask can separate them
    together = bits_per_byte(model, ByteTok(), docs, seq_len=64, document_mask=True)
    alone = [bits_per_byte(model, ByteTok(), [d], seq_len=64, document_mask=True) for d in docs]
    assert together["bytes"] == sum(len(d.encode()) for d in docs) == together["tokens_scored"]
    assert nats(together) == pytest.approx(sum(nats(r) for r in alone), rel=1e-5)
    plain = bits_per_byte(model, ByteTok(), docs, seq_len=64)
    assert nats(plain) == pytest.approx(plain_nats_by_hand(model, docs), rel=1e-6)  # unchanged by the fix
    assert nats(plain) != pytest.approx(nats(together), rel=1e-3)


def test_masked_bpb_matches_the_masked_forward(model, one_thread):
    """Each document's tokens after its first are scored with the logits the masked training
    forward gives them (raylm.model's doc_sep=); the first after a lone EOS."""
    docs = ["abc abc abc ", "xyz xyz "]
    a, b = (ByteTok().encode(d) for d in docs)
    with torch.no_grad():
        row = torch.tensor([a + [0] + b])  # pre-training packing: doc EOS doc
        logp = torch.log_softmax(model(row, doc_sep=0)[0][0].double(), -1)
        lone = torch.log_softmax(model(torch.tensor([[0]]))[0][0, -1].double(), -1)
    expected = -float(lone[a[0]] + lone[b[0]])
    expected -= sum(float(logp[i - 1, row[0, i]]) for i in range(1, len(a)))
    expected -= sum(float(logp[i - 1, row[0, i]]) for i in range(len(a) + 2, row.shape[1]))
    r = bits_per_byte(model, ByteTok(), docs, seq_len=64, document_mask=True)
    assert nats(r) == pytest.approx(expected, rel=1e-5)


def test_masked_bpb_across_windows_scores_every_byte(model, one_thread):
    """Documents longer than a window: every byte is scored once with the mask too."""
    docs = ["The quick brown fox. " * 5, "ünïcödé " * 9, "x"]
    r = bits_per_byte(model, ByteTok(), docs, seq_len=16, document_mask=True)
    assert r["tokens_scored"] == r["bytes"] == sum(len(d.encode()) for d in docs)
    assert math.isfinite(r["bpb"]) and r["document_mask"] is True


def test_trained_with_document_mask_reads_the_checkpoint_config():
    assert trained_with_document_mask({"config": {"data": {"document_mask": True}}}) is True
    assert trained_with_document_mask({"config": {"data": {"document_mask": False}}}) is False
    assert trained_with_document_mask({"step": 1}) is False  # an older meta.json without the key


def test_trained_with_document_mask_reads_what_training_writes():
    """meta.json's "config" is `to_dict(cfg, redact=True)` (raylm.train): the key is where the
    function looks."""
    from raylm.config import load_config, to_dict

    for on in (True, False):
        cfg = load_config(overrides=[f"data.document_mask={str(on).lower()}"])
        assert trained_with_document_mask({"step": 1, "config": to_dict(cfg, redact=True)}) is on


def test_an_sft_checkpoint_is_scored_with_the_mask_it_trained_with():
    """SFT packs conversations under the document mask whatever data.document_mask says
    (raylm.objectives.make_objective), so its scores use the mask too; DPO and pre-training
    follow data.document_mask."""
    from raylm.config import load_config, to_dict

    for stage, on, masked in (("sft", False, True), ("sft", True, True), ("dpo", False, False),
                              ("pretrain", False, False), ("pretrain", True, True)):
        cfg = load_config(overrides=[f"data.document_mask={str(on).lower()}"])
        config = {**to_dict(cfg, redact=True), "stage": stage}
        assert trained_with_document_mask({"step": 1, "config": config}) is masked, (stage, on)
