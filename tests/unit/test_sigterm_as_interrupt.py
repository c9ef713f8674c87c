"""SIGTERM (`ray job stop`, Kubernetes, `kill`) stops raylm as Ctrl-C does
(`interrupts.stop_on_sigterm`; with Ray Train running: tests/integration/
test_train_ray_user_errors_and_sigint.py). Also where Ctrl-C itself is ignored, as a script's
background job (`cmd &`) starts: passing SIGTERM on as SIGINT left such a process unstoppable
but by SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

CODE = """
import time
from raylm.interrupts import stop_on_sigterm
stop_on_sigterm()
try:  # "ready" inside: the signal may land before print returns
    print("ready", flush=True)
    time.sleep(60)
    print("slept on", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.parametrize("sigint", [signal.SIG_DFL, signal.SIG_IGN], ids=["ctrl-c-handled", "ctrl-c-ignored"])
def test_sigterm_is_a_keyboard_interrupt(sigint):
    proc = subprocess.Popen([sys.executable, "-c", CODE], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out == "interrupted\n" and proc.returncode == 0
