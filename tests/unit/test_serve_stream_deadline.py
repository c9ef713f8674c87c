"""A stream's request_timeout_s holds whether or not its events are read: a client that stops
reading (its connection still open) left the response generator waiting at a yield, where the
deadline was never checked, and the engine generated the whole answer for nobody."""

import asyncio
import json

import pytest

from raylm.config import ServeConfig
from raylm.serve import protocol as P
from raylm.serve.handlers import OpenAIService

MAX_TOKENS = 120  # greedy after "The ", the tiny model runs to the limit (no EOS)


@pytest.fixture(scope="module")
def engine(tiny_run):
    from raylm.serve.engine import Engine

    engine = Engine.from_run(tiny_run, max_batch_size=1)
    yield engine
    asyncio.run(engine.close())


async def _connected():
    await asyncio.Event().wait()  # the client never leaves


def test_an_unread_stream_ends_its_engine_work_at_the_deadline(engine):
    service = OpenAIService(engine, ServeConfig(request_timeout_s=0.005), "m")
    body = {"model": "m", "prompt": "The ", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}

    async def run():
        before = engine.stats()["tokens_generated"]
        events = await service.completions(P.parse_request(json.dumps(body).encode(), P.CompletionRequest),
                                           _connected)
        while engine.stats()["running"] or engine.stats()["waiting"]:  # nothing reads the events meanwhile
            await asyncio.sleep(0.01)
        made = engine.stats()["tokens_generated"] - before
        lines = [line async for line in events]
        return made, "".join(lines)

    made, text = asyncio.run(run())
    assert made < MAX_TOKENS, "the engine went on past the deadline for a stream nobody read"
    assert '"code": "timeout"' in text and text.count("data: ") == 1  # the reader, once back, hears why
    assert service._streams == 0


@pytest.mark.parametrize("stream", [False, True])
def test_the_deadline_counts_from_the_requests_arrival(engine, stream):
    """`deadline`: where the app read the body first (its guard, within request_timeout_s), the
    work gets what is left of the limit, not a whole request_timeout_s more (up to twice it)."""
    service = OpenAIService(engine, ServeConfig(request_timeout_s=300), "m")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream}

    async def run():
        arrived = asyncio.get_running_loop().time() - 300  # the body took the whole limit
        req = P.parse_request(json.dumps(body).encode(), P.ChatCompletionRequest)
        if not stream:
            with pytest.raises(P.APIError) as e:
                await service.chat(req, _connected, deadline=arrived + 300)
            return e.value.status, e.value.code
        lines = [line async for line in await service.chat(req, _connected, deadline=arrived + 300)]
        return lines[-1]

    got = asyncio.run(run())
    if stream:
        assert '"code": "timeout"' in got
    else:
        assert got == (408, "timeout")
