"""JSON types are checked as OpenAI's API checks them (raylm.serve.protocol): a string, a
boolean or a float where an integer goes, or anything but true/false where a boolean goes, is
a 400 naming the field, not a value pydantic converted ("false" read as false, true as 1).
And a body in UTF-16 or UTF-32 gets the same unpaired-surrogate check as a UTF-8 one."""

import pytest

from raylm.serve import protocol as P
from tests.unit.test_serve_protocol import parse, refused

COMP = {"model": "m", "prompt": "x"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("field, value", [
    ("n", "2"), ("n", 2.0), ("n", True),
    ("max_tokens", "5"), ("max_tokens", 5.0), ("max_tokens", True),
    ("logprobs", "2"), ("logprobs", 2.0), ("logprobs", True),
    ("seed", 2.0), ("seed", "3"), ("seed", True), ("seed", 1.5),
    ("top_k", "5"), ("top_k", 5.0), ("top_k", False),
    ("best_of", "1"), ("best_of", True),
    ("temperature", "0.5"), ("temperature", True),
    ("top_p", "0.5"), ("top_p", True),
    ("presence_penalty", "0"), ("frequency_penalty", False),
    ("stream", "false"), ("stream", "true"), ("stream", 0), ("stream", 1),
    ("echo", "yes"), ("echo", 1), ("echo", "false"),
])
def test_completion_fields_of_the_wrong_json_type_are_named(field, value):
    e = refused({**COMP, field: value})
    assert e.param == field and field in e.message, e.message


@pytest.mark.parametrize("field, value", [
    ("logprobs", "false"), ("logprobs", 1), ("logprobs", "true"),
    ("top_logprobs", "2"), ("top_logprobs", True),
    ("max_completion_tokens", "3"), ("max_completion_tokens", 3.0),
    ("stream", "off"),
])
def test_chat_fields_of_the_wrong_json_type_are_named(field, value):
    body = {**CHAT, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    e = refused(body, P.ChatCompletionRequest)
    assert e.param == field and field in e.message, e.message


def test_stream_options_flags_take_only_booleans():
    e = refused({**COMP, "stream": True, "stream_options": {"include_usage": "false"}})
    assert e.param == "stream_options.include_usage"


@pytest.mark.parametrize("prompt", [[1.0, 2.0], [True, 2], [[True]], [[1], [2.5]], ["a", 1]])
def test_token_prompts_take_integers_only_with_one_message_for_the_four_forms(prompt):
    e = refused({**COMP, "prompt": prompt})
    assert e.param == "prompt" and "token ids" in e.message, e.message


def test_what_the_openai_client_sends_still_parses():
    r = parse({**COMP, "n": 2, "max_tokens": 5, "temperature": 1, "top_p": 1, "seed": -7, "top_k": -1,
               "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": False},
               "logprobs": 0, "echo": False, "stop": "\n", "user": "u", "logit_bias": {}, "best_of": 2,
               "presence_penalty": 0, "frequency_penalty": 0.0})
    assert (r.n, r.max_tokens, r.temperature, r.top_p, r.seed, r.stream, r.logprobs) == (2, 5, 1.0, 1.0, -7, True, 0)
    assert isinstance(r.temperature, float) and r.stop_list() == ("\n",) and r.include_usage
    assert parse({**COMP, "stop": ["a", "b"], "temperature": 0.7}).stop_list() == ("a", "b")
    assert parse({**COMP, "prompt": [[1, 2], [3]]}).prompts() == [[1, 2], [3]]
    c = parse({**CHAT, "logprobs": True, "top_logprobs": 2, "max_completion_tokens": 4, "stream": False},
              P.ChatCompletionRequest)
    assert (c.logprobs, c.top_logprobs, c.limit(), c.stream) == (True, 2, 4, False)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32-le"])
def test_a_utf16_or_utf32_body_with_an_unpaired_surrogate_is_refused(encoding):
    # json.loads decodes these encodings too, but the surrogate check only looked for a UTF-8
    # "\u" or lead byte, so the string reached the tokenizer (a RuntimeError, a 500).
    raw = '{"model": "m", "prompt": "a\\ud800b"}'.encode(encoding)
    with pytest.raises(P.APIError) as e:
        P.parse_request(raw, P.CompletionRequest)
    assert e.value.status == 400 and e.value.param == "prompt"
    assert P.parse_request('{"model": "m", "prompt": "é"}'.encode(encoding), P.CompletionRequest).prompt == "é"


def test_logit_bias_is_accepted_at_its_no_op_value_only():
    # The module's promise: fields raylm cannot honour are accepted at their no-op values.
    assert parse({**COMP, "logit_bias": {"50": 0, "7": 0.0}}).logit_bias == {"50": 0.0, "7": 0.0}
    assert refused({**COMP, "logit_bias": {"50": 0, "7": -100}}).param == "logit_bias"
    assert refused({**COMP, "logit_bias": {"50": "0"}}).param == "logit_bias.50"


@pytest.mark.parametrize("body, model, param, says", [
    # An image part (a vision client's): the fault is its type, not that content is no string.
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     P.ChatCompletionRequest, "messages.0.content.0.type", "'text'"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     P.ChatCompletionRequest, "messages.0.content.0.text", "(got 5)"),
    ({**COMP, "stop": ["a", None]}, P.CompletionRequest, "stop.1", "(got null)"),
])
def test_a_list_that_fails_a_union_is_named_by_its_faulty_item(body, model, param, says):
    e = refused(body, model)
    assert e.param == param and says in e.message, e.message


def test_a_scalar_that_fails_a_union_keeps_the_fields_name():
    assert refused({**CHAT, "messages": [{"role": "assistant", "content": None}]},
                   P.ChatCompletionRequest).param == "messages.0.content"
    assert refused({**COMP, "stop": {"a": 1}}).param == "stop"
