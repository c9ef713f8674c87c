"""raylm's Ray Train trainer (raylm.train_ray.trainer_class) without a cluster: Ray's controller
is replaced by a stand-in, so these check what raylm hands it and how the driver's SIGINT
handling behaves around it. tests/integration/test_train_ray_fix_cluster.py runs the same on a
real local cluster."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("ray.train.v2")

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision  # noqa: E402
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer  # noqa: E402
from ray.train.v2.api.exceptions import WorkerGroupError  # noqa: E402

from raylm import pipeline  # noqa: E402
from raylm.errors import CheckpointError, ConfigError, DataError, StorageError, TrainingStopped  # noqa: E402
from raylm.train_ray import trainer_class  # noqa: E402


def _noop(config):
    pass


@pytest.fixture(scope="module", autouse=True)
def no_cluster_left():
    """Ray Train's fit() starts a plain local cluster where none runs: shut it down after this
    module, or a later module's `ray_local` would join it (sized by plain `ray.init`, without
    the S3 server's environment in its workers) and wait for resources it lacks."""
    started = ray.is_initialized()
    yield
    if not started and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True)
def joined_cluster(monkeypatch):
    """Ray's own controller path (a cluster raylm joined), which the stand-in replaces, even
    where this test process started a local cluster for other tests."""
    monkeypatch.setattr(pipeline, "started_env", lambda: None)


def _trainer(max_failures: int = 3):
    return trainer_class()(_noop, scaling_config=ray.train.ScalingConfig(num_workers=1),
                           run_config=ray.train.RunConfig(
                               name="t", storage_path="/tmp/raylm-test-unused",
                               failure_config=ray.train.FailureConfig(max_failures=max_failures)))


class _Result:
    error = None


def _policy(monkeypatch, max_failures: int = 3):
    """The failure policy that the trainer hands Ray Train's controller."""
    seen = {}

    def controller(self, **kwargs):
        seen.update(kwargs)
        return _Result()

    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", controller)
    _trainer(max_failures).fit()
    return seen["failure_policy"]


def _group_error(**by_rank) -> WorkerGroupError:
    return WorkerGroupError("worker errors", {int(r[1:]): e for r, e in by_rank.items()})


@pytest.mark.parametrize("error", [DataError("corpus.jsonl: line 3: not JSON"),
                                   ConfigError("ckpt-00000004: written with model.dim=64, now 128"),
                                   CheckpointError("ckpt-00000004/__0_0.distcp: truncated"),
                                   TrainingStopped("step 7: 3 non-finite steps in a row")],
                         ids=lambda e: type(e).__name__)
def test_a_users_mistake_in_a_worker_is_not_retried(monkeypatch, error):
    policy = _policy(monkeypatch, max_failures=3)
    assert policy.make_decision(_group_error(r1=error)) == FailureDecision.RAISE
    # ... also beside another rank's collateral error, whichever rank comes first
    policy = _policy(monkeypatch, max_failures=3)
    assert policy.make_decision(_group_error(r0=RuntimeError("gloo: connection reset"), r1=error)) == \
        FailureDecision.RAISE


def test_a_users_mistake_wrapped_by_ray_is_not_retried(monkeypatch):
    wrapped = ray.exceptions.RayTaskError("read", "traceback", DataError("a.jsonl: line 1: bad"))
    assert _policy(monkeypatch).make_decision(_group_error(r0=wrapped)) == FailureDecision.RAISE


@pytest.mark.parametrize("error", [RuntimeError("injected failure at step 8 on rank 1"),
                                   StorageError("s3://b/run/ckpt-00000008", "connection reset")],
                         ids=["crash", "storage"])
def test_other_failures_are_retried_max_failures_times(monkeypatch, error):
    policy = _policy(monkeypatch, max_failures=2)
    decisions = [policy.make_decision(_group_error(r0=error)) for _ in range(3)]
    assert decisions == [FailureDecision.RETRY, FailureDecision.RETRY, FailureDecision.RAISE]


class _Controller:
    """Stands in for Ray Train's controller actor: `abort.remote()` is recorded."""

    def __init__(self):
        self.aborted = 0
        controller = self

        class _Abort:
            def remote(self):
                controller.aborted += 1
                return "abort-ref"

        self.abort = _Abort()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_ctrl_c_aborts_the_run_and_raises_keyboard_interrupt(monkeypatch):
    controller = _Controller()
    real_get = ray.get
    monkeypatch.setattr(ray, "get", lambda ref, **kw: None if ref == "abort-ref" else real_get(ref, **kw))
    went_on = []

    def run(self, **kwargs):
        self._register_sigint_handler(controller)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the handler runs here
        went_on.append(True)
        return _Result()

    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", run)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _trainer().fit()
    assert controller.aborted == 1 and not went_on
    # The driver's own handler is back: Ray's would swallow the next Ctrl-Cs (and keep the
    # finished controller alive through its closure).
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_the_drivers_sigint_handler_is_back_after_a_finished_run(monkeypatch):
    def run(self, **kwargs):
        self._register_sigint_handler(_Controller())
        return _Result()

    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", run)
    # Python's own handler as the driver's, whatever an earlier test in this process left there.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _trainer().fit()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C after training (samples, the next stage) stops it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, before)
