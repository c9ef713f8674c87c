"""`raylm serve RUN` in the foreground, stopped with Ctrl-C (SIGINT), over real processes: the
command exits 0, and nothing of Ray's (the controller's graceful_shutdown "failed ... retries
remaining" warning) nor a traceback follows; streams in flight at the signal run to their end."""

import http.client
import json

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


def _stream(port: int, results: list, started: threading.Event) -> None:
    """One streamed completion of 2 x 100 tokens; appends its usage (None where cut short)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"model": "tiny", "prompt": "The ", "max_tokens": 100, "n": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    usage, done = None, False
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        r = conn.getresponse()
        for line in r:
            started.set()
            line = line.strip()
            if line == b"data: [DONE]":
                done = True
            elif line.startswith(b"data: "):
                usage = json.loads(line[6:]).get("usage") or usage
    except (OSError, http.client.HTTPException):
        pass
    finally:
        started.set()
        results.append(usage if done else None)


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
        # Streams in flight at the signal: Serve's own shutdown stopped the proxies beside the
        # replicas, and a stream could lose its end.
        results: list = []
        events = [threading.Event() for _ in range(6)]
        clients = [threading.Thread(target=_stream, args=(port, results, e)) for e in events]
        for c in clients:
            c.start()
        for e in events:
            e.wait(timeout=60)
        proc.send_signal(signal.SIGINT)
        for c in clients:
            c.join(timeout=180)
        assert len(results) == 6 and all(u and u["completion_tokens"] == 200 for u in results), results
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
