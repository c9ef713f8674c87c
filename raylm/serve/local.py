"""Serving on this machine: start the app on loopback and talk to it over HTTP, with the
standard library only (the quickstart's last step, and the CLI's `raylm serve`)."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request

from raylm.config import ServeConfig


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict, api_key: str = "", timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json",
                                          **({"authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # the server's own error body says what is wrong
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def wait_ready(base: str, timeout: float = 120.0) -> None:
    """Block until GET {base}/ready answers 200 (the proxy may still be routing to nothing)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base}/ready: not ready after {timeout:.0f} s")
        time.sleep(0.25)


def serve_running() -> bool:
    """Whether Serve's controller runs on the connected cluster."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def serve_and_chat(run: str, message: str, cfg: ServeConfig | None = None, max_tokens: int = 32) -> dict:
    """Serve `run` on loopback (a free port unless `cfg` names one) on the connected Ray
    cluster, send one chat request through the HTTP API, delete the app, and return
    {"url", "answer", "command"}: the command starts the same server again."""
    from ray import serve

    from raylm.pipeline import started_env
    from raylm.serve.app import APP_NAME, resolve_api_key, start

    cfg = cfg or ServeConfig(port=free_port())
    key = resolve_api_key(cfg)
    was_running = serve_running()
    # One request, at the end of a run's output: Serve's start-up and access lines at INFO
    # would only bury the answer (a server started for use keeps them: `raylm serve`).
    driver_log = logging.getLogger("ray.serve")
    level = driver_log.level
    driver_log.setLevel(logging.WARNING)
    try:
        # ERROR for Serve's own processes too: behind HAProxy its controller warns at start-up
        # that a loopback host refuses HAProxy's connections from other nodes, and a cluster
        # that raylm starts has no other node.
        base = start(run, cfg, log_level="ERROR")
        try:
            wait_ready(base)
            model = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"{base}/v1/models", headers={"authorization": f"Bearer {key}"} if key else {}), timeout=30).read())
            reply = post_json(f"{base}/v1/chat/completions",
                              {"model": model["data"][0]["id"], "messages": [{"role": "user", "content": message}],
                               "max_tokens": max_tokens, "temperature": 0}, key)
        finally:
            serve.delete(APP_NAME)
            # Serve itself goes only where this call started it on a cluster that outlives
            # this process. A joined cluster that already ran Serve may serve other apps; a
            # cluster this process started goes down with it, Serve included (and a
            # serve.shutdown() there has the driver print Ray's retry warning about the
            # controller's own graceful_shutdown task, which it kills mid-call).
            if not was_running and started_env() is None:
                serve.shutdown()
    finally:
        driver_log.setLevel(level)
    return {"url": base, "answer": reply["choices"][0]["message"]["content"],
            "command": f"raylm serve {run} --port 8000"}
