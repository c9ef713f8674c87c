"""A run's workers stop writing once another process holds the run (fencing).

A driver's Ray Train workers outlive its hold on the run: SIGKILLed, the driver lets go of its
lock at once while its workers run on until Ray kills them (1-2.5 s here), and a driver
restarted meanwhile holds the run while they still append metrics and commit a checkpoint
(seen: ckpt-4 committed 2 s after the new holder took the lock). On S3 a lease's holder writes
on until its renewal finds the lease taken.

The test makes that window as long as it likes, without timing: `raylm pretrain` (a real
driver, its own local Ray cluster, one worker) trains with a checkpoint every other step;
once it has committed one, its whole process group (driver, Ray, worker) is stopped, the
lock is taken from this process (the driver's lock file removed first, since a stopped
driver still holds it), and the group is let go on. The old run must write nothing more into
the run directory: no checkpoint committed, no metrics row, and it ends with one line saying
another process holds the run. Before fencing, it trained on and committed every checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from raylm import checkpoint, run_lock
from tests.small import SMALL

pytestmark = pytest.mark.integration

STEPS = 40  # far more than the worker can take between the first commit and the stop
SETTINGS = [s for s in SMALL if not s.startswith(("train.num_workers=", "train.cpus_per_worker="))] + [
    "train.num_workers=1", "train.cpus_per_worker=1", f"train.max_steps={STEPS}", "train.ckpt_every=2",
    "train.log_every=1", "train.eval_every=1000", f"train.keep_checkpoints={STEPS}", "train.timeout_s=300"]
TIMEOUT_S = 420  # one `raylm pretrain` on 2 busy cores: Ray start-up, corpus, tokenizer, steps


def committed(run_dir: str) -> list[int]:
    return [step for step, _, done in checkpoint.list_checkpoints(run_dir) if done]


def metrics(run_dir: str) -> bytes:
    path = os.path.join(run_dir, "metrics.jsonl")
    return open(path, "rb").read() if os.path.exists(path) else b""


def test_workers_of_a_driver_that_lost_the_run_write_nothing_more(tmp_path):
    run_dir = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYLM_INJECT_FAILURE")}
    # a Ray temp dir of its own (short: Ray's socket paths must fit 107 bytes)
    env.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="rlm", dir="/tmp"), PYTHONUNBUFFERED="1")
    log = tmp_path / "driver.log"
    command = [sys.executable, "-m", "raylm.cli", "pretrain", "--no-samples", f"storage={tmp_path}", "name=run",
               *SETTINGS]
    with open(log, "wb") as out:
        driver = subprocess.Popen(command, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    group = driver.pid  # the driver and every process of its Ray cluster
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not committed(run_dir):  # the holder commits as before
            assert driver.poll() is None, f"the driver exited ({driver.returncode})\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint within {TIMEOUT_S} s\n{log.read_text()[-4000:]}"
            time.sleep(0.02)
        os.killpg(group, signal.SIGSTOP)
        try:
            before = committed(run_dir), metrics(run_dir)
            assert STEPS not in before[0], "the run ended before it was stopped; nothing to test"
            os.unlink(os.path.join(run_dir, run_lock.RUN_LOCK))  # a stopped driver still holds its lock
            hold = run_lock.held(run_dir)
            hold.__enter__()  # another process holds the run now
        finally:
            os.killpg(group, signal.SIGCONT)
        try:
            code = driver.wait(timeout=TIMEOUT_S)
            output = log.read_text(errors="replace")
            after = committed(run_dir), metrics(run_dir)
        finally:
            hold.__exit__(None, None, None)
    finally:
        if driver.poll() is None:
            os.killpg(group, signal.SIGKILL)
            driver.wait()
    landed = sorted(set(after[0]) - set(before[0]))
    assert landed == [], f"the old run committed {landed} into the run another process held\n{output[-3000:]}"
    assert after[1] == before[1], "the old run wrote metrics.jsonl after another process took the run"
    assert code == 2, output[-3000:]
    said = [line for line in output.splitlines() if "another process holds this run now" in line]
    assert said and said[-1].startswith("raylm: error: "), output[-3000:]
