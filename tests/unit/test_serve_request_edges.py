"""Requests the OpenAI layer must refuse with a 400 naming the field (raylm.serve.protocol,
raylm.serve.handlers), not a 500 or an error naming another field."""

import asyncio
import json

import pytest

from raylm.config import ServeConfig
from raylm.serve import protocol as P
from raylm.serve.handlers import OpenAIService


def refused(raw: bytes, model) -> P.APIError:
    with pytest.raises(P.APIError) as e:
        P.parse_request(raw, model)
    assert e.value.status == 400
    json.dumps(e.value.body(), ensure_ascii=False).encode("utf-8")  # the body itself can be sent
    return e.value


@pytest.mark.parametrize("raw, model, param", [
    (rb'{"model": "m", "prompt": "a\ud800b"}', P.CompletionRequest, "prompt"),
    (rb'{"model": "m", "prompt": ["ok", "\udfff"]}', P.CompletionRequest, "prompt.1"),
    (rb'{"model": "m", "prompt": "x", "stop": ["\ud83d"]}', P.CompletionRequest, "stop.0"),
    (rb'{"model": "m", "messages": [{"role": "user", "content": "\ud800"}]}', P.ChatCompletionRequest,
     "messages.0.content"),
    (rb'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}',
     P.ChatCompletionRequest, "messages.0.content.0.text"),
    (rb'{"model": "m", "prompt": "x", "\ud800": 1}', P.CompletionRequest, None),  # the key cannot be shown
    (b'{"model": "m", "prompt": "\xed\xa0\x80"}', P.CompletionRequest, "prompt"),  # json.loads: surrogatepass
])
def test_unpaired_surrogates_are_a_400_naming_the_field(raw, model, param):
    """JSON's "\\ud800" escape decodes to a str that is no text: SentencePiece raised a bare
    RuntimeError on it (a 500), and a response echoing it could not be encoded."""
    e = refused(raw, model)
    assert e.param == param and "surrogate" in e.message
    # A surrogate pair is one character, and fine.
    assert P.parse_request(rb'{"model": "m", "prompt": "\ud83d\ude00"}', P.CompletionRequest).prompt == "\U0001F600"


@pytest.mark.parametrize("name", ["x[0]", "str", "int"])
def test_an_unknown_fields_name_is_the_param_whatever_it_looks_like(name):
    """Not `param: None` and a message starting "None:" for a field that looks like one of
    pydantic's union tags."""
    e = refused(json.dumps({"model": "m", "prompt": "x", name: 1}).encode(), P.CompletionRequest)
    assert e.param == name and e.message.startswith(f"{name}: unknown field")
    chat = {"model": "m", "messages": [{"role": "user", "content": "x", name: 1}]}
    assert refused(json.dumps(chat).encode(), P.ChatCompletionRequest).param == f"messages.0.{name}"


@pytest.fixture(scope="module")
def service(tiny_run):
    from raylm.serve.engine import Engine

    engine = Engine.from_run(tiny_run, max_batch_size=1)
    yield OpenAIService(engine, ServeConfig(), "m")
    asyncio.run(engine.close())


CONTEXT = "the context"  # stands for the model's own context length: with any prompt, too many


@pytest.mark.parametrize("body, param", [
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": CONTEXT}, "max_completion_tokens"),
    ({"max_completion_tokens": CONTEXT, "max_tokens": 2}, "max_completion_tokens"),
    ({"max_tokens": CONTEXT}, "max_tokens"),
])
def test_chat_limit_errors_name_the_field_the_client_sent(service, body, param):
    """The newer `max_completion_tokens` (what the openai client sends) was reported as
    `max_tokens`, a field the request did not have."""
    body = {k: service.engine.max_seq_len if v == CONTEXT else v for k, v in body.items()}
    req = P.parse_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}).encode(),
                          P.ChatCompletionRequest)

    async def never():
        await asyncio.Event().wait()

    with pytest.raises(P.APIError) as e:
        asyncio.run(service.chat(req, never))
    assert e.value.status == 400 and e.value.param == param and e.value.message.startswith(f"{param}:")
