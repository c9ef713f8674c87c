"""benchmarks/serve_load.py splits each loaded round into its first wave and steady requests
by send time, failed requests included.

Failed requests were dropped before the split, so a failed first-wave request moved the
next steady request into the first wave: the steady p95 then left out a loaded request and
the first wave counted one that was sent while the others ran. A failed request now keeps
its send time (`stream_one`), and the waves are cut before failures are left out."""

import importlib.util
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _serve_load():
    spec = importlib.util.spec_from_file_location("serve_load", BENCH / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class _Busy(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b'{"error": {"message": "busy"}}'
        self.send_response(503)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_failed_first_wave_request_moves_no_steady_request_into_the_first_wave():
    bench = _serve_load()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        failed = bench.stream_one(server.server_address[1], "m", {"prompt": "hi", "max_tokens": 4}, "key")
    finally:
        server.shutdown()
        server.server_close()
    assert failed["error"].startswith("HTTP 503") and "sent" in failed

    def ok(sent, ttft):
        return {"sent": sent, "ttft": ttft, "itl": [], "tpot": None, "tokens": 4, "events": 1, "end": 1.0}

    # Concurrency 2: the requests sent at 0.0 and 0.1 are the first wave; the one at 0.0 failed.
    failed["sent"] = 0.0
    rounds = [([failed, ok(0.1, 0.9), ok(0.2, 0.01), ok(0.3, 0.02), ok(0.4, 0.03)], 1.0)]
    s = bench.summarize(rounds, 2)
    assert s["errors"] == 1 and s["requests"] == 5
    assert s["first_wave"]["requests"] == 1 and s["first_wave"]["ttft_p50_s"] == 0.9
    assert s["steady"]["requests"] == 3 and s["steady"]["ttft_p95_s"] == 0.03
