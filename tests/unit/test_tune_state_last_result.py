"""The resume check of a search's Tune state reads each trial's run metadata and folder too:
what raylm's results take each trial's reported config, id and history from."""

from __future__ import annotations

import json

import pytest

from raylm.tune_state import UnsafeTuneStateError, check_experiment_data

ID = "825c8_00001"
FOLDER = f"run_trial_{ID}_1_train.lr=0.0030_2026-01-01_00-00-00"
CONFIG = {"train.lr": 0.003}


def _state(trial: dict | None = None, last: dict | None = None) -> str:
    trial = {"trial_id": ID, "status": "TERMINATED", "config": CONFIG, "relative_logdir": FOLDER, **(trial or {})}
    meta = {"last_result": {"trial_id": ID, "step": 8, "val_loss": 3.5, "config": CONFIG, **(last or {})}}
    return json.dumps({"runner_data": {}, "trial_data": [[json.dumps(trial), json.dumps(meta)]]})


def test_a_state_as_tune_saves_it_passes():
    check_experiment_data(_state(), "experiment_state.json")
    check_experiment_data(_state({"relative_logdir": None}, {"config": CONFIG}), "experiment_state.json")


@pytest.mark.parametrize("trial, last, match", [
    ({}, {"config": {"train.lr": 0.0099, "data.path": "/elsewhere"}},
     "trial_data[0] run metadata: last_result config="),
    ({}, {"trial_id": "825c8_00000"}, "trial_data[0] run metadata: last_result trial_id='825c8_00000'"),
    ({"relative_logdir": "run_trial_825c8_00000_0_train.lr=0.0010_2026-01-01_00-00-00"}, {},
     f"trial_data[0]: relative_logdir='run_trial_825c8_00000_0_train.lr=0.0010_2026-01-01_00-00-00' (not trial {ID}'s"),
])
def test_a_last_result_or_folder_not_the_trials_own_is_refused(trial, last, match):
    """The best trial's reported config (its last result, which no check read) went into
    results.csv and best.yaml as it stood: keys the space cannot search, values never trained.
    Another trial's id there, or its folder, credited one trial with another's reports."""
    with pytest.raises(UnsafeTuneStateError) as e:
        check_experiment_data(_state(trial, last), "experiment_state.json")
    assert str(e.value).startswith("experiment_state.json: ") and match in str(e.value), str(e.value)
