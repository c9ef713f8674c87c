"""DPO pairs as raylm prepares them never have a response side without a target token: each
side's loss mask covers its reply and the closing <|end|>, so the <|end|> is a target however
short the reply (and after PII redaction). A pair with an empty side, which would count in the
loss's normaliser with a constant term (`DPOObjective.count` against `trainable`), cannot come
from prepared records; it takes hand-made batch columns."""

from __future__ import annotations

import pytest
import torch

from raylm import synthetic as S
from raylm.chat_data import encode_record
from raylm.objectives import DPOObjective, dpo_batch
from raylm.tokenizer import train_tokenizer

RECORDS = [
    {"prompt": "add: 2 + 3", "chosen": "5", "rejected": "6"},
    {"prompt": "x", "chosen": "a", "rejected": "it is 5"},
    {"prompt": "x", "chosen": "\u200b", "rejected": "b"},  # invisible, yet a non-empty string
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
     "chosen": [{"role": "assistant", "content": "h"}], "rejected": "hello there"},
    {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}],
     "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "n"}]},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


@pytest.mark.parametrize("record", RECORDS)
def test_each_prepared_response_side_has_its_end_as_a_target(tok, record):
    end = tok.special_ids["<|end|>"]
    for ids, mask in encode_record(tok, record, "dpo", "r"):
        targets = [i for t, (i, m) in enumerate(zip(ids, mask)) if m and t > 0]  # position 0 is never one
        assert targets and targets[-1] == end, (record, ids, mask)


def test_every_pair_of_a_batch_is_trainable(tok):
    records = [r for r in RECORDS if isinstance(r.get("chosen"), str)]  # dpo_batch's record form
    batch = dpo_batch(tok, records)
    objective = DPOObjective()
    assert objective.trainable(batch) == objective.count(batch) == len(records)
    for side in ("chosen", "rejected"):
        assert bool(batch[f"{side}_mask"][:, 1:].any(-1).all()), side
        assert torch.equal(batch[f"{side}_mask"][:, 0], torch.zeros(len(records), dtype=torch.bool))
