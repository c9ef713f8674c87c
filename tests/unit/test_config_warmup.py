"""train.warmup_steps past train.max_steps: the learning rate would climb to a fraction of
train.lr at the last step and never decay (train.lr_at), whatever train.time_budget_s says
(max_steps still ends the loop). Refused at load in one line naming both values, where the
warmup is longer than the default's 30 steps; the defaults and short smoke runs load."""

import pytest

from raylm.cli import main
from raylm.config import ConfigError, TrainConfig, load_config
from raylm.train import lr_at


def test_what_a_warmup_past_the_run_does_to_the_schedule():
    tc = TrainConfig(lr=1.0, max_steps=1000, warmup_steps=2000)  # built directly: not validated
    rates = [lr_at(s, tc) for s in range(tc.max_steps)]
    assert max(rates) == pytest.approx(0.5)  # half the peak, at the last step: no decay at all
    assert rates == sorted(rates)


@pytest.mark.parametrize("overrides", [
    ["train.max_steps=1000", "train.warmup_steps=2000"],
    ["train.max_steps=40", "train.warmup_steps=41"],
    ["train.max_steps=10", "train.warmup_steps=100", "train.time_budget_s=3600"],
])
def test_refused_at_load_in_one_line_naming_both_values(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    msg = str(e.value)
    steps, warmup = (o.split("=")[1] for o in overrides[:2])
    assert "\n" not in msg
    assert msg.startswith(f"train.warmup_steps={warmup} exceeds train.max_steps={steps}")


def test_the_cli_refuses_before_anything_runs(tmp_path, capsys):
    # (--resume with nothing to resume: the run before this check failed there, not in training)
    assert main(["pretrain", "--resume", f"storage={tmp_path}", "train.max_steps=100", "train.warmup_steps=500"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.warmup_steps=500 exceeds train.max_steps=100" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides", [
    [],  # the defaults
    ["train.max_steps=4"],  # a smoke run under the default warmup (30)
    ["train.max_steps=10", "train.warmup_steps=30"],
    ["train.max_steps=200", "train.warmup_steps=200"],  # the peak at the last step
    ["train.max_steps=100000", "train.warmup_steps=2000", "train.time_budget_s=240"],
    ["model.preset=gpt2-124m"],
])
def test_legitimate_schedules_load(overrides):
    load_config(overrides=overrides)
