"""What a run does before its cluster is up, and what its workers are started with."""

import json
import os

from raylm import pipeline
from raylm.config import load_config
from raylm.train import WORKER_SETTINGS, worker_runtime_env


def _cfg(tmp_path, *overrides):
    return load_config(overrides=[f"data.path={tmp_path}", *overrides])


def test_small_corpora_and_prepared_datasets_are_made_ready_before_ray(tmp_path):
    (tmp_path / "book.txt").write_text("to be or not to be\n" * 100)
    assert pipeline.prepares_without_ray(_cfg(tmp_path), None)
    assert not pipeline.prepares_without_ray(_cfg(tmp_path, "data.in_process_mb=0"), None)  # Ray Data's pool
    assert not pipeline.prepares_without_ray(_cfg(tmp_path, "data.mode=stream"), None)  # read by the workers
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(json.dumps({"seq_len": 256}))
    assert pipeline.prepares_without_ray(load_config(overrides=[f"data.path={prepared}", "data.in_process_mb=0"]),
                                         None)


def test_workers_of_a_cluster_started_here_get_no_runtime_env_unless_a_setting_changed(monkeypatch):
    for k in WORKER_SETTINGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAYLM_LOCAL_CLUSTER", "1")
    started = dict(os.environ)
    monkeypatch.setattr(pipeline, "started_env", lambda: started)
    assert worker_runtime_env() is None  # the workers inherit the environment: Ray's pre-started ones fit
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=3,rank=0,kind=raise")
    assert worker_runtime_env() == {"env_vars": {"RAYLM_INJECT_FAILURE": "step=3,rank=0,kind=raise"}}
    started = dict(os.environ)
    monkeypatch.delenv("RAYLM_INJECT_FAILURE")
    assert worker_runtime_env() == {"env_vars": {"RAYLM_INJECT_FAILURE": ""}}  # unset since the start


def test_workers_of_a_cluster_joined_get_the_settings_that_are_set(monkeypatch):
    for k in WORKER_SETTINGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(pipeline, "started_env", lambda: None)
    assert worker_runtime_env() is None
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=3,rank=0,kind=raise")
    assert worker_runtime_env() == {"env_vars": {"RAYLM_INJECT_FAILURE": "step=3,rank=0,kind=raise"}}
