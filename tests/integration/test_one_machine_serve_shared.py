"""`raylm quickstart`'s last step (`serve_and_chat`) on a cluster it joined, where Serve was not
running: it starts Serve, and takes it down again at the end. Another command's app deployed
on that Serve meanwhile (a second quickstart's, a `raylm serve` of the same cluster) was
deleted with it, its requests cut: Serve now goes only where no app is left on it."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_an_app_deployed_meanwhile_keeps_serve_running(ray_local, tiny_run, monkeypatch):
    from ray import serve

    from raylm import pipeline
    from raylm.config import ServeConfig
    from raylm.serve import local
    from raylm.serve.app import start

    local.stop_serve()  # a Serve an earlier test left: this call starts its own
    monkeypatch.setattr(pipeline, "STARTED_WITH", None)  # as a driver that joined a cluster it did not start
    real_post_json = local.post_json
    other: dict = {}

    def post_json(url, body, api_key="", timeout=120.0):
        # Another command deploys its app on the Serve that serve_and_chat started.
        other["url"] = start(tiny_run, ServeConfig(), name="another-command", route_prefix="/another-command",
                             log_level="ERROR")
        return real_post_json(url, body, api_key, timeout)

    monkeypatch.setattr(local, "post_json", post_json)
    try:
        out = local.serve_and_chat(tiny_run, "reverse: abc", max_tokens=4)
        assert out["answer"] is not None
        assert local.serve_running(), "Serve was stopped under another command's app"
        assert list(serve.status().applications) == ["another-command"]
        local.wait_ready(other["url"], timeout=30)
    finally:
        monkeypatch.undo()
        local.stop_serve()


def test_raylm_serves_ctrl_c_leaves_apps_other_commands_deployed(ray_local, tiny_run):
    """`raylm serve` on a joined cluster where Serve was not running starts Serve, and its
    Ctrl-C (`stop_app`, as cmd_serve calls it) stopped Serve whole: an app another command
    deployed on it meanwhile was deleted, its requests cut. Only raylm's app goes now; Serve
    goes too where nothing else is left on it."""
    from ray import serve

    from raylm.config import ServeConfig
    from raylm.serve import local
    from raylm.serve.app import APP_NAME, start

    local.stop_serve()  # a Serve an earlier test left: this test starts its own
    try:
        start(tiny_run, ServeConfig(), log_level="ERROR")
        url = start(tiny_run, ServeConfig(), name="another-command", route_prefix="/another-command",
                    log_level="ERROR")
        local.stop_app(APP_NAME, serve_ran_before=False)
        assert local.serve_running(), "Serve was stopped under another command's app"
        assert list(serve.status().applications) == ["another-command"]
        local.wait_ready(url, timeout=30)
        local.stop_app("another-command", serve_ran_before=False)  # the last app: Serve goes with it
        assert not local.serve_running()
    finally:
        local.stop_serve()
