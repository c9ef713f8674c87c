"""Fencing on S3: each lease carries its holder's token, in every renewal too, and a writer
given a holder's token stops once the lease was taken over: the holder itself learns so only at
its next renewal (up to a quarter of the term later), while its workers check the lease before
each checkpoint commit. A real holder process, stopped so that it cannot renew; SeaweedFS."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from raylm import run_lock
from raylm.run_lock import RunTaken


@pytest.fixture(autouse=True)
def python_sigint():
    """Python's own Ctrl-C handler (see test_run_lock_s3): a lease interrupts the main thread."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_lease_taken_over_stops_the_old_holders_writers(s3_server, s3_prefix, monkeypatch):
    monkeypatch.setattr(run_lock, "LEASE_S", 1.0)
    run = f"{s3_prefix}/run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import json, time
        from raylm import run_lock
        with run_lock.held({run!r}):
            print(json.dumps(run_lock.fence_for({run!r})), flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RAYLM_S3_LEASE_S": "1"})
    try:
        theirs = json.loads(holder.stdout.readline())
        assert theirs["lock"] == f"{run}/{run_lock.RUN_LOCK}"
        run_lock.check_fence(theirs)  # from another process, as its workers check
        holder.send_signal(signal.SIGSTOP)  # alive, but renews no more: its lease runs out
        with run_lock.held(run):  # taken over after the term
            run_lock.check_fence(run_lock.fence_for(run))
            with pytest.raises(RunTaken, match=r"/run/\.raylm\.lock: another process holds this run now"):
                run_lock.check_fence(theirs)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
