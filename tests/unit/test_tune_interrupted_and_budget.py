"""raylm tune without Ray: a search Tune ended on Ctrl-C is not reported as finished, and the
saved state of a search with tune.time_budget_s passes the resume check."""

from __future__ import annotations

import json

import cloudpickle
import pytest

from raylm import tune
from raylm.config import load_config, to_dict, tune_config


def _state(search_dir, statuses: list[str]) -> None:
    """An experiment state as Tune saves it, with only what the check reads: each trial's status."""
    trials = [[json.dumps({"trial_id": f"a_0000{i}", "status": s}), "{}"] for i, s in enumerate(statuses)]
    (search_dir / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trials}))


def _run(tmp_path, monkeypatch, statuses: list[str]):
    """tune._run up to a stand-in for Tune's fit(), which saves `statuses` as Tune's last state
    and returns, as Tune does after Ctrl-C, with every trial terminated."""
    import ray.tune

    from ray.tune import Result

    cfg = load_config(overrides=[f"storage={tmp_path}", "name=s", "train.max_steps=8", "train.eval_every=2"])
    search_dir = tmp_path / "s"
    search_dir.mkdir()

    class Tuner:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            _state(search_dir, statuses)
            import pandas as pd

            return [Result(metrics={"trial_id": "a_00000", "step": 4, "config": {"train.lr": 1e-3}}, checkpoint=None,
                           error=None, path=str(search_dir / "run_trial_a_00000"),
                           metrics_dataframe=pd.DataFrame({"step": [2, 4], "val_loss": [5.0, 4.0]}))]

    monkeypatch.setattr(ray.tune, "Tuner", Tuner)
    monkeypatch.setattr(tune, "_trainable", lambda state, search_dir: None)
    state = {"base": to_dict(cfg), "tune": to_dict(tune_config({})), "space_path": "space.yaml", "manifest": {},
             "space_text": "train.lr: loguniform(1.0e-4, 1.0e-2)"}
    lines = []
    try:
        return tune._run(state, cfg, resume=False, log=lines.append), lines, search_dir
    except KeyboardInterrupt:
        return None, lines, search_dir


def test_a_search_interrupted_by_ctrl_c_writes_no_results(tmp_path, monkeypatch):
    """On Ctrl-C (or SIGTERM, which raylm turns into Ctrl-C: `ray job stop`, a pod stopped) Tune
    saves its state and returns from fit() as at the end, the running trials stopped: raylm
    wrote results.csv and best.yaml of the part that had run (a trial cut at step 4 of 8 as
    the best config) and exited 0. Now it stops as interrupted, naming --resume."""
    summary, lines, search_dir = _run(tmp_path, monkeypatch, ["TERMINATED", "RUNNING", "PENDING"])
    assert summary is None
    assert not (search_dir / "results.csv").exists() and not (search_dir / "best.yaml").exists()
    assert any("interrupted with 2 trial(s) unfinished" in ln and "--resume name=s" in ln for ln in lines), lines


def test_a_finished_search_is_reported(tmp_path, monkeypatch):
    summary, _, search_dir = _run(tmp_path, monkeypatch, ["TERMINATED", "ERROR"])
    assert summary is not None and (search_dir / "results.csv").exists() and (search_dir / "best.yaml").exists()


def test_the_saved_state_of_a_time_budgeted_search_passes_the_resume_check(tmp_path):
    """tune.time_budget_s makes Tune save a TimeoutStopper in the experiment state; the resume
    check refused it as a tampered state, so no search with a time budget could be resumed
    (its finished trials lost to a new search)."""
    from ray.tune.stopper import TimeoutStopper

    from raylm.tune_state import check_search_state

    stopper = {"_type": "CLOUDPICKLE_FALLBACK", "value": cloudpickle.dumps(TimeoutStopper(600.0)).hex()}
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(
        {"runner_data": {"_stopper": stopper, "_should_stop_experiment": False}, "trial_data": []}))
    checked = check_search_state(str(tmp_path))
    assert list(checked) == ["experiment_state-2026-01-01_00-00-00.json"]


def test_other_stoppers_are_still_refused(tmp_path):
    from ray.tune.stopper import MaximumIterationStopper

    from raylm.tune_state import UnsafeTuneStateError, check_search_state

    stopper = {"_type": "CLOUDPICKLE_FALLBACK", "value": cloudpickle.dumps(MaximumIterationStopper(3)).hex()}
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(
        {"runner_data": {"_stopper": stopper}, "trial_data": []}))
    with pytest.raises(UnsafeTuneStateError, match="MaximumIterationStopper"):
        check_search_state(str(tmp_path))
