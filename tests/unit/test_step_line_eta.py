"""The training step line says how long the run has left: the steps to train.max_steps at the
run's seconds per step so far, or under train.time_budget_s no more than the budget left."""

import re

import numpy as np
import pytest

from raylm.config import load_config
from raylm.train import train_local

LEFT = re.compile(r" \| (\d+h\d\dm|\d+m\d\ds|\d+s) left$")


def run_lines(tmp_path, *overrides) -> list[str]:
    cfg = load_config(overrides=[
        f"storage={tmp_path}", "name=run", "model.vocab_size=64", "model.dim=32", "model.n_layers=1",
        "model.n_heads=4", "model.max_seq_len=16", "data.seq_len=16", "train.micro_batch_size=4",
        "train.global_batch_size=4", "train.max_steps=4", "train.log_every=1", "train.ckpt_every=100",
        "train.eval_every=100", *overrides])
    rows = (np.arange(17)[None, :] * np.arange(1, 13)[:, None] % 64).astype(np.int32)
    lines = []
    train_local(cfg, rows[:8], rows[8:], log=lambda *a: lines.append(" ".join(map(str, a))))
    return [line for line in lines if re.match(r"step \d+[/ ]", line) and "tok/s" in line]


@pytest.mark.parametrize("overrides", [(), ("train.time_budget_s=3600",)], ids=["max_steps", "time_budget"])
def test_step_lines_say_the_time_left_until_the_last(tmp_path, one_thread, overrides):
    lines = run_lines(tmp_path, *overrides)
    assert [line.split()[1] for line in lines] == (["1/4", "2/4", "3/4", "4/4"] if not overrides else
                                                   ["1", "2", "3", "4"]), lines
    assert all(LEFT.search(line) for line in lines[:-1]), lines
    assert "left" not in lines[-1], lines[-1]  # the final step: nothing left to say


def test_time_left_arithmetic():
    from raylm.train import time_left

    # 10 steps in 20 s since a resume at step 100 (50 s spent before it): 2 s a step, 90 to go.
    assert time_left(110, 200, 100, 50.0, 70.0, 0.0) == pytest.approx(180.0)
    # Under a time budget the budget left caps it; the step count can still end the run first.
    assert time_left(110, 10**9, 100, 50.0, 70.0, 100.0) == pytest.approx(30.0)
    assert time_left(110, 112, 100, 50.0, 70.0, 100.0) == pytest.approx(4.0)
    assert time_left(100, 200, 100, 50.0, 50.0, 100.0) == pytest.approx(50.0)  # no step yet: the budget
    assert time_left(100, 200, 100, 50.0, 50.0, 0.0) is None  # no step yet, no budget: unknown
    assert time_left(200, 200, 100, 50.0, 250.0, 0.0, final=True) is None


def test_long_times_left_read_in_hours():
    from raylm.progress import duration

    assert (duration(45), duration(750), duration(7500)) == ("45s", "12m30s", "2h05m")
