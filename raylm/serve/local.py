"""Serving on this machine: start the app on loopback and talk to it over HTTP, with the
standard library only (the quickstart's last step, and the CLI's `raylm serve`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
import uuid
from typing import Sequence

from raylm.config import ServeConfig
from raylm.errors import UserError


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


class ServeNotReady(UserError, TimeoutError):
    """The served app did not answer ready in time (a replica whose engine keeps exiting, one
    that cannot be placed, an ingress routing to nothing): a condition of the cluster, which
    `serve status` and the replicas' logs explain, not a bug to show a traceback for."""


def wait_ready(base: str, timeout: float = 120.0) -> None:
    """Block until GET {base}/ready answers 200 (the proxy may still be routing to nothing);
    `ServeNotReady`, naming the last answer, past `timeout`."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=5) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:  # the app's error body says why (its engine exited, ...)
            last = f"HTTP {e.code}{_error_message(e)}"
        except (urllib.error.URLError, OSError) as e:
            last = f"no answer ({getattr(e, 'reason', None) or e})"
        if time.monotonic() > deadline:
            raise ServeNotReady(f"{base}/ready: not ready after {timeout:.0f} s (last: {last}); `serve status` "
                                f"says why, and the replicas' logs are in {_serve_logs()}")
        time.sleep(0.25)


def _serve_logs() -> str:
    """Where Serve's processes log: the logs/serve/ of the Ray session this process is connected
    to (a local cluster's lies in a directory of raylm's choosing, not Ray's shared /tmp/ray)."""
    try:
        import ray

        node = ray._private.worker._global_node
        if node is not None:
            return os.path.join(node.get_logs_dir_path(), "serve") + "/"
    except Exception:  # noqa: BLE001 - a hint in an error message only
        pass
    return "the Ray session's logs/serve/"


def _error_message(e: urllib.error.HTTPError) -> str:
    """': <message>' of an OpenAI-style error body, else nothing."""
    try:
        message = json.loads(e.read())["error"]["message"]
    except Exception:  # noqa: BLE001 - any other body (a proxy's HTML page) adds nothing
        return ""
    finally:
        e.close()
    return f": {' '.join(str(message).split())[:200]}"


def _serve_controller():
    """Serve's controller actor on the connected cluster, or None where Serve is not running."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return None


def serve_running() -> bool:
    """Whether Serve's controller runs on the connected cluster."""
    return _serve_controller() is not None


def serve_http() -> tuple[str | None, int] | None:
    """(host, port) where the running Serve's HTTP ingress (HAProxy or the proxy actor)
    listens, which `serve.start` keeps whatever it is asked; None where Serve is not running."""
    import ray

    controller = _serve_controller()
    if controller is None:
        return None
    http = ray.get(controller.get_http_config.remote())
    return http.host, http.port


def stop_serve(timeout_s: float = 120.0, apps: Sequence[str] | None = None) -> None:
    """`serve.shutdown()` without its Ray warning, and with in-flight requests finished: the
    apps are deleted first (their replicas drain, each within its graceful_shutdown_timeout_s,
    while the proxies still carry the streams); then Serve's controller kills itself, and
    `serve.shutdown()` waits on a controller task that never returns, so the driver prints
    "Task ServeController.graceful_shutdown failed. There are infinite retries remaining..."
    when the kill ends it. Here that task returns at once (wait=False), and the wait for the
    controller's end looks the named actor up in the GCS instead, with no task in flight.
    Nothing happens where Serve is not running. `apps`: delete these apps only (those the
    caller deployed on a Serve that ran before it) and leave Serve and its other apps running.
    `timeout_s` bounds each wait, the drain's at least the apps' graceful_shutdown_timeout_s
    and a little more."""
    import ray
    from ray import serve

    controller = _serve_controller()
    if controller is None:
        return
    # The apps first: their replicas drain in-flight requests behind proxies still up. Serve's
    # own shutdown stops replicas and proxies (HAProxy too) at once, and a stream still running
    # lost its end. Deleted together, and waited on here: serve.delete's own wait gives up
    # after 60 s with a TimeoutError, and a request in flight may take the replica's whole
    # graceful_shutdown_timeout_s (60 s by default) before Serve stops the replica.
    running = list(serve.status().applications)
    names = running if apps is None else [name for name in apps if name in running]
    for name in names:
        serve.delete(name, _blocking=False)
    if names:
        drain_s = max(timeout_s, _graceful_shutdown_s(controller, names) + 30.0)
        deadline = time.monotonic() + drain_s
        while any(name in serve.status().applications for name in names):
            if time.monotonic() > deadline:
                logging.getLogger("ray.serve").warning("Serve apps %s were not deleted within %.0f s", names, drain_s)
                break
            time.sleep(0.2)
    if apps is not None:
        return
    ray.get(controller.graceful_shutdown.remote(wait=False))
    deadline = time.monotonic() + timeout_s
    while _serve_controller() is not None:
        if time.monotonic() > deadline:
            logging.getLogger("ray.serve").warning("Serve's controller did not shut down within %.0f s", timeout_s)
            return
        time.sleep(0.2)
    from ray.serve.context import _disconnect

    _disconnect()  # the cached client names a controller that is gone


def stop_app(name: str, serve_ran_before: bool) -> None:
    """Delete the app `name` this process deployed (its in-flight requests drained), and Serve
    itself where this process started it (`serve_ran_before` False) and no app is left on it.
    On a joined cluster, Serve that this process started may carry apps that other commands
    deployed on it meanwhile (a second `raylm serve --detach`, a quickstart): stopping Serve
    whole deleted them, their requests cut."""
    from ray import serve

    stop_serve(apps=[name])
    if not serve_ran_before and serve_running() and not serve.status().applications:
        stop_serve()


def _graceful_shutdown_s(controller, names: Sequence[str]) -> float:
    """The largest graceful_shutdown_timeout_s among the deployments of apps `names` (0 where
    Serve does not say): how long their replicas may drain before Serve stops them."""
    import ray

    try:
        details = ray.get(controller.get_serve_instance_details.remote(), timeout=30)
        return max((float(d["deployment_config"].get("graceful_shutdown_timeout_s") or 0.0)
                    for name in names for d in details["applications"].get(name, {}).get("deployments", {}).values()),
                   default=0.0)
    except Exception:  # noqa: BLE001 - a bound for the wait only; timeout_s stands without it
        return 0.0


def chat_placement(cfg: ServeConfig | None, running: tuple[str | None, int] | None) -> tuple[ServeConfig, str, str]:
    """(config, app name, route prefix) for `serve_and_chat`. Serve not running: the app's own
    name at "/", on cfg's port, a free one unless cfg names it. Serve running (`running`: its
    host and port, `serve_http`): its port, since Serve ignores another, and a name and route
    prefix no other app has, so that the apps there (a `raylm serve` of the user's, which is
    "raylm" at "/") stay as they are, and deleting this one touches nothing else."""
    if running is None:
        from raylm.serve.app import APP_NAME

        return cfg or ServeConfig(port=free_port()), APP_NAME, "/"
    host, port = running
    if host is None:
        raise RuntimeError("Serve runs on this cluster with its HTTP ingress disabled: nothing to send a chat to")
    name = f"raylm-chat-{uuid.uuid4().hex[:12]}"
    return dataclasses.replace(cfg or ServeConfig(), host=host, port=port), name, f"/{name}"


def serve_and_chat(run: str, message: str, cfg: ServeConfig | None = None, max_tokens: int = 32) -> dict:
    """Serve `run` on loopback (a free port unless `cfg` names one) on the connected Ray
    cluster, send one chat request through the HTTP API, delete the app, and return
    {"url", "answer", "command"}: the command starts the same server again. Where Serve runs
    already, the app goes on its port under a name and route prefix of its own
    (`chat_placement`), and the apps already there are left alone."""
    from raylm.pipeline import started_env
    from raylm.serve.app import resolve_api_key, start

    running = serve_http()
    was_running = running is not None
    cfg, name, prefix = chat_placement(cfg, running)
    key = resolve_api_key(cfg)
    # One request, at the end of a run's output: Serve's start-up and access lines at INFO
    # would only bury the answer (a server started for use keeps them: `raylm serve`).
    driver_log = logging.getLogger("ray.serve")
    level = driver_log.level
    driver_log.setLevel(logging.WARNING)
    try:
        # ERROR for Serve's own processes too: behind HAProxy its controller warns at start-up
        # that a loopback host refuses HAProxy's connections from other nodes, and a cluster
        # that raylm starts has no other node.
        base = start(run, cfg, name=name, route_prefix=prefix, log_level="ERROR")
        try:
            wait_ready(base)
            model = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"{base}/v1/models", headers={"authorization": f"Bearer {key}"} if key else {}), timeout=30).read())
            reply = post_json(f"{base}/v1/chat/completions",
                              {"model": model["data"][0]["id"], "messages": [{"role": "user", "content": message}],
                               "max_tokens": max_tokens, "temperature": 0}, key)
        finally:
            # Serve itself goes only where this call started it on a cluster that outlives this
            # process (a cluster this process started goes down with it, Serve included), and
            # only with no other app left on it (`stop_app`).
            stop_app(name, serve_ran_before=was_running or started_env() is not None)
    finally:
        driver_log.setLevel(level)
    return {"url": base, "answer": reply["choices"][0]["message"]["content"],
            "command": f"raylm serve {run} --port 8000"}
