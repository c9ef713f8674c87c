"""Review fixes for post-training data: records that would train on nothing are bad records."""

from __future__ import annotations

import json

import pytest

from raylm import synthetic as S
from raylm.chat_data import conversation, encode_file
from raylm.data import DataError
from raylm.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"{e.prompt} {e.answer}" for t in S.TASKS for e in S.examples(t, 100, seed=1)] * 3
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 320)


@pytest.mark.parametrize("record", [
    {"prompt": "reverse: abc", "chosen": "cba", "rejected": "cba"},
    {"messages": [{"role": "user", "content": "reverse: abc"}], "chosen": "cba", "rejected": "cba"},
])
def test_dpo_pair_with_the_same_chosen_and_rejected_is_a_bad_record(record):
    # Δ = 0 whatever the weights: log 2 of loss, no gradient, yet a pair in the normaliser.
    with pytest.raises(DataError, match=r"^d/p\.jsonl:3: 'chosen' and 'rejected' are the same text"):
        conversation(record, "dpo", "d/p.jsonl:3")


def test_identical_pair_is_counted_among_bad_records_not_trained(tok):
    lines = "\n".join(json.dumps(r) for r in [{"prompt": "add: 2 + 3", "chosen": "5", "rejected": "6"},
                                               {"prompt": "add: 2 + 3", "chosen": "5", "rejected": "5"},
                                               {"prompt": "add: 2 + 3", "chosen": "5", "rejected": "5 "}])
    out = encode_file({"path": ["d/p.jsonl"], "bytes": [lines.encode()]}, tok, "dpo", {"d/p.jsonl": 0}, 0.0)
    assert out["error"][0] == "" and out["error"][2] == ""  # texts that differ, if only by a space, stay
    assert out["error"][1].startswith("d/p.jsonl:2: 'chosen' and 'rejected' are the same text")
    assert out["seqs"][1] == ""


def test_reused_chat_dataset_still_keeps_ray_data_in_order(tmp_path):
    """posttrain's DPO reference pass reads the rows back with Ray Data after prepare_chat: on
    the reuse path (a rerun) too, it must see them in order, or training order depends on
    which read task finished first."""
    import types

    import ray.data

    from raylm.chat_data import dataset_key, prepare_chat
    from raylm.config import DataConfig
    from raylm.data import list_corpus

    records = tmp_path / "pairs.jsonl"
    records.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    cfg = DataConfig(path=str(records))
    tok = types.SimpleNamespace(sha256="t" * 64)
    out = tmp_path / "data"
    out.mkdir()
    key = dataset_key("dpo", list_corpus(cfg.path), cfg, tok.sha256, 0)
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "key": key, "train": {"blocks": 1},
                                                   "stats": {"bad_records": []}}))
    opts = ray.data.DataContext.get_current().execution_options
    before = opts.preserve_order
    opts.preserve_order = False
    try:
        assert prepare_chat("dpo", cfg, tok, str(out), 0, log=lambda *a: None)["key"] == key
        assert opts.preserve_order
    finally:
        opts.preserve_order = before
