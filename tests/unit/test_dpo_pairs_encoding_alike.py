"""Review of SFT/DPO records -> rows: a DPO pair whose two texts differ but encode to the same
ids is a bad record, as one of the same text is, and DPO datasets prepared before it get another
key; packed SFT rows count exactly the assistant content and its <|end|> as targets."""

from __future__ import annotations

import hashlib
import json
import types

import pytest
import torch

from raylm import synthetic as S
from raylm.chat_data import CHAT_ENCODING, dataset_key, encode_file, encode_record, pack_conversations
from raylm.config import DataConfig
from raylm.data import FORMAT_VERSION, DataError
from raylm.objectives import sft_targets
from raylm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


def test_dpo_pair_whose_texts_encode_alike_is_a_bad_record(tok):
    # SentencePiece writes a space as "\u2581": the two answers are one id sequence, so the
    # margin is zero whatever the weights (no gradient, yet a pair in the normaliser).
    pair = {"prompt": "add: 2 + 3", "chosen": "it is 5", "rejected": "it\u2581is 5"}
    lines = "\n".join(json.dumps(r) for r in [{"prompt": "add: 2 + 3", "chosen": "5", "rejected": "6"}, pair])
    out = encode_file({"path": ["d/p.jsonl"], "bytes": [lines.encode()]}, tok, "dpo", {"d/p.jsonl": 0}, 0.0)
    assert out["error"][0] == "" and out["seqs"][1] == ""
    assert out["error"][1].startswith("d/p.jsonl:2: 'chosen' and 'rejected' encode to the same tokens")
    with pytest.raises(DataError, match=r"^d/p\.jsonl:9: 'chosen' and 'rejected' encode to the same tokens"):
        encode_record(tok, pair, "dpo", "d/p.jsonl:9")


def test_dpo_key_changes_with_the_rows():
    files = [types.SimpleNamespace(uri="/d/pairs.jsonl", size=10, etag_or_mtime="1")]
    cfg = DataConfig(path="/d/pairs.jsonl")

    def before(kind, rows):  # dataset_key as it was with DPO rows version 1
        fields = {"kind": kind, "sources": [["/d/pairs.jsonl", 10, "1"]], "seq_len": cfg.seq_len,
                  "val_fraction": cfg.val_fraction, "tokenizer": "t" * 64, "seed": 0, "version": FORMAT_VERSION,
                  "chat_encoding": CHAT_ENCODING, **({"rows": rows} if rows else {})}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    assert dataset_key("dpo", files, cfg, "t" * 64, 0) != before("dpo", 1)
    # SFT rows changed since (split by conversation, records redacted and de-duplicated): its key too
    # (tests/unit/test_chat_records_cleaning.py).
    assert dataset_key("sft", files, cfg, "t" * 64, 0) != before("sft", 0)


def test_packed_sft_targets_are_assistant_content_and_end_alone(tok):
    """Next-token targets of a packed row: at row start, across each conversation boundary
    (EOS) and into the padding, only assistant content and its <|end|> count."""
    records = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "assistant", "content": "welcome"}, {"role": "user", "content": "reverse: ab"},
                      {"role": "assistant", "content": "ba"}, {"role": "user", "content": "thanks"}]},
        {"prompt": "add: 2 + 3", "completion": "5"},
    ]
    convs = [encode_record(tok, r, "sft", "x")[0] for r in records]
    width = sum(len(ids) for ids, _ in convs) + 4
    [(ids, mask)] = list(pack_conversations(convs, width, tok.pad_id))
    batch = sft_targets({"tokens": torch.as_tensor(ids)[None].long(), "loss_mask": torch.as_tensor(mask)[None].bool()})
    targets = batch["targets"][0].tolist()
    end = tok.special_ids["<|end|>"]
    want = [i for c in ("hello", "welcome", "ba", "5") for i in tok.encode_plain(c) + [end]]
    assert [t for t in targets if t != -100] == want
    # Each counted target is predicted from the token just before it in the same conversation.
    for t, (target, prev) in enumerate(zip(targets, ids[:-1])):
        if target != -100:
            assert prev not in (tok.eos_id, tok.pad_id) and target == ids[t + 1]
