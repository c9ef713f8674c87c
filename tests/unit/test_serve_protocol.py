"""Request parsing and error bodies of the OpenAI API (raylm.serve.protocol), the serve config,
and the arguments `--engine vllm` builds for ray.serve.llm (without importing it)."""

import json
import sys

import pytest
import yaml

from raylm.config import ConfigError, ServeConfig, load_serve_config
from raylm.serve import protocol as P


def parse(body, model=P.CompletionRequest):
    return P.parse_request(body if isinstance(body, bytes) else json.dumps(body).encode(), model)


def refused(body, model=P.CompletionRequest) -> P.APIError:
    with pytest.raises(P.APIError) as e:
        parse(body, model)
    assert e.value.status == 400
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
    return e.value


def test_the_openai_clients_bodies_parse():
    r = parse({"model": "m", "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}, "logprobs": 2, "echo": True, "stop": ["\n"], "seed": 3,
               "n": 2, "top_p": 0.9, "top_k": 5, "user": "u", "frequency_penalty": 0, "presence_penalty": 0})
    assert r.prompts() == ["Hi"] and r.include_usage and r.stop_list() == ("\n",)
    assert parse({"model": "m", "prompt": [1, 2, 3]}).prompts() == [[1, 2, 3]]
    assert parse({"model": "m", "prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]
    assert parse({"model": "m", "prompt": ["a", "b"]}).prompts() == ["a", "b"]
    c = parse({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                                          {"role": "user", "content": "hi"}],
               "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3}, P.ChatCompletionRequest)
    assert c.chat() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert c.limit() == 7


def test_null_is_the_default_where_openai_allows_null():
    """OpenAI's spec marks these nullable; the official clients and others send null for unset."""
    comp = {"model": "m", "prompt": "x"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    nullable = ["n", "stream", "stream_options", "temperature", "top_p", "top_k", "stop", "seed", "user",
                "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"]
    for name in nullable + ["echo", "best_of", "suffix"]:
        assert parse({**comp, name: None}) == parse(comp), name
    # Completions' max_tokens: null asks for no limit but the context's (as vLLM), not OpenAI's 16.
    assert parse({**comp, "max_tokens": None}).max_tokens is None
    for name in nullable + ["max_tokens", "top_logprobs", "max_completion_tokens"]:
        assert parse({**chat, name: None}, P.ChatCompletionRequest) == parse(chat, P.ChatCompletionRequest)
    r = parse({**comp, "n": None, "stream": None, "echo": None, "logprobs": None})
    assert (r.n, r.stream, r.echo, r.logprobs) == (1, False, False, None)
    c = parse({**chat, "n": None, "stream": None, "logprobs": None}, P.ChatCompletionRequest)
    assert (c.n, c.stream, c.logprobs) == (1, False, False)
    assert refused({**comp, "n": 0}).param == "n" and refused({**chat, "logprobs": "x"}, P.ChatCompletionRequest).param == "logprobs"


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokenz": 5}, "max_tokenz"),
    ({"model": "m", "prompt": "x", "temperature": 9}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": -0.1}, "top_p"),
    ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": {"a": 1}}, "prompt"),
    ({"model": "m"}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "prompt": "x", "stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus"),
    ({"model": "m", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
])
def test_bad_completion_fields_are_named(body, param):
    e = refused(body)
    assert e.param == param, e.message
    assert param.split(".")[-1] in e.message


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages.0.extra"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
])
def test_bad_chat_fields_are_named(body, param):
    assert refused(body, P.ChatCompletionRequest).param == param


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b'"text"', b"null", b"\xff\xfe", b"", b"[" * 100000,
                                 pytest.param(b'{"model": "tiny", "max_tokens": ' + b"1" * 5000 + b"}",
                                              id="integer-past-pythons-digit-limit")])
def test_bad_json_and_non_objects_are_400(raw):
    e = refused(raw)
    assert "JSON" in e.message or "nested" in e.message


def test_completion_logprobs_shape_with_an_echoed_first_token():
    class E:
        def __init__(self, token, logprob, top):
            self.token, self.logprob, self.top = token, logprob, top

    out = P.completion_logprobs([E("ab", None, []), E("c", -0.5, [("c", -0.5), ("d", -1.0)])], 0)
    assert out == {"tokens": ["ab", "c"], "token_logprobs": [None, -0.5],
                   "top_logprobs": [None, {"c": -0.5, "d": -1.0}], "text_offset": [0, 2]}


def test_logprobs_of_byte_pieces_give_their_bytes_and_offsets_in_characters(tiny_run):
    """A character the tokenizer spells in byte-fallback pieces ("<0xC3>", "<0xA9>"): chat's
    `bytes` are those bytes, so that a client joins them back into the character, and
    completions' text_offset counts characters of the text, not the pieces' names."""
    import torch

    from raylm.serve.engine import Engine

    engine = Engine.from_run(tiny_run, max_batch_size=1)
    try:
        text = "\u00e9\u20ac!"  # two characters outside a 512-piece vocabulary, then one inside
        ids = engine.tokenizer.encode(text)
        lp = torch.log_softmax(torch.zeros(engine.vocab_size), -1)
        entries = [engine._token_logprob(lp, i, 1) for i in ids]
    finally:
        import asyncio

        asyncio.run(engine.close())
    assert any(P._BYTE_PIECE.fullmatch(e.token) for e in entries), [e.token for e in entries]
    chat = P.chat_logprobs(entries)["content"]
    pieces = [bytes(c["bytes"]) for c in chat]
    assert b"".join(pieces).decode("utf-8") == text
    assert all(bytes(t["bytes"]) == P.token_bytes(t["token"]) for c in chat for t in c["top_logprobs"])
    offsets = P.completion_logprobs(entries, 0)["text_offset"]
    assert offsets == [len(b"".join(pieces[:i]).decode("utf-8", "ignore")) for i in range(len(pieces))], offsets


def test_serve_config_ranges_and_overrides():
    cfg = load_serve_config(["max_batch_size=4", "serve.max_ongoing_requests=8", "autoscale_max_replicas=3"],
                            port=1234)
    assert (cfg.max_batch_size, cfg.max_ongoing_requests, cfg.port) == (4, 8, 1234)
    assert cfg.autoscaling_config == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16.0}
    assert ServeConfig().autoscaling_config is None
    assert load_serve_config(["serve.stream_event_interval_s=0"]).stream_event_interval_s == 0
    # Serve's application args and recipes come from YAML as (key, value) pairs.
    from_yaml = load_serve_config(list(yaml.safe_load("stream_event_interval_s: 0.02").items()))
    assert from_yaml.stream_event_interval_s == 0.02
    for bad, key in [(["max_queued_requests=0"], "max_queued_requests"), (["port=0"], "port"),
                     (["engine=tgi"], "engine"), (["backpressure_status=500"], "backpressure_status"),
                     (["max_ongoing_requests=2"], "max_ongoing_requests"), (["bogus=1"], "bogus"),
                     (["serve.stream_event_interval_s=-0.001"], r"serve\.stream_event_interval_s=-0\.001"),
                     (["autoscale_min_replicas=3", "autoscale_max_replicas=2"], "autoscale_max_replicas")]:
        with pytest.raises(ConfigError, match=key):
            load_serve_config(bad)


def test_api_key_is_required_off_loopback(monkeypatch):
    from raylm.serve.app import API_KEY_ENV, resolve_api_key

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key(ServeConfig()) == ""
    with pytest.raises(ConfigError, match="API key"):
        resolve_api_key(ServeConfig(host="0.0.0.0"))
    monkeypatch.setenv(API_KEY_ENV, "k")
    assert resolve_api_key(ServeConfig(host="0.0.0.0")) == "k"
    assert resolve_api_key(ServeConfig(api_key="mine")) == "mine"


def test_the_quickstarts_chat_leaves_a_running_serves_apps_alone():
    """`serve_and_chat` where Serve runs already (a user's `raylm serve`: "raylm" at "/"): the
    app goes on Serve's own host and port (Serve ignores another), under a name and route prefix
    of its own, so nothing there is replaced and deleting it deletes nothing else. With no
    Serve running: the app's usual name at "/", on the config's port or a free one."""
    from raylm.serve.app import APP_NAME
    from raylm.serve.local import chat_placement

    cfg, name, prefix = chat_placement(None, ("0.0.0.0", 8123))
    assert (cfg.host, cfg.port) == ("0.0.0.0", 8123) and name != APP_NAME and prefix == f"/{name}"
    cfg, other, _ = chat_placement(ServeConfig(port=9999, max_batch_size=2), ("127.0.0.1", 8000))
    assert (cfg.host, cfg.port, cfg.max_batch_size) == ("127.0.0.1", 8000, 2) and other != name
    with pytest.raises(RuntimeError, match="HTTP"):
        chat_placement(None, (None, 8000))
    assert chat_placement(ServeConfig(port=9999), None) == (ServeConfig(port=9999), APP_NAME, "/")
    cfg, name, prefix = chat_placement(None, None)
    assert (cfg.host, name, prefix) == ("127.0.0.1", APP_NAME, "/") and cfg.port != ServeConfig().port


def test_deployment_options_carry_limits_and_autoscaling():
    from raylm.serve.app import deployment_options

    opts = deployment_options(load_serve_config(["autoscale_max_replicas=4", "max_queued_requests=7",
                                                 "backpressure_status=503", "retry_after_s=2",
                                                 "health_check_period_s=3"]))
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in opts
    assert opts["max_queued_requests"] == 7
    assert opts["backpressure_config"] == {"status_code": 503, "retry_after_s": 2.0}
    assert opts["health_check_period_s"] == 3.0
    assert deployment_options(ServeConfig(num_replicas=2))["num_replicas"] == 2


def test_a_cpu_replica_leaves_one_of_its_cpus_to_its_event_loop():
    from raylm.serve.app import cpu_threads

    assert [cpu_threads(n) for n in (0.5, 1, 2, 2.5, 8)] == [1, 1, 1, 1, 7]


def test_vllm_arguments_for_local_and_s3_exports(tmp_path):
    from raylm.serve.vllm import check_export, vllm_serving_args

    cfg = load_serve_config(["max_batch_size=32", "max_ongoing_requests=64", "autoscale_max_replicas=4"])
    args = vllm_serving_args(str(tmp_path), cfg, "tiny")
    (llm,) = args["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "tiny", "model_source": str(tmp_path)}
    assert llm["engine_kwargs"]["max_num_seqs"] == 32
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == 4
    assert llm["deployment_config"]["max_ongoing_requests"] == 64
    s3 = vllm_serving_args("s3://bucket/export", ServeConfig(num_replicas=2), "tiny")["llm_configs"][0]
    assert s3["model_loading_config"]["model_source"] == {"bucket_uri": "s3://bucket/export"}
    assert s3["deployment_config"]["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 2}
    with pytest.raises(ConfigError, match="api_key"):
        vllm_serving_args(str(tmp_path), ServeConfig(api_key="k"), "tiny")
    with pytest.raises(FileNotFoundError, match="raylm export"):
        check_export(str(tmp_path))
    assert "ray.serve.llm" not in sys.modules and "vllm" not in sys.modules


def test_vllm_refuses_a_key_it_would_ignore_and_any_address_off_loopback(tmp_path, monkeypatch):
    """vLLM's ingress checks no raylm key: a key in $RAYLM_API_KEY was ignored without a word,
    and `--host 0.0.0.0` served with no key at all, where the raylm engine refuses to."""
    from raylm.serve.vllm import vllm_serving_args

    monkeypatch.setenv("RAYLM_API_KEY", "k")
    with pytest.raises(ConfigError, match=r"\$RAYLM_API_KEY: the vLLM app's ingress cannot check"):
        vllm_serving_args(str(tmp_path), ServeConfig(), "tiny")
    monkeypatch.delenv("RAYLM_API_KEY")
    with pytest.raises(ConfigError, match="serve.host=0.0.0.0: the vLLM app has no API key"):
        vllm_serving_args(str(tmp_path), ServeConfig(host="0.0.0.0"), "tiny")
    vllm_serving_args(str(tmp_path), ServeConfig(host="::1"), "tiny")


def test_app_builder_needs_a_key_unless_its_args_say_loopback(monkeypatch):
    """A RayService's http_options (0.0.0.0) decide where the app listens, not serve.host,
    whose default is loopback: the builder started the app with no key on every interface."""
    from raylm.serve.app import app_builder

    monkeypatch.delenv("RAYLM_API_KEY", raising=False)
    for serve in ({}, {"host": "0.0.0.0"}):
        with pytest.raises(ConfigError, match=r"set \$RAYLM_API_KEY \(from a Secret\)"):
            app_builder({"run": "x", "serve": serve})
    assert app_builder({"run": "x", "serve": {"host": "127.0.0.1"}}) is not None  # built: replicas load the run
    monkeypatch.setenv("RAYLM_API_KEY", "k")
    assert app_builder({"run": "x", "serve": {}}) is not None


def test_vllm_arguments_validate_against_ray_serve_llm():
    pytest.importorskip("vllm", reason="vLLM is an optional extra (GPU clusters); ray.serve.llm needs it")
    from ray.serve.llm import LLMServingArgs

    from raylm.serve.vllm import vllm_serving_args

    LLMServingArgs.model_validate(vllm_serving_args("s3://bucket/export", ServeConfig(), "tiny"))


def test_app_builder_refuses_bad_args_in_one_line(monkeypatch):
    from raylm.config import ConfigError
    from raylm.serve.app import app_builder

    monkeypatch.setenv("RAYLM_API_KEY", "k")

    for args, said in (({}, "'run'"), ({"run": "x", "extra": 1}, "unknown key 'extra'"),
                       ({"run": "x", "serve": {"api_key": "k"}}, "must not be written"),
                       ({"run": "x", "serve": {"max_batch_size": 0}}, "serve.max_batch_size")):
        with pytest.raises(ConfigError, match=said):
            app_builder(args)
