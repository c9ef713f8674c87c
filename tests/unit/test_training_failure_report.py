"""What a user reads when training fails, without a cluster:
  - a worker whose process died (SIGKILL, the OOM killer, a lost node) once the restarts
    --max-failures allows are used up is one line naming the rank, Ray's reason and the
    checkpoint the same command resumes from, with Ray's error beneath it for --debug; a
    rank's own exception (raylm's bug, a user's mistake) is left as it is;
  - a checkpoint whose meta.json lacks a field that resuming reads, behind a commit marker
    without digests (older raylm), is refused in one line naming the file and the field.
The exceptions are Ray 2.60's own types, built as its Train controller builds them; the
integration twin (tests/integration/test_killed_worker_report.py) gets them from a real
worker killed mid-run."""

from __future__ import annotations

import json
import os
import traceback

import pytest
from ray.core.generated.common_pb2 import ActorDiedErrorContext
from ray.exceptions import ActorDiedError
from ray.train import WorkerGroupError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

from raylm import cli
from raylm.config import load_config
from raylm.errors import CheckpointError, DataError, UserError
from raylm import train_ray
from raylm.train import train_local
from tests.unit.test_train_local import OVERRIDES, blocks

# Ray's words for a worker process that vanished (a SIGKILL on Linux), as Ray 2.60 says them.
DIED = ("The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
        "Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the "
        "process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the "
        "worker crashed unexpectedly due to SIGSEGV or another unexpected error.")
LOG = "/tmp/ray/session_x/logs/train/ray-train-app-worker-1.log"


def death(pid: int = 4242) -> WorkerHealthCheckFailedError:
    """A failed health check of a worker whose process is gone (raylm's Ray Train poll)."""
    actor = ActorDiedError(ActorDiedErrorContext(error_message=DIED, class_name="RayTrainWorker", actor_id=b"\1" * 16,
                                                 pid=pid, node_ip_address="127.0.0.1"))
    return WorkerHealthCheckFailedError(f"A worker health check failed.\nWorker info: Worker(pid={pid}, "
                                        f"log_file_path='{LOG}')", failure=actor)


def collateral() -> RuntimeError:
    """What the surviving rank raises meanwhile: its collective lost its peer."""
    return RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:38811")


def group_error(failures: dict) -> WorkerGroupError:
    return WorkerGroupError("\n".join(f"[Rank {r} Error Snippet]:\n{e}" for r, e in failures.items()), failures)


def reported(run_dir, error: BaseException, max_failures: int) -> BaseException | None:
    """The error a training stage raises for Ray Train's `error`, or None where it re-raises it."""
    cfg = load_config(overrides=[f"storage={os.path.dirname(run_dir)}", f"name={os.path.basename(run_dir)}"])
    try:
        raise error
    except Exception as e:
        try:
            train_ray.raise_if_worker_died(cfg, e, max_failures)
        except train_ray.WorkerDiedError as said:
            return said
    return None


def commit(run_dir, step: int) -> str:
    """A complete checkpoint as the run directory lists it (its commit marker)."""
    ckpt = os.path.join(run_dir, f"ckpt-{step:08d}")
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, "COMMITTED"), "w") as f:
        json.dump({"step": step}, f)
    return ckpt


def test_a_dead_worker_is_one_line_naming_rank_reason_and_resume_point(tmp_path):
    run_dir = str(tmp_path / "run")
    commit(run_dir, 2)
    newest = commit(run_dir, 4)
    os.makedirs(os.path.join(run_dir, "ckpt-00000006"))  # not committed: never resumed from
    error = group_error({0: collateral(), 1: death()})
    said = reported(run_dir, error, max_failures=2)
    assert isinstance(said, train_ray.WorkerDiedError) and isinstance(said, UserError)
    assert str(said) == (f"training failed after 2 restarts (--max-failures 2): a worker died (rank 1, pid 4242: "
                         f"Worker unexpectedly exits with a connection error code 2. End of file; its log: {LOG}); "
                         f"the same command resumes from {newest}")
    # The CLI prints it as it is (one line, exit 2), and --debug's traceback still has Ray's error.
    assert cli._root_cause(said) is said and isinstance(said, cli.USER_ERRORS)
    assert "\n" not in str(said)
    assert said.__cause__ is error
    assert "WorkerGroupError" in "".join(traceback.format_exception(said))


def test_a_dead_worker_before_any_checkpoint_resumes_from_the_start(tmp_path):
    said = reported(str(tmp_path / "fresh"), group_error({0: death(7)}), max_failures=0)
    assert str(said).startswith("training failed after 0 restarts (--max-failures 0): a worker died (rank 0, pid 7: ")
    assert str(said).endswith("; the same command resumes from the start")


@pytest.mark.parametrize("failures", [
    {0: collateral()},  # raylm's own exception in a worker: a bug, with its traceback
    {0: ValueError("raylm's bug"), 1: collateral()},
    {0: DataError("corpus.jsonl: line 3: not JSON"), 1: death()},  # the user's mistake says more
], ids=["crash", "bug", "user-error-beside-a-death"])
def test_anything_but_a_dead_worker_is_left_as_it_is(tmp_path, failures):
    assert reported(str(tmp_path / "run"), group_error(failures), max_failures=1) is None


@pytest.mark.parametrize("field", ["consumed_blocks", "world_size"])
def test_resuming_a_meta_json_without_a_field_is_one_line(tmp_path, field):
    """A commit marker without digests (written before raylm recorded them) does not seal
    meta.json: one without a field that resuming reads was a KeyError traceback."""
    common = [f"storage={tmp_path}", "name=r", "train.async_checkpoint=false", *OVERRIDES]
    train_local(load_config(overrides=["train.max_steps=3", *common]), blocks(40, 0), blocks(8, 1), log=lambda *_: None)
    ckpt = tmp_path / "r" / "ckpt-00000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta[field]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    (ckpt / "COMMITTED").write_text(json.dumps({"step": 3}))
    with pytest.raises(CheckpointError, match=rf"^{ckpt}/meta.json: no '{field}' field \(a damaged or altered"):
        train_local(load_config(overrides=["train.max_steps=5", *common]), blocks(40, 0), blocks(8, 1),
                    resume="must", log=lambda *_: None)
