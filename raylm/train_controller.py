"""Ray Train's controller on a local cluster that this process started, and the failure policy
of every raylm run (raylm.train_ray.trainer_class).

Imported only there: it imports Ray Train's internals, which move between Ray versions (the
caller falls back to Ray's own controller and policy where this import fails). It runs in the
controller's process too, so it imports no torch (raylm.train_backend)."""

from __future__ import annotations

import os

from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

from raylm.errors import StorageError, UserError


class LocalTrainController(TrainController):
    """Ray Train's controller, less the settings it would pass on. Its own settings and its
    workers' come from the environment the cluster was started with (raylm.pipeline.LOCAL_ENV),
    which every process of the cluster inherits. Ray Train's controller hands every RAY_TRAIN_*
    variable it finds in its environment to the workers again, as a runtime_env, and an actor
    with a runtime_env of its own never starts on one of the Python processes Ray keeps started:
    it waits for a new one through the runtime-env agent. Read here (the preemption watcher's
    switch is read in __init__), they are then dropped from this process only. The one read
    later, RAY_WARN_BLOCKING_GET_INSIDE_ASYNC=0 (this async actor's blocking ray.get calls are
    Ray Train's own), stays in force as Ray's "warned once already" flag."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        import ray._private.worker as ray_worker

        if os.environ.get("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC") == "0":
            ray_worker.blocking_get_inside_async_warned = True
        for name in ENV_VARS_TO_PROPAGATE:
            os.environ.pop(name, None)


def user_error(error: BaseException) -> BaseException | None:
    """The user's mistake (a raylm `UserError`) behind a worker group's failure, if any worker
    failed with one; None otherwise. Ray's wrappers are looked through (`cause`, `__cause__`
    of Ray's own exception types), as the CLI's `_root_cause` does. A `StorageError` does not
    count: a connection cut or a throttled request is what a retry is for."""
    pending = list((getattr(error, "worker_failures", None) or {}).values()) or [error]
    seen = set()
    while pending:
        e = pending.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            if not isinstance(e, StorageError):
                return e
            continue
        from_ray = type(e).__module__.split(".")[0] == "ray"
        inner = getattr(e, "cause", None) or (e.__cause__ if from_ray else None)
        if isinstance(inner, BaseException):
            pending.append(inner)
    return None


class UserErrorsFailFast(DefaultFailurePolicy):
    """Ray Train's failure policy (`FailureConfig.max_failures` restarts of the worker group),
    except that a worker failing with a user's mistake ends the run at once: a bad record, a
    config a checkpoint refuses, a damaged checkpoint or a guard's stop (`TrainingStopped`) fail
    the same way in every restarted group, which would reload the model and the data
    `max_failures` times before the run ended with the same one line."""

    def make_decision(self, training_failed_error) -> FailureDecision:
        if user_error(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)
