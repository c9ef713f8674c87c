"""`raylm tune` with train.time_budget_s in the base config: a trial whose training loop
stopped itself when its budget was spent was labelled "finished", as one that ran all its
steps, in results.csv, the printed table and the summary."""

from __future__ import annotations

import csv

import pytest

from tests.integration.test_tune import prepared  # noqa: F401 - the search's data, as test_tune's
from tests.small import SMALL

pytestmark = pytest.mark.integration


def test_a_trial_its_time_budget_stopped_is_labelled_time_budget(prepared, tmp_path):
    """A budget of a millisecond: training stops itself after its first step (every step takes
    longer), evaluates and saves it, and ends; 4 steps were asked for."""
    from raylm import tune
    from raylm.config import load_config

    base, data_dir, _ = prepared
    (tmp_path / "space.yaml").write_text("train.lr: choice([0.003])\ntune: {scheduler: fifo, num_samples: 1}\n")
    cfg = load_config(overrides=[f"storage={tmp_path / 'searches'}", "name=budget",
                                 f"tokenizer.path={base.tokenizer.path}", *SMALL, "train.num_workers=1",
                                 "train.max_steps=4", "train.eval_every=2", "train.log_every=1",
                                 "train.ckpt_every=100", "train.timeout_s=300", "train.time_budget_s=0.001",
                                 ("data.path", data_dir)])
    lines = []
    summary = tune.tune(cfg, str(tmp_path / "space.yaml"), log=lines.append)
    rows = list(csv.DictReader(open(tmp_path / "searches" / "budget" / "results.csv")))
    assert [(r["status"], r["steps"]) for r in rows] == [("time budget", "1")], rows
    assert summary["time_budget"] == [rows[0]["trial"]] and not summary["stopped"], summary
    assert any("time budget" in ln for ln in lines if ln.startswith("tune: results")), lines
