"""The OpenAI API's response bodies (raylm.serve.handlers, raylm.serve.protocol) as the official
`openai` client's own types read them: completions and chat, plain and streamed, n > 1,
logprobs. The service runs over a real engine on the tiny run, without Ray or HTTP."""

import asyncio
import json

import pytest

from raylm.config import ServeConfig
from raylm.serve import protocol as P
from raylm.serve.handlers import OpenAIService
from raylm.serve.sampling import TokenLogprob

openai = pytest.importorskip("openai")
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

CHAT = [{"role": "user", "content": "reverse: abc"}]


@pytest.fixture(scope="module")
def service(tiny_run):
    from raylm.serve.engine import Engine

    engine = Engine.from_run(tiny_run, max_batch_size=4)
    yield OpenAIService(engine, ServeConfig(), "m")
    asyncio.run(engine.close())


def ask(service, body: dict):
    """The response body, or a stream's events (dicts, then "[DONE]")."""
    chat = "messages" in body
    req = P.parse_request(json.dumps({"model": "m", **body}).encode(),
                          P.ChatCompletionRequest if chat else P.CompletionRequest)

    async def never():
        await asyncio.Event().wait()

    async def go():
        r = await (service.chat if chat else service.completions)(req, never)
        if isinstance(r, dict):
            return r
        text = "".join([s async for s in r])
        assert text.endswith("\n\n")
        events = [e.removeprefix("data: ") for e in text.split("\n\n")[:-1]]
        return [e if e == "[DONE]" else json.loads(e) for e in events]

    return asyncio.run(go())


def assert_sampled_token_in_top(lp: dict, k: int) -> None:
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        if logprob is None:  # an echoed prompt's first token
            assert top is None
            continue
        assert top[token] == logprob, (token, top)
        assert len(top) in ((1,) if k == 0 else (k, k + 1)), (token, k, top)
        if len(top) == k + 1:  # the token itself, outside the k most likely
            assert logprob == min(top.values()), (token, top)


@pytest.mark.parametrize("k", [0, 2])
def test_completion_top_logprobs_hold_the_sampled_token(service, k):
    """OpenAI's completions: "The API will always return the logprob of the sampled token, so
    there may be up to logprobs+1 elements". raylm gave exactly k, leaving out a sampled token
    outside the top k (and an empty dict for every token with logprobs: 0)."""
    body = {"prompt": "The", "max_tokens": 12, "temperature": 1.0, "seed": 5, "logprobs": k}
    r = ask(service, body)
    Completion.model_validate(r)
    lp = r["choices"][0]["logprobs"]
    assert_sampled_token_in_top(lp, k)
    assert any(len(t) == k + 1 for t in lp["top_logprobs"])  # this seed samples outside the top k

    # The same for an echoed prompt, and in a stream, chunk by chunk.
    echoed = ask(service, {**body, "echo": True, "max_tokens": 0})["choices"][0]["logprobs"]
    assert_sampled_token_in_top(echoed, k)
    chunks = ask(service, {**body, "stream": True, "echo": True})
    assert chunks[-1] == "[DONE]"
    for ch in chunks[:-1]:
        assert_sampled_token_in_top(ch["choices"][0]["logprobs"], k)
    streamed = [t for ch in chunks[:-1] for t in ch["choices"][0]["logprobs"]["tokens"]]
    assert streamed == echoed["tokens"] + lp["tokens"]


def test_completion_top_logprobs_add_no_second_entry_for_a_top_token():
    e = TokenLogprob(7, "a", -0.5, [("a", -0.5), ("b", -1.0)])
    assert P.completion_logprobs([e])["top_logprobs"] == [{"a": -0.5, "b": -1.0}]
    e = TokenLogprob(9, "c", -3.0, [("a", -0.5), ("b", -1.0)])
    assert list(P.completion_logprobs([e])["top_logprobs"][0].items()) == [("a", -0.5), ("b", -1.0), ("c", -3.0)]


def test_streamed_completions_with_n_and_prompts_index_each_choice(service):
    """Choice i of prompt p is index p * n + i; each ends once; the usage chunk has no choices.
    (The client reads stream chunks without validating them: `finish_reason` is null until
    the end, which its `Completion` type does not allow.)"""
    body = {"prompt": ["The", "A cat"], "n": 2, "max_tokens": 4, "seed": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = ask(service, body)
    assert chunks[-1] == "[DONE]"
    *parts, usage = chunks[:-1]
    ends = {}
    for ch in parts:
        (c,) = ch["choices"]
        assert ch["object"] == "text_completion" and isinstance(c["text"], str)
        if c["finish_reason"] is not None:
            assert c["index"] not in ends
            ends[c["index"]] = c["finish_reason"]
    assert sorted(ends) == [0, 1, 2, 3]
    plain = Completion.model_validate(ask(service, {**body, "stream": False, "stream_options": None}))
    u = Completion.model_validate(usage)
    assert u.choices == [] and u.usage == plain.usage
    assert [c.index for c in plain.choices] == [0, 1, 2, 3]
    texts = {i: "".join(ch["choices"][0]["text"] for ch in parts if ch["choices"][0]["index"] == i) for i in ends}
    assert texts == {c.index: c.text for c in plain.choices}  # seeded: the stream says what the plain answer says


def test_chat_bodies_and_chunks_validate_as_the_clients_types(service):
    body = {"messages": CHAT, "n": 2, "max_completion_tokens": 6, "seed": 3, "logprobs": True, "top_logprobs": 2,
            "stop": "zz", "user": "u", "presence_penalty": 0, "frequency_penalty": 0.0}
    plain = ChatCompletion.model_validate(ask(service, body))
    assert [c.index for c in plain.choices] == [0, 1]
    for c in plain.choices:
        assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
        assert all(len(t.top_logprobs) == 2 and t.bytes == list(P.token_bytes(t.token)) for t in c.logprobs.content)

    chunks = ask(service, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]"
    parsed = [ChatCompletionChunk.model_validate(ch) for ch in chunks[:-1]]
    *parts, usage = parsed
    assert usage.choices == [] and usage.usage.total_tokens == plain.usage.total_tokens
    for i, c in enumerate(plain.choices):
        mine = [p.choices[0] for p in parts if p.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(m.delta.content or "" for m in mine) == c.message.content
        assert [m.finish_reason for m in mine if m.finish_reason] == [c.finish_reason]
        assert [t.token for m in mine if m.logprobs for t in m.logprobs.content] == [t.token for t in c.logprobs.content]


def test_a_reply_dumped_by_the_client_goes_back_as_a_message(service):
    """A conversation carried on with the reply as the client dumps it (`message.model_dump()`:
    refusal, tool_calls, function_call, audio and annotations as null) is taken; it was a 400
    naming messages.1.refusal. Those fields set to a value are still refused by name."""
    reply = ChatCompletion.model_validate(ask(service, {"messages": CHAT, "max_tokens": 4})).choices[0].message
    dumped = reply.model_dump()
    assert dumped["refusal"] is None and "tool_calls" in dumped
    again = ask(service, {"messages": [*CHAT, dumped, {"role": "user", "content": "again"}], "max_tokens": 4})
    assert ChatCompletion.model_validate(again).choices[0].message.role == "assistant"
    with pytest.raises(P.APIError, match=r"messages\.1\.refusal"):
        ask(service, {"messages": [*CHAT, {**dumped, "refusal": "no"}], "max_tokens": 4})
