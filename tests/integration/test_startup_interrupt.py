"""Ctrl-C or SIGTERM while `init_ray` starts the local cluster (the first seconds of `raylm
pretrain`) stops the process as at any other time: KeyboardInterrupt reaches the caller (the
CLI's `raylm: interrupted`), Ray is shut down, and none of the session's processes is left.
The signal is sent at a chosen point of ray.init, in a fresh process of its own session:
  - as Ray forks one of its processes (Python runs the at-fork hooks then, and swallowed a
    KeyboardInterrupt raised in one: the run went on to train);
  - SIGTERM there too (Ray's handler's SystemExit was swallowed the same way);
  - SIGTERM just before the raylet starts (Ray's handler exited with status 15, no word);
  - Ctrl-C while the raylet starts Ray's agents (raised there, it left ray::DashboardAgent and
    ray::RuntimeEnvAgent running without their raylet, parent pid 1; on a machine fast enough
    to have them up within the 1.5 s, they went with it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# With the cluster tests' group under pytest-xdist (tests/conftest.py), though it uses none of its
# fixtures: run beside those tests, the SIGINTs these send were lost (twice in one run; not
# understood yet, and not seen in any run one test at a time).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("cluster")]

SCRIPT = r'''
import os, signal, sys, time
assert "logging" not in sys.modules  # this hook runs after logging's before-fork one
how = sys.argv[1]
forks = []

def before_fork():
    forks.append(1)
    if len(forks) == 2 and how.startswith("fork-"):  # the second process ray.init starts
        os.kill(os.getpid(), signal.SIGINT if how == "fork-sigint" else signal.SIGTERM)

os.register_at_fork(before=before_fork)
import threading
import ray, ray._private.services as services
from raylm.config import load_config
from raylm.pipeline import init_ray

start_raylet = services.start_raylet

def signal_at_raylet(*args, **kwargs):
    if how == "raylet-sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    started = start_raylet(*args, **kwargs)
    if how == "agents-sigint":  # the raylet is starting its agents
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGINT)
    return started

services.start_raylet = signal_at_raylet
try:
    init_ray(load_config(overrides=["train.num_workers=1", "train.cpus_per_worker=1"]))
    print("init_ray returned", flush=True)
    code = 0
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    code = 130
print("ray initialized:", ray.is_initialized(), flush=True)
t = threading.Thread(target=lambda: __import__("logging").getLogger("raylm.test"), daemon=True)
t.start()
t.join(10)
print("logging lock free:", not t.is_alive(), flush=True)
sys.stdout.flush()
os._exit(code) if t.is_alive() else sys.exit(code)
'''


def session_processes(sid: int) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == sid:
            continue
        try:
            if os.getsid(int(pid)) == sid:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{pid}: {cmd[:120]}")
        except (OSError, ProcessLookupError):
            pass
    return found


def kill_session(sid: int) -> None:
    for line in session_processes(sid):
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("how", ["fork-sigint", "fork-sigterm", "raylet-sigterm", "agents-sigint"])
def test_interrupt_while_ray_starts(tmp_path, how):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen([sys.executable, "-c", SCRIPT, how], cwd=tmp_path, env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=240)
        deadline = time.time() + 30  # Ray's processes go within seconds of the driver
        while session_processes(p.pid) and time.time() < deadline:
            time.sleep(1)
        left = session_processes(p.pid)
    finally:
        p.kill()
        kill_session(p.pid)
    said = f"exit {p.returncode}\nstdout:\n{out}\nstderr (end):\n{err[-3000:]}"
    assert "KeyboardInterrupt" in out.splitlines(), said  # not lost, nor Ray's SystemExit
    assert "ray initialized: False" in out, said
    assert "logging lock free: True" in out, said
    assert p.returncode == 130, said
    assert "Exception ignored" not in err, said
    assert not left, f"left running: {left}\n{said}"
