"""`stream_options` as the official `openai` client types it (ChatCompletionStreamOptionsParam,
used by chat and completions alike), parsed by raylm.serve.protocol."""

import json

import pytest

from raylm.serve import protocol as P

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
COMP = {"model": "m", "prompt": "hi", "stream": True}


@pytest.mark.parametrize("body,model", [(CHAT, P.ChatCompletionRequest), (COMP, P.CompletionRequest)])
def test_include_obfuscation_false_is_taken_and_true_refused_by_name(body, model):
    """OpenAI's stream_options has `include_obfuscation` (random padding on each chunk, on by
    default there); a client that turns it off, `{"include_usage": true, "include_obfuscation":
    false}`, asks for exactly what raylm sends. raylm answered 400 "unknown field" to it. True
    (padding raylm does not add) stays a 400 naming the field, not silently ignored."""
    opts = {"include_usage": True, "include_obfuscation": False}
    r = P.parse_request(json.dumps({**body, "stream_options": opts}).encode(), model)
    assert r.include_usage and not r.continuous_usage

    with pytest.raises(P.APIError) as e:
        P.parse_request(json.dumps({**body, "stream_options": {"include_obfuscation": True}}).encode(), model)
    assert e.value.status == 400 and e.value.param == "stream_options.include_obfuscation"
    assert "not supported" in e.value.message
