"""`raylm serve` waits for the app's /ready: past the wait, a one-line error naming the URL,
the last answer and where to look (it was a built-in TimeoutError, which the CLI shows as a
traceback and "a bug in raylm")."""

import http.server
import json
import threading

import pytest

from raylm.errors import UserError
from raylm.serve.local import free_port, wait_ready


class _EngineExited(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # what the app's /ready answers while its engine is gone
        body = json.dumps({"error": {"message": "the replica's engine has exited", "type": "unavailable"}}).encode()
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def never_ready():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EngineExited)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_replica_never_ready_is_a_one_line_error_naming_its_answer(never_ready):
    with pytest.raises(UserError) as e:
        wait_ready(never_ready, timeout=0.3)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{never_ready}/ready: not ready after 0 s")
    assert "HTTP 503: the replica's engine has exited" in msg and "serve status" in msg
    assert isinstance(e.value, TimeoutError)  # callers that caught the TimeoutError still do


def test_nothing_listening_is_named_too():
    base = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=r"/ready: not ready after 0 s \(last: no answer \(.*refused"):
        wait_ready(base, timeout=0.3)
