"""The guard (raylm.serve.app.Guard) leaves a probe's body unread, driven as ASGI without Ray:
/health and /ready take no key, so a body they waited for was one anyone could withhold."""

import asyncio
import json

import pytest

from raylm.config import ServeConfig
from raylm.serve.app import make_fastapi

KEY = "sk-guard"


@pytest.mark.parametrize("method, path, root", [("POST", "/health", ""), ("GET", "/ready", ""),
                                                ("POST", "/tight/ready", "/tight")])
def test_a_probe_is_answered_without_reading_its_body(method, path, root):
    app = make_fastapi(ServeConfig(request_timeout_s=60), KEY)

    @app.get("/health")
    @app.get("/ready")
    async def probe():
        return {"status": "ok"}

    reads, sent = [], []

    async def receive():  # a body announced and never sent
        reads.append(1)
        await asyncio.Event().wait()

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": root, "query_string": b"",
             "headers": [(b"content-length", b"100"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=20))
    status = next(m for m in sent if m["type"] == "http.response.start")["status"]
    body = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert (status, reads) == ((200 if method == "GET" else 405), []), body
