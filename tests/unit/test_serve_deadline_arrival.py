"""The request's time limit counts from its arrival (raylm.serve.app.Guard sets
request.state.raylm_deadline before reading the body): a body that took most of the limit to
arrive left the handlers a whole limit again, up to twice `request_timeout_s` in all."""

import asyncio
import json

from fastapi import Request

from raylm.config import ServeConfig
from raylm.serve.app import make_fastapi


def test_the_handlers_deadline_is_the_guards_from_the_arrival():
    app = make_fastapi(ServeConfig(request_timeout_s=60), "")
    seen = {}

    @app.post("/v1/completions")
    async def completions(request: Request):
        await request.body()
        seen["deadline"], seen["now"] = getattr(request.state, "raylm_deadline", None), asyncio.get_running_loop().time()
        return {}

    sent = []

    async def run():
        arrived = asyncio.get_running_loop().time()
        chunks = [{"type": "http.request", "body": b"{", "more_body": True},
                  {"type": "http.request", "body": b"}", "more_body": False}]

        async def receive():
            if chunks:
                await asyncio.sleep(0.1)  # the body comes slowly
                return chunks.pop(0)
            await asyncio.Event().wait()

        async def send(msg):
            sent.append(msg)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 8000)}
        await asyncio.wait_for(app(scope, receive, send), timeout=20)
        return arrived

    arrived = asyncio.run(run())
    assert json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")) == {}
    # Set at the arrival, not when the handler began: the body's 0.2 s are spent from it.
    assert seen["deadline"] is not None and arrived <= seen["deadline"] - 60 <= seen["now"] - 0.2
