"""What `raylm pretrain` and `raylm sft` say, and leave in the run, when a training worker is
killed (SIGKILL, as the OOM killer does) and --max-failures 0 allows no restart: real 2-worker
Ray Train runs through the CLI's own `main`, with the runs in S3 (SeaweedFS).

  - The error is one line naming the rank that died, Ray's reason and the checkpoint the same
    command resumes from, exit 2; no traceback and no "this is a bug in raylm" (a dead worker
    is not one). A worker's own exception keeps its traceback (tests/unit/test_training_failure_report.py).
  - Nor does what Ray's processes print meanwhile (shown above that line) hold a traceback:
    not the torch backend's shutdown of the dead worker's process group, nor the surviving
    rank's collective that lost its peer. Their log files keep them.
  - A run that had finished before (its summary.json written) and is continued to more steps
    no longer has a summary.json once the continuation fails: a summary means finished.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from raylm import cli, storage
from raylm import synthetic as S
from tests.small import SMALL

pytestmark = pytest.mark.integration

# Synchronous saves: the step-2 checkpoint is committed before the step-3 kill, whatever the
# machine's speed. timeout_s: a hung run fails instead of blocking CI.
SCHEDULE = ["train.max_steps=4", "train.ckpt_every=2", "train.log_every=1", "train.eval_every=100",
            "train.async_checkpoint=false", "train.timeout_s=300"]
KILL = "step=3,rank=1,kind=sigkill"


def finished_before(argv: list[str], run_dir: str, s3) -> None:
    """An earlier run of `raylm ARGV` that finished at step 2 (its checkpoint and summary.json
    written), which the killed run continues to step 4."""
    assert cli.main([*argv, "train.max_steps=2"]) == 0
    assert storage.exists(storage.join(run_dir, "summary.json"), s3)
    assert storage.exists(storage.join(run_dir, "ckpt-00000002", "COMMITTED"), s3)


def ray_consoles() -> dict[Path, int]:
    """The stderr files of the cluster's Ray processes (its Train controller and workers among
    them), with their sizes: what Ray forwards to the driver's console, which prints it as it
    arrives (some after the command returned)."""
    import ray._private.worker as ray_worker

    logs = Path(ray_worker._global_node.get_logs_dir_path())
    return {p: p.stat().st_size for p in logs.glob("worker-*.err")}


def printed_since(sizes: dict[Path, int]) -> str:
    """What Ray's processes wrote to their stderr since `ray_consoles` gave `sizes`."""
    out = []
    for path, size in ray_consoles().items():
        with path.open("rb") as f:
            f.seek(sizes.get(path, 0))
            out.append(f.read().decode(errors="replace"))
    return "".join(out)


def killed(argv: list[str], monkeypatch, capfd) -> tuple[int, str]:
    """`raylm ARGV` with rank 1 killed after step 3; returns (exit status, stderr), and checks
    that what Ray's processes printed meanwhile holds no traceback."""
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", KILL)
    capfd.readouterr()
    before = ray_consoles()
    status = cli.main(argv)
    monkeypatch.delenv("RAYLM_INJECT_FAILURE")
    ray_printed = printed_since(before)
    assert "Traceback" not in ray_printed, ray_printed[-6000:]
    return status, capfd.readouterr().err


def one_line(status: int, err: str, run_dir: str, resumes_from: str) -> None:
    # Lines of Ray's processes (the workers' and controller's logs) come prefixed "(Name pid=N)".
    own = [line for line in err.splitlines() if line.strip() and not re.match(r"(\x1b\[\d+m)?\(", line)]
    assert status == 2, err[-4000:]
    assert "this is a bug in raylm" not in err and not any(line.startswith("Traceback") for line in own), err[-4000:]
    said = [line for line in own if line.startswith("raylm: error:")]
    assert len(said) == 1, own
    pattern = (r"raylm: error: training failed after 0 restarts \(--max-failures 0\): a worker died \(rank 1, "
               r"pid \d+: .+\); the same command resumes from " + re.escape(resumes_from) + "$")
    assert re.match(pattern, said[0]), said[0]
    assert storage.exists(storage.join(run_dir, "injected-failure-3")), "the failure was never injected"


def test_a_killed_worker_is_one_line_and_leaves_no_summary(prepared, tmp_path, monkeypatch, capfd):
    """Pre-training, then SFT from the checkpoint it left."""
    base, data_dir, _ = prepared
    run_dir = storage.join(base.storage, "continued")
    argv = ["pretrain", "--no-samples", "--max-failures", "0", "--data", data_dir, f"storage={base.storage}",
            "name=continued", f"tokenizer.path={base.tokenizer.path}", *SMALL, *SCHEDULE]
    finished_before(argv, run_dir, base.s3)
    status, err = killed(argv, monkeypatch, capfd)
    one_line(status, err, run_dir, storage.join(run_dir, "ckpt-00000002"))
    assert not storage.exists(storage.join(run_dir, "summary.json"), base.s3), "the old run's summary is still there"

    records = S.write_jsonl(str(tmp_path), "reverse", 200, 10, seed=0, length=3)["train.messages"]
    sft_dir = storage.join(base.storage, "continued-sft")
    workers = [o for o in SMALL if o.startswith(("train.num_workers", "train.cpus_per_worker", "train.micro_batch",
                                                  "train.global_batch"))]
    argv = ["sft", "--from", run_dir, "--data", records, "--max-failures", "0", f"storage={base.storage}",
            "data.val_fraction=0.1", "train.eval_batches=1", *workers, *SCHEDULE]
    finished_before(argv, sft_dir, base.s3)
    status, err = killed(argv, monkeypatch, capfd)
    one_line(status, err, sft_dir, storage.join(sft_dir, "ckpt-00000002"))
    assert not storage.exists(storage.join(sft_dir, "summary.json"), base.s3), "the old run's summary is still there"
    assert json.loads(storage.read_text(storage.join(sft_dir, "record.json"), base.s3))["stage"] == "sft"
