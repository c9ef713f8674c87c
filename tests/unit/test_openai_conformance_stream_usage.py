"""Streamed responses as OpenAI's API shapes them (raylm.serve.handlers), read with the official
`openai` client's own chunk types. The service runs over a real engine on the tiny run, without
Ray or HTTP."""

import asyncio
import json

import pytest

from raylm.config import ServeConfig
from raylm.serve import protocol as P
from raylm.serve.handlers import OpenAIService

openai = pytest.importorskip("openai")
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletionChunk  # noqa: E402


@pytest.fixture(scope="module")
def service(tiny_run):
    from raylm.serve.engine import Engine

    engine = Engine.from_run(tiny_run, max_batch_size=4)
    yield OpenAIService(engine, ServeConfig(stream_event_interval_s=0), "m")
    asyncio.run(engine.close())


def stream(service, body: dict) -> list:
    """A stream's events: dicts, then "[DONE]"."""
    chat = "messages" in body
    req = P.parse_request(json.dumps({"model": "m", "stream": True, **body}).encode(),
                          P.ChatCompletionRequest if chat else P.CompletionRequest)

    async def go():
        r = await (service.chat if chat else service.completions)(req, asyncio.Event().wait)
        return "".join([s async for s in r])

    events = [e.removeprefix("data: ") for e in asyncio.run(go()).split("\n\n")[:-1]]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "reverse: abc"}], "max_tokens": 4, "n": 2, "seed": 1},
    {"prompt": ["The", "A b"], "max_tokens": 3, "seed": 1, "n": 2, "logprobs": 1},
])
def test_stream_chunks_carry_usage_null_until_the_usage_chunk(service, body):
    """With stream_options.include_usage, OpenAI's API (and the openai client's docs of
    `ChatCompletionChunk.usage`): "All other chunks will also include a usage field, but with a
    null value"; only the extra last chunk, with `choices: []`, has the numbers. raylm left the
    field out of every other chunk, so a client reading `chunk["usage"]` (or testing it against
    null, as the docs invite) failed on the first chunk."""
    events = stream(service, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks, last = events[:-2], events[-2]
    assert chunks and all("usage" in c and c["usage"] is None for c in chunks), chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    # The client's own types read them (its `Completion` types finish_reason as never null, so a
    # completions stream's earlier chunks, null until the end as in OpenAI's, are not checked).
    for c in events[:-1] if "messages" in body else [last]:
        (ChatCompletionChunk if "messages" in body else Completion).model_validate(c)

    # Not asked for: no usage field at all, as before.
    plain = stream(service, body)
    assert not any("usage" in c for c in plain[:-1])
