"""raylm tune on a real local Ray cluster: every trial a Ray Train run of the small model.

One 4-trial ASHA search (2 trials at a time, 1 worker each) is shared by the first tests:
its grid holds two learning rates far too small to learn anything in 8 steps, which start
after the two good ones have set the first rungs, so ASHA stops at least one of them early.
A second search runs as a subprocess `raylm tune` driver on this test session's cluster,
with its storage in S3; it is killed once a trial has finished, and resumed here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from raylm import storage
from tests.small import SMALL

pytestmark = pytest.mark.integration

STEPS = 8
# Log steps that are not all evaluation steps (as the defaults': 10 and 100): Tune must see
# only the evaluations' reports, which hold the metric.
SCHEDULE = ["train.num_workers=1", f"train.max_steps={STEPS}", "train.eval_every=2", "train.log_every=1",
            "train.ckpt_every=100", "train.timeout_s=300"]
# Grid order is trial order: the good rates run first and record the rungs the others meet.
ASHA_SPACE = """\
train.lr: grid_search([1.0e-2, 3.0e-3, 1.0e-6, 2.0e-6])
tune: {scheduler: asha, max_concurrent_trials: 2, num_samples: 1, grace_period: 2, reduction_factor: 2}
"""
RESUME_SPACE = """\
train:
  lr: loguniform(1.0e-3, 1.0e-2)
tune: {scheduler: fifo, search: random, max_concurrent_trials: 1, num_samples: 2}
"""


@pytest.fixture(scope="module")
def prepared(tune_data):
    """The Tune tests' data (tests.tune_search.prepare_tune_data), made once a session."""
    return tune_data


def _alive():
    import ray
    from ray.util.state import list_actors, list_placement_groups

    address = ray.get_runtime_context().gcs_address  # this session's cluster, not another on the machine
    # Not DEAD rather than ALIVE: an actor still starting counts (raylm starts Ray Data's
    # cluster-wide actors with the cluster, without waiting for them).
    actors = {a.actor_id: a.class_name
              for a in list_actors(address=address, filters=[("state", "!=", "DEAD")], limit=10_000)}
    groups = {g.placement_group_id for g in list_placement_groups(address=address, limit=10_000)
              if g.state != "REMOVED"}
    return actors, groups


def _base_args(prepared, storage_uri: str, name: str) -> list:
    base, data_dir, _ = prepared
    return [f"storage={storage_uri}", f"name={name}", f"tokenizer.path={base.tokenizer.path}", *SMALL, *SCHEDULE]


@pytest.fixture(scope="module")
def search(prepared, tmp_path_factory):
    """The 4-trial ASHA search, with the actors and placement groups alive before it, and
    Ray Data's stats actors (in any state)."""
    from raylm import tune
    from raylm.config import load_config

    tmp = tmp_path_factory.mktemp("tune")
    space = tmp / "space.yaml"
    space.write_text(ASHA_SPACE)
    before = _alive()
    stats0 = _stats_actors()
    # cpus_per_worker as a user leaves it ("auto"): best.yaml must keep it, not a trial's share.
    cfg = load_config(overrides=[*_base_args(prepared, str(tmp / "runs"), "asha"), "train.cpus_per_worker=auto",
                                 ("data.path", prepared[1])])
    summary = tune.tune(cfg, str(space))
    return summary, cfg, before, stats0


def _stats_actors() -> dict:
    """Ray Data's stats actors this cluster has had, by id, with their state."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    return {a.actor_id: a.state for a in list_actors(address=address, filters=[("class_name", "=", "_StatsActor")],
                                                     limit=10_000)}


def test_asha_search_stops_a_trial_early_and_writes_the_best_config(search):
    summary, cfg, _, _ = search
    assert summary["trials"] == 4 and not summary["errors"], summary
    assert summary["stopped"], f"ASHA stopped no trial: {summary}"
    rows = list(__import__("csv").DictReader(open(summary["results_csv"])))
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert stopped and all(int(r["steps"]) < STEPS for r in stopped)
    assert float(rows[0]["train.lr"]) >= 3e-3, rows  # the good rates rank first
    best = yaml.safe_load(open(summary["best_config"]))
    assert best["train"]["lr"] == summary["best_params"]["train.lr"]
    # The workers as the search was given them, not a trial's share of the cluster: a full run
    # from best.yaml must not take a fraction of the machine.
    assert (best["train"]["num_workers"], best["train"]["cpus_per_worker"]) == (1, "auto"), best["train"]
    assert open(summary["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # Each trial is a normal raylm run: record, metrics, and (finished ones) a committed checkpoint.
    from raylm import checkpoint

    run = storage.join(cfg.run_dir, "runs", summary["best_trial"])
    record = json.loads(storage.read_text(storage.join(run, "record.json")))
    assert record["config"]["train"]["lr"] == best["train"]["lr"] and record["tune"]["trial_id"] == summary["best_trial"]
    assert storage.exists(storage.join(run, "metrics.jsonl"))
    assert checkpoint.latest_complete(run) is not None


# Ray Data's cluster-wide actors, one per cluster for its lifetime: the search starts them
# when it is the first Ray Data work on this cluster (this module run alone), and they stay.
CLUSTER_WIDE = {"_AutoscalingCoordinatorActor", "_StatsActor"}


def test_early_stopped_trials_leave_no_actors_or_placement_groups(search):
    _, _, (actors0, groups0), _ = search
    deadline = time.time() + 60  # Train's detached cleaner removes placement groups shortly after
    while True:
        actors, groups = _alive()
        new_actors = {k: v for k, v in actors.items() if k not in actors0 and v not in CLUSTER_WIDE}
        new_groups = groups - groups0
        if not new_actors and not new_groups or time.time() > deadline:
            break
        time.sleep(1)
    assert not new_actors, f"actors left running after the search: {new_actors}"
    assert not new_groups, f"placement groups left after the search: {new_groups}"


def test_ray_data_stats_actor_outlives_the_trials(search):
    """The search makes Ray Data's stats actor before any trial does: made by a trial's worker,
    it was removed with that trial's placement group and made again by the next one, and one
    removed while it started had Ray print a crash report ("You have likely discovered a bug
    in Ray")."""
    *_, stats0 = search
    stats = _stats_actors()
    died = [k for k, state in stats.items() if state == "DEAD" and stats0.get(k) != "DEAD"]
    assert not died, f"Ray Data's stats actor died during the search: {died} of {stats}"
    assert list(stats.values()).count("ALIVE") == 1, stats


def test_pretrain_runs_with_the_best_config(search, tmp_path):
    from raylm.config import load_config
    from raylm.pipeline import pretrain

    summary, *_ = search
    cfg = load_config(summary["best_config"], ["train.max_steps=2", f"storage={tmp_path}", "name=from-best"])
    out = pretrain(cfg, samples=False)
    assert out["steps"] == 2 and out["val_loss"] > 0


def test_a_killed_search_resumes_and_keeps_finished_trials(prepared, s3_server, s3_prefix, tmp_path):
    import ray

    from raylm import tune
    from raylm.config import load_config

    space = tmp_path / "space.yaml"
    space.write_text(RESUME_SPACE)
    args = _base_args(prepared, s3_prefix, "killed")
    env = {**os.environ, **s3_server.env(), "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "TUNE_GLOBAL_CHECKPOINT_S": "1", "PYTHONUNBUFFERED": "1"}  # Tune's state saved every second
    log = tmp_path / "driver.log"
    cmd = [sys.executable, "-m", "raylm.cli", "tune", "--space", str(space), "--data", prepared[1], *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finished, deadline = None, time.time() + 240
    try:
        while proc.poll() is None and time.time() < deadline:
            lines = log.read_text(errors="replace").splitlines()
            done = [ln.split("tune: trial ")[1].split()[0] for ln in lines if " finished at step" in ln]
            started = [ln.split("tune: trial ")[1].split()[0] for ln in lines if " started: " in ln]
            # A later trial evaluating: the finished one's state has been saved since.
            if done and any(f"trial {t} step" in ln for t in started if t not in done for ln in lines):
                finished = done[0]
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert finished, "no trial finished before the driver was killed:\n" + log.read_text(errors="replace")[-4000:]
    # A trial makes its datasets in its own process, not the driver's: Ray Data's progress
    # bars must be off there too, or every trial's workers print them into the driver's output.
    bars = [ln for ln in log.read_text(errors="replace").splitlines() if "Running Dataset" in ln]
    assert not bars, bars[:3]
    cfg = load_config(overrides=args)
    record = storage.join(cfg.run_dir, "runs", finished, "record.json")
    created = json.loads(storage.read_text(record))["created"]

    summary = tune.resume(cfg)
    assert summary["trials"] == 2 and not summary["errors"] and not summary["stopped"], summary
    assert json.loads(storage.read_text(record))["created"] == created, f"finished trial {finished} was run again"
    assert storage.exists(summary["best_config"])


def test_a_search_stopped_before_tune_saved_any_state_resumes(prepared, tmp_path, monkeypatch):
    """search.json is written before Tune's first state (tuner.pkl). A search whose driver died
    in between could be neither started again (the name holds a search) nor resumed (no Tune
    state); `--resume` now runs it from its saved space and settings, on a real Tuner."""
    from raylm import tune
    from raylm.config import ConfigError, load_config

    space = tmp_path / "space.yaml"
    space.write_text(RESUME_SPACE.replace("num_samples: 2", "num_samples: 1"))
    cfg = load_config(overrides=[*_base_args(prepared, str(tmp_path / "runs"), "early"), ("data.path", prepared[1])])

    class DriverDied(Exception):
        pass

    def die(*_, **__):
        raise DriverDied()

    with monkeypatch.context() as m:
        m.setattr(tune, "_run", die)  # after search.json, before Tune writes anything
        with pytest.raises(DriverDied):
            tune.tune(cfg, str(space), log=lambda *_: None)
    with pytest.raises(ConfigError, match="--resume"):  # a new search of that name is refused
        tune.tune(cfg, str(space), log=lambda *_: None)
    lines = []
    summary = tune.resume(cfg, log=lines.append)
    assert summary["trials"] == 1 and not summary["errors"], summary
    assert any("no Tune state yet" in ln for ln in lines), lines
    assert storage.exists(summary["best_config"])
