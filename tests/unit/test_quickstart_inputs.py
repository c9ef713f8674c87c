"""What `raylm quickstart` starts from: its settings (`--from-record`) and the SFT records and
held-out prompts it builds (`raylm.posttrain.quickstart_sft`'s data, without training)."""

from __future__ import annotations

import json

from raylm import synthetic
from raylm.chat_data import conversation, duplicate_key, redact_conversation, split_text
from raylm.cli import main
from raylm.config import Config, load_config, to_dict
from raylm.documents import stable_fraction
from raylm.posttrain import QUICKSTART_TASK


def _record(path, stage: str, tmp_path) -> str:
    # data.path names a missing file: a run that gets past the settings stops at preflight,
    # before any tokenizer, data or cluster work.
    cfg = load_config(overrides=[f"stage={stage}", "name=qs", f"storage={tmp_path / 'runs'}",
                                 f"data.path={tmp_path / 'missing.jsonl'}",
                                 *([f"init_from={tmp_path / 'runs' / 'base'}"] if stage != "pretrain" else [])])
    path.write_text(json.dumps({"stage": stage, "config": to_dict(cfg)}))
    return str(path)


def test_quickstart_refuses_the_record_of_a_post_training_run(tmp_path, capsys):
    """quickstart pre-trains: an SFT run's record (stage, init_from, its records as data.path)
    is refused in one line, as `raylm pretrain --from-record` refuses it. It ran as
    pre-training with stage=sft: tokenizer and data work, a record.json, then a late error."""
    rec = _record(tmp_path / "sft.json", "sft", tmp_path)
    assert main(["quickstart", "--from-record", rec, "--no-sft"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"raylm: error: --from-record {rec}: the record of a sft stage, not pretrain; rerun it with "
                   f"`raylm sft --from-record`")
    assert not (tmp_path / "runs").exists()


def test_quickstart_takes_the_record_of_a_pretraining_run(tmp_path, capsys):
    """A pre-training record (quickstart's own) is taken: the run gets as far as its data."""
    rec = _record(tmp_path / "pretrain.json", "pretrain", tmp_path)
    assert main(["quickstart", "--from-record", rec, "--no-sft"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: ") and "\n" not in err, err
    assert "missing.jsonl" in err and "--from-record" not in err, err


def test_quickstart_sft_records_and_held_out_prompts():
    """The README's numbers: 2,000 SFT records and 50 held-out prompts of 'the word after X',
    from the run's seed; no held-out prompt is trained on, no record repeats (the
    SFT stage's de-duplication drops none), and the stage's own validation split (val_fraction
    0.05 of the records, by their messages) leaves both sides non-empty."""
    seed = Config().seed
    train, held = synthetic.split(QUICKSTART_TASK, 2000, 50, seed=seed)
    assert (len(train), len(held)) == (2000, 50)
    assert {e.prompt for e in train}.isdisjoint(e.prompt for e in held)
    assert len({e.prompt for e in held}) == 50
    assert all(e.answer != e.wrong for e in train + held)
    # Seeded: the same seed gives the same split, another seed another one.
    assert synthetic.split(QUICKSTART_TASK, 2000, 50, seed=seed) == (train, held)
    assert synthetic.split(QUICKSTART_TASK, 2000, 50, seed=seed + 1)[1] != held
    # The README's eval of the fine-tuned run holds out 500 with the same call: the same
    # training set, and the quickstart's 50 held-out prompts are its first 50.
    train500, held500 = synthetic.split(QUICKSTART_TASK, 2000, 500, seed=seed)
    assert train500 == train and held500[:50] == held
    pii = Config().data.redact_pii
    convs = [redact_conversation(conversation(synthetic.messages_record(e), "sft", "r"), "sft", pii)
             for e in train]
    assert all(not sum(found.values()) for _, found in convs)  # nothing in them looks like PII
    assert len({duplicate_key(c, "sft") for c, _ in convs}) == 2000
    val = sum(stable_fraction(split_text(c, "sft")) < 0.05 for c, _ in convs)
    assert 0 < val < 2000


def test_a_stage_override_on_a_training_command_is_refused_before_any_work(tmp_path, capsys):
    """`raylm pretrain stage=sft ...` ran the tokenizer and data stages and wrote record.json
    before it failed; `raylm sft stage=dpo` trained DPO under the sft command."""
    for argv in (["pretrain", "stage=sft", f"init_from={tmp_path / 'base'}"],
                 ["quickstart", "--no-sft", "stage=dpo", f"init_from={tmp_path / 'base'}"],
                 ["sft", "--from", str(tmp_path / "base"), "stage=dpo"]):
        assert main([*argv, f"storage={tmp_path / 'runs'}", "name=qs"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("raylm: error: stage=") and "trains a" in err, err
        assert not (tmp_path / "runs").exists()


def test_quickstart_sft_leaves_the_corpus_val_path_to_pretraining(tmp_path, monkeypatch):
    """`raylm quickstart data.path=X data.val_path=Y` pre-trained fully, then its SFT stage
    took Y as its own data.val_path, which SFT refuses: the run ended after pre-training."""
    import pytest

    from raylm import posttrain

    seen = []

    def stop(cfg, *a, **k):  # the SFT run itself is posttrain's to test; its settings are this one's
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(posttrain, "posttrain", stop)
    base = load_config(overrides=[f"storage={tmp_path}", "name=qs", "data.path=c.txt", "data.val_path=v.txt"])
    with pytest.raises(KeyboardInterrupt):
        posttrain.quickstart_sft(base, steps=2)
    assert seen[0].stage == "sft" and seen[0].data.val_path == ""
