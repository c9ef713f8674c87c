"""The app's guard (raylm.serve.app.Guard) against slow and unauthenticated bodies, driven as
ASGI without Ray: a body that stops arriving is answered 408 within the request timeout, and
a request without the key is answered 401 before any of its body is read."""

import asyncio
import json

from raylm.config import ServeConfig
from raylm.serve.app import make_fastapi

KEY = "sk-guard"


def drive(app, headers: dict, receive) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one POST /v1/completions through the ASGI app; a
    response that never comes fails the test rather than hanging it."""
    sent = []

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "",
             "query_string": b"", "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}

    async def run():
        await asyncio.wait_for(app(scope, receive, send), timeout=20)

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body)


def slow_body(reads: list):
    """An ASGI receive that gives one byte of the body, then nothing more (a slowloris client)."""
    async def receive():
        reads.append(1)
        if len(reads) == 1:
            return {"type": "http.request", "body": b"{", "more_body": True}
        await asyncio.Event().wait()  # the rest never comes (cancelled by the guard's timeout)
    return receive


def test_a_body_that_stops_arriving_is_a_408_within_the_request_timeout():
    app = make_fastapi(ServeConfig(request_timeout_s=0.05), KEY)
    reads = []
    status, headers, err = drive(app, {"authorization": f"Bearer {KEY}", "content-length": "100"}, slow_body(reads))
    assert status == 408, err
    assert err["error"]["type"] == "timeout" and err["error"]["code"] == "timeout"
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert headers.get("connection") == "close"  # the rest of the body is no next request
    assert headers.get("x-should-retry") == "false"  # as a request past the limit: a retry takes the slot again
    assert len(reads) == 2  # it did wait for more


def test_a_request_without_the_key_is_refused_before_its_body_is_read():
    app = make_fastapi(ServeConfig(request_timeout_s=60), KEY)
    for auth in ({}, {"authorization": "Bearer sk-wrong"}):
        reads = []
        status, _, err = drive(app, {**auth, "content-length": "100"}, slow_body(reads))
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert reads == []
