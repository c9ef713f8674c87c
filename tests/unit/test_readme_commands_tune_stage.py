"""`raylm tune` searches over pre-training runs (README, Tuning): its trials are `pretrain`
runs. A config of another stage (stage=sft or dpo, as an override, in --config, or from the
record of an SFT or DPO run through --from-record) must be refused in one line before any
work, as `raylm pretrain` and `raylm quickstart` refuse it."""

from __future__ import annotations

import json

import pytest

from raylm import tune
from raylm.cli import main
from raylm.config import load_config, to_dict


@pytest.fixture
def no_search(monkeypatch):
    """Any search or resume that starts is recorded instead of run."""
    started = []
    monkeypatch.setattr(tune, "tune", lambda *a, **k: started.append("tune") or {})
    monkeypatch.setattr(tune, "resume", lambda *a, **k: started.append("resume") or {})
    return started


def _space(tmp_path) -> str:
    path = tmp_path / "space.yaml"
    path.write_text("train.lr: choice([1e-3, 3e-3])\n")
    return str(path)


def _record(tmp_path, stage: str) -> str:
    cfg = load_config(overrides=[f"stage={stage}", "name=chat", f"storage={tmp_path / 'runs'}",
                                 *([f"init_from={tmp_path / 'runs' / 'base'}"] if stage != "pretrain" else [])])
    path = tmp_path / f"{stage}.json"
    path.write_text(json.dumps({"stage": stage, "config": to_dict(cfg)}))
    return str(path)


def test_tune_refuses_a_post_training_stage_override(tmp_path, capsys, no_search):
    """`raylm tune --space S stage=sft` prepared the tokenizer and data, started Ray, then every
    trial failed with a KeyError traceback ('loss_mask'), and the command exited 0."""
    argv = ["tune", "--space", _space(tmp_path), "stage=sft", "name=s", f"storage={tmp_path / 'runs'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "raylm: error: stage=sft: `raylm tune` trains a pretrain run; use `raylm sft`"
    assert no_search == []


def test_tune_refuses_the_record_of_an_sft_run(tmp_path, capsys, no_search):
    """--from-record of an SFT run's record.json: refused naming the record, as quickstart does."""
    rec = _record(tmp_path, "sft")
    assert main(["tune", "--space", _space(tmp_path), "--from-record", rec, "name=s"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"raylm: error: --from-record {rec}: the record of a sft stage, not pretrain; rerun it with "
                   f"`raylm sft --from-record`")
    assert no_search == []


def test_tune_resume_refuses_a_post_training_stage_override(tmp_path, capsys, no_search):
    assert main(["tune", "--resume", "stage=dpo", f"init_from={tmp_path}", "name=s"]) == 2
    assert "`raylm tune` trains a pretrain run" in capsys.readouterr().err
    assert no_search == []


def test_tune_takes_a_pretraining_record(tmp_path, capsys, no_search):
    """A pre-training run's record is still taken (its settings are the trials' base)."""
    rec = _record(tmp_path, "pretrain")
    assert main(["tune", "--space", _space(tmp_path), "--from-record", rec, "name=s"]) == 0
    assert no_search == ["tune"]
