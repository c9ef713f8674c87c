"""`raylm.serve.local.stop_serve` (`raylm serve`'s Ctrl-C) on a real local Ray cluster.

A request in flight may keep its replica draining for the app's whole
graceful_shutdown_timeout_s (60 s by default), while `serve.delete`'s own wait gives up after
60 s with a TimeoutError: `raylm serve`'s Ctrl-C under a long request ended in that traceback
and "this is a bug in raylm", with Serve left running. And a caller that deployed one app on
a Serve that ran before it deletes that app alone (`apps=`), leaving Serve and the others'
apps running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytestmark = pytest.mark.integration

HELD_S = 64.0  # past serve.delete's 60 s, within the deployment's graceful_shutdown_timeout_s


@pytest.fixture
def serve_started(ray_local):
    from ray import serve

    from raylm.serve.local import free_port, stop_serve

    stop_serve()  # a Serve an earlier test left
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    yield serve
    stop_serve()


def test_a_request_longer_than_serve_deletes_wait_drains_without_a_timeout(serve_started):
    serve = serve_started
    from raylm.serve.local import serve_running, stop_serve

    @serve.deployment(graceful_shutdown_timeout_s=HELD_S + 10, ray_actor_options={"num_cpus": 0})
    class Slow:
        def __call__(self, *_):
            time.sleep(HELD_S)
            return "finished"

    handle = serve.run(Slow.bind(), name="slow", route_prefix="/slow")
    answers: list = []
    client = threading.Thread(target=lambda: answers.append(handle.remote().result(timeout_s=HELD_S + 60)))
    client.start()
    time.sleep(3)  # the request is in the replica
    stop_serve()  # raised TimeoutError after 60 s: "Some of these applications weren't deleted after 60s"
    client.join(timeout=30)
    assert answers == ["finished"], "the request in flight did not finish"
    assert not serve_running()


def test_named_apps_go_and_serve_stays_with_the_others(serve_started):
    serve = serve_started
    from raylm.serve.local import serve_running, stop_serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        def __call__(self, *_):
            return "here"

    serve.run(Echo.bind(), name="theirs", route_prefix="/theirs")
    serve.run(Echo.bind(), name="mine", route_prefix="/mine")
    stop_serve(apps=["mine", "never-deployed"])
    assert serve_running()
    assert list(serve.status().applications) == ["theirs"]
    assert serve.get_app_handle("theirs").remote().result(timeout_s=30) == "here"


def _raylm_serve(run: str, cwd, *extra: str) -> subprocess.Popen:
    import ray

    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "raylm.cli", "serve", run, *extra], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_on_a_joined_cluster_deletes_only_raylms_app(serve_started, tiny_run, tmp_path):
    """`raylm serve` joining a cluster whose Serve already ran (RAY_ADDRESS): Ctrl-C deleted every
    app there and shut Serve down. Now only its own app goes."""
    serve = serve_started
    from raylm.serve.local import serve_running

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Theirs:
        def __call__(self, *_):
            return "still here"

    serve.run(Theirs.bind(), name="theirs", route_prefix="/theirs")
    proc = _raylm_serve(str(tiny_run), tmp_path)  # no --port: Serve's own is used (it waited on 8000)
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        assert sorted(serve.status().applications) == ["raylm", "theirs"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert serve_running()
    assert list(serve.status().applications) == ["theirs"]
    assert serve.get_app_handle("theirs").remote().result(timeout_s=30) == "still here"


def test_an_app_of_raylms_name_already_running_there_is_not_replaced(serve_started, tiny_run, tmp_path):
    """A Serve there already runs an app named raylm (a detached `raylm serve`): it was replaced
    without a word, and deleted at Ctrl-C. Refused in one line; the app stays."""
    serve = serve_started

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Detached:
        def __call__(self, *_):
            return "detached"

    serve.run(Detached.bind(), name="raylm", route_prefix="/detached")
    proc = _raylm_serve(str(tiny_run), tmp_path)
    _, err = proc.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("raylm: error:")]  # after Ray's connection lines
    assert proc.returncode == 2 and len(errors) == 1 and "already runs an app named 'raylm'" in errors[0], err
    assert "Traceback" not in err, err
    assert serve.get_app_handle("raylm").remote().result(timeout_s=30) == "detached"
