"""Ray Train's controller on a local cluster that this process started (raylm.train_ray.trainer_class).

Imported only there: it imports Ray Train's internals, which move between Ray versions (the
caller falls back to Ray's own controller where this import fails)."""

from __future__ import annotations

import os

from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE
from ray.train.v2._internal.execution.controller import TrainController


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
