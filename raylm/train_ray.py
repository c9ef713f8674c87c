"""Ray Train wiring: `run_ray_training` starts `train_worker` on Ray Train workers, and each
worker feeds `raylm.train.fit` from its Ray Data shards and reports through `ray.train.report`.

Everything that knows about Ray Train lives here; the loop itself (raylm.train) runs the
same way without Ray (`train_local`). Where this process started the cluster, the trainer
leaves out what only a shared cluster needs (`trainer_class`, raylm.train_controller,
raylm.train_backend).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import time
import warnings
from typing import Iterator

import numpy as np
import torch

from raylm import checkpoint, run_lock, storage
from raylm.batches import (Batch, RankBatches, concat, manifest_columns, rank_val_batches, reshuffled, row_bytes,
                           val_set_rows)
from raylm.config import Config, from_dict, to_dict
from raylm.data import IN_MEMORY_BYTES, packed_blocks
from raylm.errors import DataError, UserError
from raylm.objectives import make_objective
from raylm.train import Hooks, broadcast, rank_world, checkpoint_facts, device_name, fit, reference_model, setup_model


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report at INFO on every rank; the run's own progress line says it once."""
    # Some Ray Train modules name their logger by file path rather than module name.
    names = [n for n in logging.root.manager.loggerDict if n.startswith("ray.train") or "/ray/train/" in n]
    for name in ["ray.train", *names]:
        logging.getLogger(name).setLevel(logging.WARNING)
    # A bad record met here ends the run with raylm's one line; Ray's traceback of it would bury that.
    from raylm.pipeline import quiet_ray_chatter, quiet_ray_data, quiet_user_errors

    quiet_user_errors()
    for h in logging.getLogger("ray.train").handlers:
        console = isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        if console and not any(isinstance(f, _QuietPeerDeath) for f in h.filters):
            h.addFilter(_QuietPeerDeath())
    quiet_ray_chatter()
    quiet_ray_data()
    # Weights are initialised on the meta device then materialised per shard; DTensor's RNG
    # caveat on CPU meshes concerns random ops on sharded tensors, which init avoids
    # (`init_weights` runs before sharding's collectives matter: see tests/integration/test_fsdp_parity.py).
    warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")


# What a collective says on a rank whose peer's process died mid-step (gloo over TCP).
PEER_DIED = re.compile(r"Connection (closed|reset) by peer")


class _QuietPeerDeath(logging.Filter):
    """Keeps off the console Ray Train's traceback of this rank's failure ("Error in training
    function") when it is a collective whose peer's process died (killed, out of memory): that
    rank is the news, and the driver's one line names it (`raise_if_worker_died`) with its log.
    Every other failure keeps its traceback; the worker's Ray Train log file keeps this one too."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Ray logs it from inside its `except` block without attaching the exception.
        e = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        for _ in range(8):  # the exception and what it was raised from
            if e is None:
                return True
            if isinstance(e, RuntimeError) and PEER_DIED.search(str(e)):
                return False
            e = e.__cause__ or e.__context__
        return True


def ray_report_interval_s() -> float:
    """How often Ray Train's controller takes a report from each worker: it polls every
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and a worker's result queue holds one."""
    try:
        return max(0.0, float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
    except ValueError:
        return 2.0


def record_training_hardware(cfg: Config, device: torch.device, rank: int, world: int,
                             fence: dict | None = None) -> None:
    """Rank 0 adds what trains to the run's record (raylm.record.add_training_hardware): the
    driver recorded its own machine, often a CPU-only head node or a laptop. A collective
    where world > 1 (each rank's Ray node, for the count of nodes): every rank calls it.
    `fence`: the driver's hold on the run (raylm.run_lock.fence_for), checked before the
    rewrite, as before every other write of a worker: a lost driver's worker otherwise wrote
    its read of record.json back over the one a new holder had just written."""
    from raylm.record import add_training_hardware, training_hardware

    nodes = ["this"]
    if world > 1:
        import ray
        import torch.distributed as dist

        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0:
        run_lock.check_fence(fence, cfg.s3)
        add_training_hardware(cfg.run_dir, training_hardware(nodes, device.type), cfg.s3)


class ReportPacer:
    """Which metric rows go to `ray.train.report`. Ray Train takes one report per worker per
    controller poll (`ray_report_interval_s`); a report beyond that rate blocks the step until
    the next poll, and with async checkpoints it queues the next checkpoint's upload behind it
    (a run logging every step waited 24 s for its last checkpoint). So a row of training
    metrics only goes once an interval has passed since the last report; one that comes
    sooner is not sent (a later one carries newer figures; every row still reaches
    metrics.jsonl and the log). Rows with
    evaluation results (what Tune schedules on) always go, as do checkpoints (`sent`). A
    report is a collective across ranks in Ray Train, so rank 0's clock decides for all."""

    def __init__(self, interval_s: float, clock=time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self.last = -math.inf

    def due(self, row: dict) -> bool:
        now = self.clock()
        go = any(k.startswith(("val_", "eval_")) for k in row) or now - self.last >= self.interval_s
        go = broadcast(go)
        if go:
            self.last = now
        return go

    def sent(self) -> None:
        self.last = self.clock()


def train_worker(config: dict) -> None:
    """Per-worker entry for TorchTrainer. `config` carries the resolved Config as a dict,
    the prepared dataset's manifest, and the resume mode."""
    import ray.train
    import ray.train.torch

    _quiet_ray_train_logs()
    cfg = from_dict(config["cfg"])
    manifest, resume = config["manifest"], config["resume"]
    rank, world = rank_world()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = cfg.for_device(device.type)  # "auto" settings: on for CUDA, off for CPU
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    log = print if rank == 0 else (lambda *_: None)
    model, optimizer, start = setup_model(cfg, device, resume, log)
    # after setup, which may still refuse the run
    record_training_hardware(cfg, device, rank, world, config.get("fence"))
    tc = cfg.train
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    streaming = manifest.get("mode") == "stream"
    columns = manifest_columns(manifest)

    def rows_from(shard, split: str, batch: int) -> Iterator[Batch]:
        """Batches of `batch` rows of a split, the last one short where the rows run out,
        from prepared shards or, under data.mode=stream, packed here from the tokenized
        documents (`packed_blocks`, the code that writes prepared shards, so both modes give
        the same blocks)."""
        if not streaming:
            # device="cpu": Ray Train's default moves batches to the worker's GPU, and the kept
            # first pass and validation rows would then sit in device memory.
            for b in shard.iter_torch_batches(batch_size=batch, prefetch_batches=2, device="cpu"):
                yield {c: b[c] for c in columns}
            return
        docs = shard.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2)
        rows: list[np.ndarray] = []
        for _, block, _ in packed_blocks(docs, cfg.data, manifest["eos_id"], manifest["seed"], splits=(split,)):
            rows.append(block)
            if len(rows) == batch:
                yield {"tokens": torch.from_numpy(np.stack(rows))}
                rows = []
        if rows:
            yield {"tokens": torch.from_numpy(np.stack(rows))}

    # A small training set is kept after its first pass: each later epoch would otherwise
    # start a new Ray Data execution in this process, whose threads compete with training.
    # Prepared shards state their size; a stream finds out, and stops keeping once it is over.
    # Kept epochs after the first come in a fresh order (`reshuffled`) of all the rows, the
    # short batch after the last full one too, so no block waits in every epoch; a run resumed
    # in one reads the whole pass first, so that it sees that epoch's order too. Kept batches
    # stay in host memory: each micro-batch goes to the device as it is used. A set too large
    # to keep is read in its prepared order every epoch.
    first_pass: list[Batch | None] = []
    small = streaming or manifest["train"]["blocks"] * row_bytes(manifest) < IN_MEMORY_BYTES

    def read_pass():
        nonlocal small
        first_pass.clear()
        kept = 0
        for batch in rows_from(train_shard, "train", tc.global_batch_size):
            if small:
                kept += sum(v.numel() * v.element_size() for v in batch.values())
                if kept < IN_MEMORY_BYTES:
                    first_pass.append(batch)
                else:
                    small = False
                    first_pass.clear()
            # A step takes a full global batch: the short last one is kept, never trained as it is.
            if len(next(iter(batch.values()))) == tc.global_batch_size:
                yield batch
        if small:
            first_pass.append(None)  # marks the pass complete

    def epoch_stream(epoch: int):
        if epoch > 0 and small and not (first_pass and first_pass[-1] is None):
            for _ in read_pass():
                pass
        if first_pass and first_pass[-1] is None:
            yield from reshuffled(first_pass[:-1], cfg.seed, epoch)
            return
        yield from read_pass()

    val_cache: list[Batch] = []

    def val_batches():
        # The validation rows are read once and kept: re-running a Ray Data execution for
        # every evaluation costs far more than the evaluation itself. Every worker reads the
        # same first rows (the val split is not split over workers) and takes its share.
        if not val_cache:
            want = val_set_rows(tc)
            for b in rows_from(val_shard, "val", min(want, 1024)):
                val_cache.append(b)
                if sum(len(x[columns[0]]) for x in val_cache) >= want:
                    break
            if not val_cache:
                raise DataError(f"{cfg.data.val_path or cfg.data.path}: validation split is empty; raise "
                                f"data.val_fraction (now {cfg.data.val_fraction}) or set data.val_path")
            val_cache[:] = [concat(val_cache)]  # once, not at every evaluation
        return rank_val_batches(val_cache[0], tc, rank, world, device)

    pace = ReportPacer(ray_report_interval_s())

    def copy(ckpt, dir_name: str):
        """The checkpoint into the run: Ray's copy (pyarrow) to object storage; into a local
        run directory raylm's, which replaces a link found at a file's name rather than writing
        through it as pyarrow's does, and a link at the checkpoint's own directory too (in a
        shared run directory, anyone who can write there could have planted either)."""
        context = ray.train.get_context().get_storage()
        if storage.is_s3(cfg.run_dir):
            return context.persist_current_checkpoint(ckpt, dir_name)
        target = storage.join(cfg.run_dir, dir_name)
        storage.unlink_link(target)
        storage.upload_dir(ckpt.path, target)
        return ray.train.Checkpoint(path=context.build_checkpoint_path_from_name(dir_name),
                                    filesystem=context.storage_filesystem)

    def publish(local_dir: str, name: str, metrics: dict, written, on_uploaded) -> None:
        pace.sent()  # this report carries the newest metrics too
        ckpt = ray.train.Checkpoint.from_directory(local_dir)
        if on_uploaded is None:
            ray.train.report({**metrics, "checkpoint": name}, checkpoint=ckpt, checkpoint_dir_name=name,
                             checkpoint_upload_fn=copy)
            return

        def upload(ckpt, dir_name: str):  # runs in Ray Train's upload thread
            if written is not None:
                written.result()  # DCP's background write has finished
            persisted = copy(ckpt, dir_name)
            files = checkpoint.file_digests(local_dir)
            # Durable here, not at the commit: on a local disk, flushing a large checkpoint
            # would otherwise stall the training thread that writes the marker.
            storage.make_durable(storage.join(cfg.run_dir, dir_name), cfg.s3, names=files)
            on_uploaded(files=files)
            return persisted

        # Ray retries a failed upload and, after the last attempt, fails this worker (the
        # worker group restarts or the run ends); the uncommitted checkpoint is never loaded.
        ray.train.report({**metrics, "checkpoint": name}, checkpoint=ckpt, checkpoint_dir_name=name,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=upload, delete_local_checkpoint_after_upload=True)

    # A stream's length is learnt at the end of its first pass; prepared shards state theirs.
    batches = RankBatches(epoch_stream, tc.global_batch_size, tc.micro_batch_size, rank, world,
                          None if streaming else manifest["train"]["blocks"], start.consumed, device)
    def report(metrics: dict) -> None:
        if not pace.due(metrics):
            return
        # Ray delivers reports in order: a synchronous one would wait for an async
        # checkpoint upload still in flight, stalling training after all.
        mode = ray.train.CheckpointUploadMode.ASYNC if tc.async_checkpoint else ray.train.CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint_upload_mode=mode)

    # Validation blocks are read before training starts: a stream's validation execution
    # would otherwise start beside the training one, and together their tokenizer actors can
    # hold every CPU Ray has left for read tasks.
    val_batches()
    fence = config.get("fence")  # the driver's hold on the run (raylm.run_lock.fence_for)
    hooks = Hooks(report=report, publish_checkpoint=publish, val_batches=val_batches,
                  checkpoint_meta=checkpoint_facts(cfg, manifest),
                  fence=(lambda: run_lock.check_fence(fence, cfg.s3)) if fence else None)
    fit(cfg, model, optimizer, make_objective(cfg, manifest, reference_model(cfg, device)), batches, hooks, start,
        device_name(device), log)


def trainer_class():
    """TorchTrainer with raylm's failure handling, on any cluster:
      - a worker failing with a user's mistake (a raylm `UserError`, such as a bad record or a
        checkpoint that refuses the config) ends the run at once, not after `max_failures`
        restarts that fail the same way (raylm.train_controller.UserErrorsFailFast);
      - Ctrl-C aborts the run (its workers stopped, as Ray's own handler does) and reaches the
        caller as KeyboardInterrupt, where Ray's handler ended the process with SystemExit;
        and the driver's own SIGINT handler is back once `fit` returns (Ray's stayed, holding
        the finished controller alive and swallowing the next two Ctrl-Cs, the third one
        exiting with status 0).
    On a local cluster that this process started, also less its placement-group cleaner. The
    cleaner is a detached actor that asks Ray's state API every second whether
    the run's controller still lives, to free the workers' placement group if it died without
    doing so; such a cluster ends with this process, and the poll cost about 3% of a core
    through a run on 2 cores (the cleaner, the dashboard answering it, the GCS), besides an
    actor's start before the first step. Tune trials run in actors of their own and keep it:
    an early-stopped trial's controller dies with its trial. Its controller, and the actors
    that start from it, get no runtime_env (raylm.train_controller), and its backend config
    does not make it import torch (raylm.train_backend)."""
    import signal

    import ray
    from ray.train.torch import TorchTrainer

    from raylm.pipeline import started_env

    try:
        from raylm.train_controller import UserErrorsFailFast
    except ImportError:  # a Ray version that moved its failure policies: Ray's own
        UserErrorsFailFast = None

    class RaylmTorchTrainer(TorchTrainer):
        _interrupted = False

        def fit(self):
            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGINT) if main else None
            self._interrupted = False
            try:
                return super().fit()
            except (KeyboardInterrupt, SystemExit):
                if self._interrupted:  # Ray turns an exception raised in the handler into SystemExit
                    raise KeyboardInterrupt from None
                raise
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)

        def _register_sigint_handler(self, controller):
            def on_sigint(signum, frame):
                if not self._interrupted:
                    self._interrupted = True
                    try:  # stops the workers, then ends the controller's process
                        ray.get(controller.abort.remote())
                    except ray.exceptions.RayActorError:
                        pass
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, on_sigint)

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if UserErrorsFailFast is not None:
                controller_init_kwargs["failure_policy"] = UserErrorsFailFast(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        from raylm.train_backend import LocalTorchConfig
    except ImportError:  # a Ray version that moved them: Ray's own
        return RaylmTorchTrainer
    if started_env() is None:
        return RaylmTorchTrainer

    class LocalTorchTrainer(RaylmTorchTrainer):
        def __init__(self, *args, torch_config=None, **kwargs):
            # The same process group, set up by a controller that does not import torch
            # (raylm.train_backend): about 2.5 s sooner to the first step on 2 cores.
            super().__init__(*args, torch_config=torch_config or LocalTorchConfig(), **kwargs)

        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            # Ray's own path gives the controller a runtime_env (one setting, which the
            # cluster's environment already holds here: raylm.pipeline.LOCAL_ENV), and every
            # actor the controller starts inherits it: the synchronization actor, the workers
            # and the dataset manager then each wait for a new process through the runtime-env
            # agent, one after another, where they could start on the processes Ray keeps
            # started. Where the driver holds Ray Train settings of its own, Ray's path.
            try:
                from ray.train.v2._internal.constants import get_env_vars_to_propagate

                from raylm.train_controller import LocalTrainController
            except ImportError:  # a Ray version that moved its internals
                return super()._initialize_and_run_controller(**controller_init_kwargs)
            if get_env_vars_to_propagate():
                return super()._initialize_and_run_controller(**controller_init_kwargs)
            if UserErrorsFailFast is not None:
                controller_init_kwargs["failure_policy"] = UserErrorsFailFast(self.run_config.failure_config)
            here = {ray._raylet.RAY_NODE_ID_KEY: ray.get_runtime_context().get_node_id()}
            controller = ray.remote(num_cpus=0, label_selector=here)(LocalTrainController).remote(
                **controller_init_kwargs)
            if threading.current_thread() is threading.main_thread():
                self._register_sigint_handler(controller)
            ray.get(controller.run.remote())
            return ray.get(controller.get_result.remote())

    return LocalTorchTrainer


# The driver's environment variables that training workers inherit (never secrets).
WORKER_SETTINGS = ("RAYLM_INJECT_FAILURE", "RAYLM_LOCAL_CLUSTER")


def worker_runtime_env() -> dict | None:
    """raylm's settings for the training workers, passed as a runtime_env only where they
    need one: the workers of a local cluster that this process started inherit the
    environment it was started with, and a runtime_env would keep them off the workers Ray
    starts ahead of time (raylm.pipeline.init_ray). A setting changed since then is passed
    ("" stands for unset)."""
    from raylm.pipeline import started_env

    env = {k: os.environ.get(k, "") for k in WORKER_SETTINGS}
    started = started_env()
    if started is not None:
        env = {k: v for k, v in env.items() if started.get(k, "") != v}
    env = {k: v for k, v in env.items() if v or started is not None}
    return {"env_vars": env} if env else None


class WorkerDiedError(UserError, RuntimeError):
    """Training ended because a worker's process died (killed, out of memory, its node lost)
    after the restarts --max-failures allows: most often the machine's doing, and the same
    command resumes from the newest complete checkpoint. One line at the CLI, as every UserError;
    --debug shows Ray's error beneath it."""


def raise_if_worker_died(cfg: Config, error: BaseException, max_failures: int) -> None:
    """Raise WorkerDiedError (from `error`) when `error`, a Ray Train run's failure, is a
    worker's process dying. Anything else stays as it is: a rank's own exception (raylm's bug
    keeps its traceback; a user's mistake, its one line) says more than a peer's death."""
    died = dead_worker(error)
    if died is None:
        return
    try:
        found = checkpoint.latest_complete(cfg.run_dir, cfg.s3)
    except UserError:  # storage unreachable just now: the failure is still the news
        found = "its newest complete checkpoint"
    restarts = f"after {max_failures} restart{'s' if max_failures != 1 else ''} " if max_failures >= 0 else ""
    raise WorkerDiedError(f"training failed {restarts}(--max-failures {max_failures}): a worker died ({died}); "
                          f"the same command resumes from {found or 'the start'}") from error


def dead_worker(error: BaseException) -> str | None:
    """Which rank's process died and Ray's reason, in a few words, where a Ray Train run
    failed because one did (Ray 2.60: `WorkerGroupError.worker_failures` holds, for that rank,
    a failed health check whose `health_check_failure` is a `RayActorError`; the other ranks
    fail meanwhile in a collective their peer left). None otherwise, and where any rank failed
    with a user's mistake."""
    from ray.exceptions import RayActorError

    failures = getattr(error, "worker_failures", None)
    if not isinstance(failures, dict) or any(isinstance(f, UserError) for f in failures.values()):
        return None
    for rank in sorted(failures):
        failure = failures[rank]
        actor_error = getattr(failure, "health_check_failure", failure)
        if isinstance(actor_error, RayActorError):
            return f"rank {rank}{_death_details(str(actor_error), str(failure))}"
    return None


def _death_details(said: str, health_check: str) -> str:
    """", pid P: <reason>; its log: <path>" from the words of Ray's error and health check."""
    pid = re.search(r"^\s*pid: (\d+)$", said, re.M)
    lines = [line.strip() for line in said.splitlines()
             if line.strip() and not line.startswith("\t") and not line.startswith("The actor died unexpectedly")]
    reason = " ".join(lines).split(" Some common causes")[0]
    reason = reason.split("Worker exit detail: ", 1)[-1].removeprefix("The actor is dead because ").strip().rstrip(".")
    if len(reason) > 240:
        reason = reason[:240].rsplit(" ", 1)[0] + "..."
    log_file = re.search(r"log_file_path='([^']+)'", health_check)
    return ((f", pid {pid[1]}" if pid else "") + (f": {reason}" if reason else "")
            + (f"; its log: {log_file[1]}" if log_file else ""))


# Ray Train's list of the checkpoints reported to it, in the run directory (Ray 2.60's
# ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).
RAY_CHECKPOINT_LIST = "checkpoint_manager_snapshot.json"


def forget_ray_checkpoint_list(cfg: Config) -> None:
    """Remove Ray Train's list of the run's reported checkpoints before a new Train run starts
    in the run directory. Ray refuses to start a run whose list names a checkpoint that is
    gone, and raylm's retention (train.keep_checkpoints) deletes old ones: every resume after
    a deletion failed with Ray's traceback. raylm resumes from its own commit markers
    (raylm.checkpoint.latest_complete), never from Ray's list, which also names checkpoints
    that were never committed."""
    storage.delete(storage.join(cfg.run_dir, RAY_CHECKPOINT_LIST), cfg.s3)


def run_ray_training(cfg: Config, datasets: dict, manifest: dict, resume: str = "auto", max_failures: int = 0,
                     callbacks: list | None = None):
    """Launch `train_worker` on cfg.train.num_workers Ray Train workers; returns the Result.
    `datasets` ("train", "val") and `manifest` come from `raylm.data.prepared_datasets` or
    `raylm.data.stream_datasets`. `callbacks`: Ray Train callbacks, such as Tune's
    `TuneReportCallback` when the run is a trial of `raylm tune`."""
    import ray.train
    from ray.data import ExecutionOptions

    from raylm.pipeline import absolute_paths, resolve_workers

    # Workers do not share the driver's working directory; "auto" worker counts are resolved
    # by the stages before they log and record them, and here for any other caller.
    cfg = resolve_workers(absolute_paths(cfg))
    forget_ray_checkpoint_list(cfg)
    fs, root = storage.filesystem(cfg.storage, cfg.s3)
    trainer = trainer_class()(
        train_worker,
        # The driver's token on the run's lock: its workers write only while the lock carries it.
        train_loop_config={"cfg": to_dict(cfg), "manifest": manifest, "resume": resume,
                           "fence": run_lock.fence_for(cfg.run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=root, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures), callbacks=callbacks,
            # raylm's own settings of the driver reach the workers, by name: a runtime_env is
            # logged by Ray, so nothing secret (RAYLM_API_KEY) may ever be passed this way.
            worker_runtime_env=worker_runtime_env(),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        # Every worker reads the whole ordered stream and keeps its own rows (RankBatches):
        # block order and ownership stay a function of the data position, not of timing.
        # Token blocks are small next to the compute they feed, so reading them N times is cheap.
        dataset_config=ray.train.DataConfig(datasets_to_split=[],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    return trainer.fit()
