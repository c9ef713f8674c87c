"""About 1,000 malformed and random requests at the loopback server: none may get a 5xx, and
the server must answer a normal request afterwards. Seeded, so a failure replays."""

import http.client
import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.integration

KEY = "sk-raylm-fuzz"
N_REQUESTS = 1000
PORT_ENV = "RAYLM_TEST_SERVE_PORT"
# A driver that joins a running cluster (one it did not start) and ends as the quickstart does.
JOINED_DRIVER = """
import sys, ray
from raylm.serve.local import serve_and_chat, serve_running
ray.init(address=sys.argv[2], logging_level="ERROR")
print("SERVE_BEFORE", serve_running(), flush=True)
print("ANSWER", serve_and_chat(sys.argv[1], "reverse: abc", max_tokens=8)["answer"], flush=True)
print("SERVE_AFTER", serve_running(), flush=True)
"""

VALID_COMPLETION = {"model": "tiny", "prompt": "The ", "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
                    "stop": ["\n"], "seed": 1, "n": 1, "logprobs": 1, "echo": False, "stream": False}
VALID_CHAT = {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "reverse: abc"}],
              "max_tokens": 4, "temperature": 0.5, "seed": 2, "logprobs": True, "top_logprobs": 2, "stream": False}
PATHS = ["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/stats", "/v1", "/",
         "/v1/completions/", "/v1/../v1/models", "/%00", "/v1/chat/completions?x=1"]
WEIRD = [None, True, False, 0, -1, 1, 2**31, -2**63, 10**40, 0.5, -0.0, 1e308, "", "x", "\u0000", "\ud7ff" * 3,
         "<|end|>", "é" * 50, [], [0], [-1], [[]], [[1, 2]], {}, {"a": 1}, [None], ["a", 1], "NaN",
         1e-45, 5e-324]  # temperatures whose division of the logits overflows


@pytest.fixture(scope="module")
def port(ray_local, tiny_run):
    from ray import serve

    from raylm.config import ServeConfig
    from raylm.serve.app import start
    from raylm.serve.local import free_port, wait_ready

    # Serve's port in this session, shared with test_serve_api.py (starting Serve costs more
    # than these tests).
    os.environ.setdefault(PORT_ENV, str(free_port()))
    cfg = ServeConfig(port=int(os.environ[PORT_ENV]), api_key=KEY, max_batch_size=4, max_ongoing_requests=16,
                      max_queued_requests=64, max_body_bytes=16 * 1024, request_timeout_s=30)
    url = start(tiny_run, cfg, name="fuzz", route_prefix="/")
    wait_ready(url)
    yield cfg.port
    serve.shutdown()  # each serve module starts its own app
    os.environ.pop(PORT_ENV, None)


def mutate(rng: random.Random, body: dict) -> dict:
    body = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        key = rng.choice(list(body) or ["model"])
        if op < 0.35:
            body[key] = rng.choice(WEIRD)
        elif op < 0.5:
            body.pop(key, None)
        elif op < 0.6:
            body[rng.choice(["best_of", "suffix", "logit_bias", "tools", "foo", "stream_options", "n",
                             "max_completion_tokens", "echo", "presence_penalty"])] = rng.choice(WEIRD)
        elif op < 0.7 and "messages" in body:
            body["messages"] = [{"role": rng.choice(["user", "assistant", "system", "tool", 7]),
                                 "content": rng.choice(WEIRD + ["hi"])} for _ in range(rng.randint(0, 3))]
        elif op < 0.8:
            body[key] = rng.randint(-10, 200) if rng.random() < 0.5 else rng.uniform(-3, 3)
        else:
            body["max_tokens"] = rng.randint(0, 8)
    if body.get("stream") is True and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": rng.choice([True, False, "x"])}
    return body


def random_request(rng: random.Random) -> tuple[str, str, bytes, dict]:
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    kind = rng.random()
    if kind < 0.15:
        body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
    elif kind < 0.25:
        body = json.dumps(rng.choice(WEIRD)).encode()
    elif kind < 0.3:
        body = (b"[" * rng.randint(1, 5000)) + (b"]" * rng.randint(0, 5000))
    elif kind < 0.35:
        body = b"x" * rng.randint(16 * 1024 - 10, 20 * 1024)
    else:
        body = json.dumps(mutate(rng, rng.choice([VALID_COMPLETION, VALID_CHAT]))).encode()
    path = "/v1/completions" if b"prompt" in body[:200] else "/v1/chat/completions"
    if rng.random() < 0.1:
        path = rng.choice(PATHS)
    method = "POST" if rng.random() < 0.93 else rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    r = rng.random()
    if r < 0.05:
        headers.pop("authorization")
    elif r < 0.08:
        headers["authorization"] = rng.choice(["Bearer", "Bearer ", "Basic abc", f"bearer {KEY}", "Bearer \u00e9"])
    elif r < 0.12:
        headers["content-type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded", ""])
    return method, path, body, headers


def test_random_and_malformed_requests_never_get_a_5xx(port):
    rng = random.Random(1234)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    failures = []
    for i in range(N_REQUESTS):
        method, path, body, headers = random_request(rng)
        try:
            conn.request(method, path, body, {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()})
            r = conn.getresponse()
            data = r.read()
        except (http.client.HTTPException, OSError):
            conn.close()  # the server may close a connection after a 413 or a bad request; that is fine
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        if r.status >= 500:
            failures.append((i, method, path, body[:200], r.status, data[:300]))
    conn.close()
    assert not failures, failures[:5]

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "The ", "max_tokens": 3}),
                 {"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] >= 1
    conn.request("GET", "/ready")
    assert conn.getresponse().status == 200


def test_quickstart_ending_serves_one_chat_on_loopback(port, tiny_run):
    """`raylm quickstart`'s last step (raylm.serve.local.serve_and_chat): deploys the app, sends
    one chat through HTTP, and deletes the app. Serve itself stays: it was running before (the
    session's), and the cluster is this process's own, which Serve goes down with."""
    from ray import serve

    from raylm.config import ServeConfig
    from raylm.generate import chat_reply, load_for_inference
    from raylm.serve.local import serve_and_chat, serve_running

    serve.delete("fuzz")  # it holds the route prefix "/"
    out = serve_and_chat(tiny_run, "reverse: abc", ServeConfig(port=port), max_tokens=16)
    os.environ.pop(PORT_ENV, None)
    model, tok, _ = load_for_inference(tiny_run)
    assert out["answer"] == chat_reply(model, tok, [{"role": "user", "content": "reverse: abc"}], 16, temperature=0)
    assert out["url"].startswith("http://127.0.0.1:") and out["command"] == f"raylm serve {tiny_run} --port 8000"
    with pytest.raises(urllib.error.HTTPError) as gone:  # the app is deleted: no route answers
        urllib.request.urlopen(out["url"] + "/v1/models", timeout=10)
    assert gone.value.code == 404
    assert serve_running()


def test_quickstart_on_a_joined_cluster_takes_down_the_serve_it_started(port, tiny_run):
    """The same step from a driver that joined a cluster it did not start, where Serve was
    not running: Serve goes again with the app, so the cluster is left as it was found, not
    with a controller and proxies running for nobody. Last in the module: it stops the
    module's Serve first, so that the joined driver finds none."""
    import ray
    from ray import serve

    from raylm.serve.local import serve_running

    serve.shutdown()
    assert not serve_running()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", JOINED_DRIVER, tiny_run, ray.get_runtime_context().gcs_address],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "SERVE_BEFORE False" in lines and any(x.startswith("ANSWER ") for x in lines), out.stdout
    assert "SERVE_AFTER False" in lines, out.stdout
    assert not serve_running()
