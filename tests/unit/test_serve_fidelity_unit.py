"""OpenAI-API fidelity of the serving app's bodies (raylm.serve.handlers, raylm.serve.protocol):
logprobs after a stop string, and `top_p: 0`. The service runs over a real engine on the tiny
run, without Ray or HTTP (test_serve_openai_shapes' fixture); the HTTP side is
tests/integration/test_serve_openai_fidelity.py."""

import pytest

from raylm.serve import protocol as P
from tests.unit.test_serve_openai_shapes import ask, service  # noqa: F401 (a fixture)

openai = pytest.importorskip("openai")
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

CHAT = [{"role": "user", "content": "reverse: abc"}]


def straddling_stop(tokens: list[str]) -> tuple[str, int, int]:
    """A stop string that begins inside a token of more than one character: (stop, the index
    of that token, the index of the token whose text completes the stop string)."""
    for i, t in enumerate(tokens[:-1]):
        if len(t) > 1 and tokens[i + 1]:
            return t[1:] + tokens[i + 1], i, i + 1
    pytest.skip(f"no token of two or more characters in {tokens}")


def streamed(chunks: list, key: str) -> tuple[str, list]:
    """A one-choice stream's text and its logprobs' tokens (with a completion's text_offset:
    (token, offset) pairs), joined over the chunks."""
    assert chunks[-1] == "[DONE]"
    text, tokens = "", []
    for ch in chunks[:-1]:
        for c in ch["choices"]:
            if key == "text":
                text += c["text"]
                tokens += list(zip(c["logprobs"]["tokens"], c["logprobs"]["text_offset"]))
            else:
                ChatCompletionChunk.model_validate(ch)
                text += c["delta"].get("content") or ""
                tokens += [e["token"] for e in (c["logprobs"] or {"content": []})["content"]]
    return text, tokens


def assert_tokens_cover(text: str, tokens: list[str], cut_at: int) -> None:
    """The tokens are those whose text begins within `text`, cut at character `cut_at`: the
    last may run past the cut (it straddles it), none begins at or after it."""
    assert len(text) == cut_at, (text, cut_at)
    joined = "".join(tokens)
    assert joined.startswith(text) and len(joined) > len(text), (text, tokens)  # the straddling token is kept
    assert len("".join(tokens[:-1])) < len(text), (text, tokens)  # and nothing after it


def test_completion_logprobs_stop_at_the_stop_string(service):
    """The text was cut before a stop string, but logprobs.tokens / token_logprobs /
    top_logprobs / text_offset went on listing the stop string's tokens: OpenAI returns the
    logprobs of the returned text's tokens. A token that straddles the cut (its text begins
    before it) is kept; usage.completion_tokens still counts every token generated, the stop
    string's included (as vLLM counts them)."""
    base = {"prompt": "The", "max_tokens": 16, "seed": 0, "logprobs": 2}
    full = ask(service, base)["choices"][0]
    stop, i, j = straddling_stop(full["logprobs"]["tokens"])
    cut_at = full["logprobs"]["text_offset"][i] + 1
    assert full["text"][cut_at:].startswith(stop)

    r = ask(service, {**base, "stop": stop})
    Completion.model_validate(r)
    (c,) = r["choices"]
    assert c["finish_reason"] == "stop" and c["text"] == full["text"][:cut_at]
    lp = c["logprobs"]
    assert_tokens_cover(c["text"], lp["tokens"], cut_at)
    n = i + 1
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert lp[name] == full["logprobs"][name][:n], name
    assert r["usage"]["completion_tokens"] == j + 1  # generated up to the token completing the stop string

    # Streamed: the same text and tokens, chunk by chunk (a token's logprobs wait with its text).
    text, tokens = streamed(ask(service, {**base, "stop": stop, "stream": True}), "text")
    assert (text, tokens) == (c["text"], list(zip(lp["tokens"], lp["text_offset"])))

    # With echo: the prompt's tokens, then the answer's.
    e = ask(service, {**base, "stop": stop, "echo": True})["choices"][0]
    assert e["text"] == "The" + c["text"] and e["logprobs"]["tokens"][-n:] == lp["tokens"]


def test_chat_logprobs_stop_at_the_stop_string(service):
    """The same for chat's logprobs.content, plain and streamed."""
    base = {"messages": CHAT, "max_tokens": 16, "seed": 1, "temperature": 1.5, "logprobs": True, "top_logprobs": 1}
    full = ask(service, base)["choices"][0]
    tokens = [e["token"] for e in full["logprobs"]["content"]]
    stop, i, j = straddling_stop(tokens)
    cut_at = len("".join(tokens[:i])) + 1
    assert full["message"]["content"][cut_at:].startswith(stop)

    r = ask(service, {**base, "stop": [stop]})
    ChatCompletion.model_validate(r)
    (c,) = r["choices"]
    assert c["finish_reason"] == "stop" and c["message"]["content"] == full["message"]["content"][:cut_at]
    got = [e["token"] for e in c["logprobs"]["content"]]
    assert_tokens_cover(c["message"]["content"], got, cut_at)
    assert c["logprobs"]["content"] == full["logprobs"]["content"][:i + 1]
    assert r["usage"]["completion_tokens"] == j + 1

    text, streamed_tokens = streamed(ask(service, {**base, "stop": [stop], "stream": True}), "delta")
    assert (text, streamed_tokens) == (c["message"]["content"], got)


def test_stop_string_at_a_token_boundary_keeps_no_token_of_it(service):
    """A stop string that begins where a token begins: none of its tokens is listed."""
    base = {"prompt": "The", "max_tokens": 16, "seed": 2, "logprobs": 0}
    full = ask(service, base)["choices"][0]
    toks, offs = full["logprobs"]["tokens"], full["logprobs"]["text_offset"]
    i = next(k for k in range(2, len(toks) - 1) if toks[k] and full["text"].find(toks[k] + toks[k + 1]) == offs[k])
    stop = toks[i] + toks[i + 1]
    for stream in (False, True):
        r = ask(service, {**base, "stop": stop, "stream": stream})
        text, tokens = (streamed(r, "text") if stream else
                        (r["choices"][0]["text"], r["choices"][0]["logprobs"]["tokens"]))
        tokens = [t[0] for t in tokens] if stream else tokens
        assert text == full["text"][:offs[i]] and tokens == toks[:i], (stream, stop, text, tokens)
        assert "".join(tokens) == text


def test_top_p_zero_is_accepted_and_greedy(service):
    """OpenAI's API takes top_p in [0, 1]; raylm answered 0 with 400. 0 keeps only the most
    likely token: the greedy answer, whatever the seed."""
    req = P.parse_request(b'{"model": "m", "prompt": "x", "top_p": 0}', P.CompletionRequest)
    assert req.top_p == 0
    for body in ({"prompt": "The", "max_tokens": 12, "logprobs": 1},
                 {"messages": CHAT, "max_tokens": 12, "logprobs": True}):
        key = "text" if "prompt" in body else "message"
        greedy = ask(service, {**body, "temperature": 0})["choices"][0]
        for seed in (0, 7):
            got = ask(service, {**body, "top_p": 0, "seed": seed, "temperature": 1.3})["choices"][0]
            assert got[key] == greedy[key] and got["logprobs"] == greedy["logprobs"], seed
    with pytest.raises(P.APIError, match="top_p"):
        P.parse_request(b'{"model": "m", "prompt": "x", "top_p": -0.1}', P.CompletionRequest)


def test_text_offset_counts_a_control_token_as_no_text(service):
    """text_offset counted each token's piece: "<|bos|>" (which decodes to nothing) as 7
    characters and "<unk>" (" ⁇ ") as 5, so every offset after one was too far, and a stop
    string's cut (which goes by the same offsets) could drop tokens of the answer."""
    tok = service.tok
    bos = tok.special_ids["<|bos|>"]
    unk = next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "<unk>")
    ids = [bos] + tok.encode("Hello") + [bos] + tok.encode(" world") + [unk] + tok.encode("xy")
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}
    for stream in (False, True):
        r = ask(service, {**body, "stream": stream})
        (c,) = (r[0] if stream else r)["choices"]
        text, lp = c["text"], c["logprobs"]
        assert text == "Hello world \u2047 xy"
        pairs = list(zip(lp["tokens"], lp["text_offset"]))
        assert pairs[0] == ("<|bos|>", 0) and pairs[1][1] == 0  # the first token, echoed without a logprob
        for k, (token, at) in enumerate(pairs):
            if token == "<|bos|>":
                assert pairs[k + 1][1] == at, pairs
            elif token == "<unk>":
                assert text[at:at + 3] == " \u2047 " and pairs[k + 1][1] == at + 3, pairs
            else:
                assert text[at:at + len(token)] == token, (token, at, pairs)
