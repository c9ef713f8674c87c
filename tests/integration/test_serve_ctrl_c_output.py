"""`raylm serve RUN` in the foreground, stopped with Ctrl-C (SIGINT), over real processes: the
command exits 0, and nothing of Ray's (the controller's graceful_shutdown "failed ... retries
remaining" warning) nor a traceback follows."""

import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

from tiny_run import make_tiny_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ctrl_c_exits_without_ray_warning(tmp_path):
    run = make_tiny_run(str(tmp_path))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "raylm.cli", "serve", run, "--port", str(port)],
                            cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err_lines: list[str] = []
    start_up = 0
    reader = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        first = proc.stdout.readline()  # printed once the app answers /ready
        assert first.startswith("serving "), (first, "".join(err_lines)[-3000:])
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30).read()  # it answers
        start_up = len(err_lines)  # what Ray said while starting (another cluster's ports...) is not ours
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        out = proc.stdout.read()  # stderr is the reader's alone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    text = "".join(err_lines[start_up:]) + out
    bad = [ln for ln in text.splitlines() if "failed" in ln.lower() or "Traceback" in ln]
    assert proc.returncode == 0, text[-3000:]
    assert not bad, bad
