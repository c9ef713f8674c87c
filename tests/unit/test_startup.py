"""What a run does before its cluster is up, and what its workers are started with."""

import json
import os

from raylm import pipeline
from raylm.config import load_config
from raylm.train_ray import WORKER_SETTINGS, worker_runtime_env


def _cfg(tmp_path, *overrides):
    return load_config(overrides=[f"data.path={tmp_path}", *overrides])


def test_small_corpora_and_prepared_datasets_are_made_ready_before_ray(tmp_path):
    (tmp_path / "book.txt").write_text("to be or not to be\n" * 100)
    assert pipeline.prepares_without_ray(_cfg(tmp_path), None)
    assert not pipeline.prepares_without_ray(_cfg(tmp_path, "data.in_process_mb=0"), None)  # Ray Data's pool
    assert not pipeline.prepares_without_ray(_cfg(tmp_path, "data.mode=stream"), None)  # read by the workers
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(json.dumps({"format_version": 3, "key": "x", "seq_len": 256}))
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


def test_the_local_controller_loads_its_backend_config_without_importing_torch():
    """Ray Train's controller unpickles the trainer's backend config as it starts; Ray's own
    TorchConfig would make it import torch (seconds on 2 cores, on the way to the first step)."""
    import pickle
    import subprocess
    import sys

    from raylm.train_backend import LocalTorchConfig

    blob = pickle.dumps(LocalTorchConfig(backend="gloo"))
    child = ("import pickle, sys\n"
             "import ray.train.v2._internal.execution.controller\n"
             f"cfg = pickle.loads({blob!r})\n"
             "cfg.backend_cls(), cfg.train_func_context, cfg.framework, cfg.to_dict()\n"
             "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('ray.train.torch')))\n")
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_a_run_on_a_cluster_started_here_uses_that_backend_config(monkeypatch):
    import ray.train

    from raylm.train_ray import trainer_class
    from raylm.train_backend import LocalTorchConfig

    monkeypatch.setattr(pipeline, "started_env", lambda: {})
    trainer = trainer_class()(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    assert isinstance(trainer.backend_config, LocalTorchConfig) and trainer.backend_config.backend == "gloo"
    monkeypatch.setattr(pipeline, "started_env", lambda: None)  # a cluster joined: Ray's own
    assert not isinstance(trainer_class()(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
                          .backend_config, LocalTorchConfig)
