"""raylm's Ray Train trainer (raylm.train_ray.trainer_class) on a real local cluster, started
the way `raylm` starts one, in a fresh process (it sends itself SIGINT, which must never reach
pytest's own process):
  - a worker failing with a user's mistake ends the run at once, under max_failures=2;
  - a crash is still retried (max_failures counts);
  - Ctrl-C during training aborts the run's workers and reaches the caller as KeyboardInterrupt;
  - SIGTERM does the same (after raylm's init_ray);
  - Ctrl-C after a finished run is the driver's again (KeyboardInterrupt, not swallowed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# With the cluster tests' group under pytest-xdist (tests/conftest.py), though it uses none of its
# fixtures: run beside those tests, the SIGINTs these send were lost (twice in one run; not
# understood yet, and not seen in any run one test at a time).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cluster")]

SCRIPT = r'''
import os, signal, sys, time
import ray, ray.train
from raylm.config import load_config
from raylm.errors import DataError
from raylm.pipeline import init_ray
from raylm.train_ray import trainer_class

OUT, DRIVER = sys.argv[1], os.getpid()

def attempt(name):
    with open(os.path.join(OUT, name), "a") as f:
        f.write("x")

def users_mistake(config):
    attempt("mistake")
    raise DataError("corpus.jsonl: line 3: not JSON")

def crash(config):
    attempt("crash")
    raise RuntimeError("a crash")

def interrupted(config):
    attempt("interrupted")
    os.kill(DRIVER, signal.SIGINT)  # the driver is inside fit: this worker runs
    time.sleep(120)

def terminated(config):
    attempt("terminated")
    os.kill(DRIVER, signal.SIGTERM)  # `ray job stop`, Kubernetes: as Ctrl-C (Ray's handler dumped a stack)
    time.sleep(120)

def quick(config):
    pass

def fit(fn, max_failures=0):
    return trainer_class()(fn, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name=fn.__name__, storage_path=os.path.join(OUT, "store"),
                                                          failure_config=ray.train.FailureConfig(max_failures=max_failures))).fit()

init_ray(load_config(overrides=["train.num_workers=1", "train.cpus_per_worker=1"]), dashboard=True)  # for the state API
for fn in (users_mistake, crash):
    try:
        fit(fn, max_failures=2)
    except ray.train.TrainingFailedError as e:
        from raylm.cli import _root_cause
        print(f"{fn.__name__}: failed: {type(_root_cause(e)).__name__}: {_root_cause(e)}", flush=True)
t0 = time.time()
try:
    fit(interrupted)
    print("interrupted: fit returned", flush=True)
except KeyboardInterrupt:
    print(f"interrupted: KeyboardInterrupt after {time.time() - t0:.0f}s", flush=True)
except SystemExit as e:  # Ray's own handler's way out
    print(f"interrupted: SystemExit({e.code})", flush=True)
from ray.util.state import list_actors

def workers_alive():
    # This cluster's address: other clusters may be running on the machine (other test modules').
    return len(list_actors(address=ray.get_runtime_context().gcs_address,
                           filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]))

print(f"interrupted: {workers_alive()} training workers alive", flush=True)
try:
    fit(terminated)
    print("terminated: fit returned", flush=True)
except KeyboardInterrupt:
    print("terminated: KeyboardInterrupt", flush=True)
print(f"terminated: {workers_alive()} training workers alive", flush=True)
fit(quick)
try:
    os.kill(DRIVER, signal.SIGINT)
    time.sleep(2)
    print("after: SIGINT swallowed", flush=True)
except KeyboardInterrupt:
    print("after: KeyboardInterrupt", flush=True)
'''


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("train-ray-fix")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYLM_DASHBOARD")}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    attempts = {p.name: len(p.read_text()) for p in out.iterdir() if p.is_file()}
    return run.stdout, attempts


def test_a_users_mistake_in_a_worker_fails_at_once_with_its_line(session):
    out, attempts = session
    assert "users_mistake: failed: DataError: corpus.jsonl: line 3: not JSON" in out, out
    assert attempts["mistake"] == 1, attempts  # not 3 (max_failures=2 restarts that fail the same way)


def test_a_crash_is_retried_max_failures_times(session):
    out, attempts = session
    assert "crash: failed: RuntimeError: a crash" in out, out
    assert attempts["crash"] == 3, attempts


def test_ctrl_c_stops_the_workers_and_raises_keyboard_interrupt(session):
    out, attempts = session
    assert "interrupted: KeyboardInterrupt" in out, out
    assert attempts["interrupted"] == 1, attempts
    assert "interrupted: 0 training workers alive" in out, out


def test_sigterm_stops_the_run_as_ctrl_c_does(session):
    """`ray job stop` and Kubernetes send SIGTERM: Ray's driver handler printed a C++ stack dump
    and aborted, with a checkpoint in flight lost."""
    out, attempts = session
    assert "terminated: KeyboardInterrupt" in out, out
    assert attempts["terminated"] == 1, attempts
    assert "terminated: 0 training workers alive" in out, out


def test_ctrl_c_after_a_finished_run_is_not_swallowed(session):
    out, _ = session
    assert "after: KeyboardInterrupt" in out, out
