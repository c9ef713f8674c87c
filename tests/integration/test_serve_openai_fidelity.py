"""OpenAI-API fidelity over real HTTP, with the official `openai` client: `top_p: 0` and the
logprobs of an answer cut at a stop string. The bodies' details are tested without HTTP in
tests/unit/test_serve_fidelity_unit.py."""

import os

import pytest

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")

KEY = "sk-raylm-fidelity"
PORT_ENV = "RAYLM_TEST_SERVE_PORT"
CHAT = [{"role": "user", "content": "reverse: abc"}]


@pytest.fixture(scope="module")
def client(ray_local, tiny_run):
    from ray import serve

    from raylm.config import ServeConfig
    from raylm.serve.app import start
    from raylm.serve.local import free_port, wait_ready

    os.environ.setdefault(PORT_ENV, str(free_port()))  # Serve's port in this session (test_serve_api.py)
    cfg = ServeConfig(port=int(os.environ[PORT_ENV]), api_key=KEY, max_batch_size=4, request_timeout_s=60)
    url = start(tiny_run, cfg, name="fidelity", route_prefix="/")
    wait_ready(url)
    yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    serve.shutdown()
    os.environ.pop(PORT_ENV, None)


def test_top_p_zero_is_greedy_over_http(client):
    """OpenAI's API takes top_p in [0, 1]; raylm answered 0 with 400. 0 keeps only the most
    likely token, so a seeded, hot request gives the temperature-0 answer."""
    greedy = client.completions.create(model="tiny", prompt="The", max_tokens=12, temperature=0)
    got = client.completions.create(model="tiny", prompt="The", max_tokens=12, temperature=1.5, top_p=0, seed=3)
    assert got.choices[0].text == greedy.choices[0].text

    greedy = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=12, temperature=0)
    got = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=12, temperature=1.5,
                                         top_p=0, seed=3)
    assert got.choices[0].message.content == greedy.choices[0].message.content


def test_stop_string_logprobs_over_http(client):
    """Logprobs list the tokens of the returned text only, not the stop string's (plain and
    streamed, as the client parses them)."""
    kw = dict(model="tiny", prompt="The", max_tokens=16, seed=0, logprobs=1)
    full = client.completions.create(**kw).choices[0]
    toks, offs = full.logprobs.tokens, full.logprobs.text_offset
    i = next((k for k in range(1, len(toks) - 1) if len(toks[k]) > 1), None)
    if i is None:
        pytest.skip(f"no token of two or more characters in {toks}")
    stop = toks[i][1:] + toks[i + 1]  # begins inside token i, which straddles the cut and stays
    got = client.completions.create(**kw, stop=stop).choices[0]
    assert got.finish_reason == "stop" and got.text == full.text[:offs[i] + 1]
    assert got.logprobs.tokens == toks[:i + 1] and len(got.logprobs.token_logprobs) == i + 1

    text, tokens = "", []
    for chunk in client.completions.create(**kw, stop=stop, stream=True):
        for c in chunk.choices:
            text += c.text
            tokens += c.logprobs.tokens
    assert (text, tokens) == (got.text, got.logprobs.tokens)


def test_text_offset_after_a_control_token_over_http(client, tiny_run):
    """A prompt of token ids holding "<|bos|>" (no text) and "<unk>" (" \u2047 "): each token's
    text_offset is where its text is in the echoed text (it counted their pieces' length)."""
    from raylm.tokenizer import Tokenizer

    tok = Tokenizer.load(os.path.join(tiny_run, "tokenizer"))
    bos, unk = tok.special_ids["<|bos|>"], next(i for i in range(tok.vocab_size) if tok.id_to_piece(i) == "<unk>")
    ids = [bos] + tok.encode("Hello") + [bos, unk] + tok.encode("xy")
    c = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0).choices[0]
    assert c.text == "Hello \u2047 xy"
    pairs = list(zip(c.logprobs.tokens, c.logprobs.text_offset))
    for k, (token, at) in enumerate(pairs):
        width = {"<|bos|>": 0, "<unk>": 3}.get(token, len(token))
        assert c.text[at:at + width] == {"<|bos|>": "", "<unk>": " \u2047 "}.get(token, token), (k, pairs)
        assert (pairs[k + 1][1] if k + 1 < len(pairs) else len(c.text)) == at + width, (k, pairs)
