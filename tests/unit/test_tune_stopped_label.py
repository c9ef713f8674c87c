"""raylm tune without Ray: how the results label a trial that stopped early, and which trials
of a resumed search's results raylm trained (built from stand-in Tune results over run
directories as training writes them: record.json, checkpoints' meta.json)."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest

from raylm import checkpoint, tune
from raylm.config import ConfigError, TuneConfig, load_config, to_dict


def _result(trial: str, params: dict, steps: list[int], values: list[float]):
    from ray.tune import Result

    return Result(metrics={"trial_id": trial, "step": steps[-1], "config": params, "val_loss": values[-1]},
                  checkpoint=None, error=None, path=f"/x/run_trial_{trial}",
                  metrics_dataframe=pd.DataFrame({"step": steps, "val_loss": values}))


def _run(search_dir, trial: str, params: dict, ckpts: dict[int, float] = (), budget: float = 0.0,
         max_steps: int = 8):
    """A trial's run as `run_trial` and training leave it: its record, and a complete
    checkpoint per step in `ckpts` (step: training seconds spent) with the run's config."""
    run = search_dir / tune.RUNS / trial
    run.mkdir(parents=True)
    (run / "record.json").write_text(json.dumps({"stage": "pretrain", "tune": {"trial_id": trial, "params": params}}))
    cfg = load_config(overrides=[f"train.max_steps={max_steps}", f"train.time_budget_s={budget}"])
    for step, seconds in dict(ckpts).items():
        ckpt = run / checkpoint.checkpoint_name(step)
        ckpt.mkdir()
        (ckpt / checkpoint.META).write_text(json.dumps({"step": step, "consumed_blocks": step, "train_seconds": seconds,
                                                        "config": to_dict(cfg)}))
        (ckpt / checkpoint.COMMIT_MARKER).write_text(json.dumps({"step": step}))


def _report(tmp_path, grid, budget: float):
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=s", "train.max_steps=8", "train.eval_every=2",
                                 f"train.time_budget_s={budget}"])
    summary = tune.report(grid, {"base": to_dict(cfg)}, cfg, TuneConfig(), log=lambda *_: None)
    table = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    return summary, {r["trial"]: (r["status"], r["steps"]) for r in table}


def test_a_trial_its_time_budget_stopped_is_labelled_so(tmp_path):
    """A trial whose run stopped itself at step 5 of 8, its train.time_budget_s spent, was
    labelled "finished", as one that ran all its steps: results.csv, the table and the summary
    did not say it stopped early. A trial cut by ASHA at step 4 (its checkpoint there with
    budget left) is "stopped", and one that ran its 8 steps "finished"."""
    search_dir = tmp_path / "s"
    _run(search_dir, "a_00000", {"train.lr": 0.001}, {5: 30.0004}, budget=30.0)
    _run(search_dir, "a_00001", {"train.lr": 0.002}, {4: 12.5}, budget=30.0)
    _run(search_dir, "a_00002", {"train.lr": 0.003}, {8: 29.0}, budget=30.0)
    grid = [_result("a_00000", {"train.lr": 0.001}, [2, 4, 5], [5.0, 4.0, 3.9]),
            _result("a_00001", {"train.lr": 0.002}, [2, 4], [5.5, 5.0]),
            _result("a_00002", {"train.lr": 0.003}, [2, 4, 6, 8], [5.0, 4.0, 3.5, 3.4])]
    summary, status = _report(tmp_path, grid, budget=30.0)
    assert status == {"a_00000": ("time budget", "5"), "a_00001": ("stopped", "4"), "a_00002": ("finished", "8")}
    assert summary["stopped"] == ["a_00001"] and summary["time_budget"] == ["a_00000"]
    rows = {r["trial"]: r for r in tune.trial_rows(grid, "val_loss", "min", str(search_dir / tune.RUNS))}
    assert [rows[t]["budget_spent"] for t in ("a_00000", "a_00001", "a_00002")] == [True, False, False]


def test_a_trials_own_budget_is_read_from_its_run(tmp_path):
    """The base config sets no budget; the space searched train.time_budget_s: the trial's own
    checkpoint says its budget was spent."""
    search_dir = tmp_path / "s"
    _run(search_dir, "a_00000", {"train.time_budget_s": 10.0}, {3: 10.0}, budget=10.0)
    summary, status = _report(tmp_path, [_result("a_00000", {"train.time_budget_s": 10.0}, [2, 3], [5.0, 4.5])],
                              budget=0.0)
    assert status == {"a_00000": ("time budget", "3")}


def test_the_trial_log_does_not_call_a_budgeted_early_end_finished():
    """The log line at a trial's end cannot read its run: an early end under a time budget is
    "ended", neither "finished" nor ASHA's "stopped"."""
    train = load_config(overrides=["train.max_steps=8", "train.time_budget_s=30"]).train
    assert tune._ended(5, train) == "ended" and tune._ended(8, train) == "finished"
    assert tune._ended(5, train, budget_spent=True) == "time budget"
    assert tune._ended(5, train, budget_spent=False) == "stopped"


# --------------------------------------------------------------------------- resumed results


def test_a_reported_trial_no_run_recorded_is_refused(tmp_path):
    """A resumed search's results are the trials its saved Tune state holds: one added there
    (its own id and folder, another trial's reports) was ranked, and its config, which nothing
    trained, written to best.yaml. Its run holds no record: one line, naming it."""
    search_dir = tmp_path / "s"
    _run(search_dir, "a_00000", {"train.lr": 0.003}, {8: 1.0})
    grid = [_result("a_00099", {"train.lr": 0.0011}, [2, 8], [5.0, 3.0]),
            _result("a_00000", {"train.lr": 0.003}, [2, 8], [5.0, 3.0])]
    with pytest.raises(ConfigError) as e:
        tune.check_recorded(grid, str(search_dir), None, "val_loss")
    msg = str(e.value)
    assert msg.startswith("tune: trial a_00099 reported val_loss with train.lr=0.0011") and "\n" not in msg, msg
    tune.check_recorded(grid[1:], str(search_dir), None, "val_loss")  # the trial raylm trained


@pytest.mark.parametrize("trial, params", [("a_00000", {"train.lr": 0.0099}),
                                           ("a_00000", {"train.lr": 0.003, "data.path": "/elsewhere"}),
                                           ("../a_00000", {"train.lr": 0.003})])
def test_a_reported_config_the_run_did_not_train_is_refused(tmp_path, trial, params):
    search_dir = tmp_path / "s"
    _run(search_dir, "a_00000", {"train.lr": 0.003}, {8: 1.0})
    grid = [_result(trial, params, [2, 8], [5.0, 3.0])]
    with pytest.raises(ConfigError, match=r"^tune: (trial|a trial's results)"):
        tune.check_recorded(grid, str(search_dir), None, "val_loss")


def test_a_trial_named_twice_is_refused(tmp_path):
    search_dir = tmp_path / "s"
    _run(search_dir, "a_00000", {"train.lr": 0.003}, {8: 1.0})
    grid = [_result("a_00000", {"train.lr": 0.003}, [2, 8], [5.0, 3.0])] * 2
    with pytest.raises(ConfigError, match="not one trial's own id"):
        tune.check_recorded(grid, str(search_dir), None, "val_loss")


def test_a_trial_that_reported_nothing_needs_no_run(tmp_path):
    """A trial that Tune's time budget stopped before it trained reported nothing: not ranked, no run needed."""
    from ray.tune import Result

    grid = [Result(metrics={"trial_id": "a_00003", "config": {"train.lr": 0.001}}, checkpoint=None, error=None,
                   path="/x/run_trial_a_00003", metrics_dataframe=None)]
    tune.check_recorded(grid, str(tmp_path / "s"), None, "val_loss")


def test_steps_are_those_of_the_last_report(tmp_path):
    """Tune's last result (in its saved state, apart from the reports) said step 8 for a trial
    whose reports end at step 2: it was labelled "finished" at step 8, as if it ran its steps."""
    grid = [_result("a_00000", {"train.lr": 0.001}, [2], [5.0])]
    grid[0].metrics["step"] = 8
    summary, status = _report(tmp_path, grid, budget=0.0)
    assert status == {"a_00000": ("stopped", "2")} and summary["stopped"] == ["a_00000"]
