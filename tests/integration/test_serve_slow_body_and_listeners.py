"""Slow bodies and listeners, over real HTTP against one served app on the session's local Ray
(started the way `raylm serve --host 127.0.0.1` starts it: HAProxy in front where installed).

The app ("guard", API key, a 3 s request timeout, 1 ongoing + 1 queued request) is small on
purpose: three clients that send their headers and then a byte of body fill every slot the
replica has, so a slow body that were never cut off would lock everyone else out.
"""

import http.client
import ipaddress
import json
import os
import socket

import psutil
import pytest

pytestmark = pytest.mark.integration

KEY = "sk-raylm-guard"
TIMEOUT_S = 3
PORT_ENV = "RAYLM_TEST_SERVE_PORT"
BODY = json.dumps({"model": "tiny", "prompt": "The ", "max_tokens": 1, "temperature": 0}).encode()


@pytest.fixture(scope="module")
def server(ray_local, tiny_run):
    from ray import serve

    from raylm.config import ServeConfig
    from raylm.serve.app import start
    from raylm.serve.local import free_port, wait_ready

    os.environ.setdefault(PORT_ENV, str(free_port()))  # Serve's port in this session (test_serve_api.py)
    cfg = ServeConfig(port=int(os.environ[PORT_ENV]), api_key=KEY, max_batch_size=1, max_ongoing_requests=1,
                      max_queued_requests=1, request_timeout_s=TIMEOUT_S)
    url = start(tiny_run, cfg, name="guard", route_prefix="/")
    wait_ready(url)
    yield cfg.port
    serve.shutdown()
    os.environ.pop(PORT_ENV, None)


def completion(port) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", BODY, {"authorization": f"Bearer {KEY}",
                                                   "content-type": "application/json"})
    r = conn.getresponse()
    status, data = r.status, r.read()
    conn.close()
    return status, json.loads(data) if data.startswith(b"{") else {"raw": data.decode(errors="replace")}


def slow_client(port, key: str) -> socket.socket:
    """Headers, then the first byte of the body, then nothing: a slowloris client."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(BODY)}\r\n" + (f"authorization: Bearer {key}\r\n" if key else "") + "\r\n")
    sock.sendall(head.encode() + BODY[:1])
    return sock


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of the response on `sock`; the socket's timeout fails the test when none comes."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        assert got, f"closed without an answer: {data!r}"
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    while length is not None and len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ")[1]), body


def test_slow_bodies_are_cut_off_at_the_request_timeout_and_free_the_replica(server):
    """Before the guard bounded the body's reading, each slow client held one of the replica's
    max_ongoing_requests (or queued) slots for as long as it liked: every other request got
    429 meanwhile, and the slow clients never got an answer."""
    socks = [slow_client(server, KEY) for _ in range(3)]
    try:
        answers = [answer(s) for s in socks]
    finally:
        for s in socks:
            s.close()
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {408, 429} and 408 in statuses, answers
    err = json.loads(next(body for status, body in answers if status == 408))["error"]
    assert err["type"] == "timeout" and set(err) == {"message", "type", "param", "code"}
    assert completion(server)[0] == 200  # the slots are free again


def test_slow_bodies_without_the_key_are_refused_at_once_and_hold_nothing(server):
    socks = []
    try:
        for key in ("", "sk-wrong", ""):  # one after another: each holds a slot until its 401 is sent
            socks.append(slow_client(server, key))
            status, body = answer(socks[-1])
            assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        # Their connections are still open: a request with the key gets through.
        status, got = completion(server)
        assert status == 200, got
    finally:
        for s in socks:
            s.close()


def probe_with_a_slow_body(port, method: str, path: str):
    """A probe without the key whose headers announce a body, then one byte of it, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(BODY)}\r\n\r\n".encode() + BODY[:1])
    return sock


def test_probes_with_a_slow_body_are_answered_at_once_and_hold_no_slot(server):
    """Before, the guard read a probe's body (up to the request timeout, 300 s by default)
    before answering it, with no key asked: a few such requests without the key held every
    slot the replica has, and everyone else got 429 meanwhile."""
    socks = []
    try:
        for method, path, status in (("POST", "/health", 405), ("GET", "/ready", 200), ("POST", "/ready", 405)):
            socks.append(probe_with_a_slow_body(server, method, path))
            got, body = answer(socks[-1])
            assert got == status, (method, path, got, body)
            if got != 200:
                assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
        # Their connections are still open, their bodies unsent: a request with the key gets through.
        got, reply = completion(server)
        assert got == 200, reply
    finally:
        for s in socks:
            s.close()


def _probe(ip: str, port: int) -> bytes:
    """What a GET /v1/models with the key gets from ip:port (b"" when it does not speak HTTP)."""
    host = "127.0.0.1" if ip in ("0.0.0.0", "::") else ip  # "::" takes IPv4 too
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(f"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
                         "connection: close\r\n\r\n".encode())
            data = b""
            while len(data) < 65536:
                got = sock.recv(65536)
                if not got:
                    break
                data += got
            return data
    except OSError:
        return b""


def test_nothing_beyond_loopback_answers_the_apps_api(server):
    """With serve.host on loopback, what serves the app (HAProxy's frontend, the replica's own
    HTTP server, Serve's fallback proxy) listens on loopback only. Ray's and Serve's other
    listeners on every interface (README, Serving: API key) are asked for the model list with
    the key, and none of them gives it."""
    from raylm.pipeline import started_env

    if started_env() is None:
        pytest.skip("a joined cluster: its processes are not this test's children")
    cluster = {p.pid for p in psutil.Process().children(recursive=True)}
    beyond = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.pid in cluster
                     and not ipaddress.ip_address(c.laddr.ip.split("%")[0]).is_loopback})
    assert server not in {port for _, port in beyond}, beyond
    assert completion(server)[0] == 200  # the probe below would find the app where it listens
    serving = [(ip, port) for ip, port in beyond if b'"tiny"' in _probe(ip, port)]
    assert not serving, f"the app's API answers beyond loopback on {serving}"
