"""The engine's process (raylm/serve/engine_process.py) and the replica's health check
(raylm/serve/app.py) when that process ends its load with a SystemExit or KeyboardInterrupt, or
hangs once loaded. No Ray: the bridge and the deployment class are driven directly."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time

import pytest

from raylm.config import ServeConfig
from raylm.serve.engine import SamplingParams
from raylm.serve.engine_process import EngineProcess, EngineProcessDied

# The replicas made here without Serve are dropped unawaited: their ingress wrapper's async __del__.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")


@pytest.mark.parametrize("raised, named", [("SystemExit(3)", "SystemExit: 3"),
                                           ("KeyboardInterrupt()", "KeyboardInterrupt")])
def test_a_load_ended_by_a_base_exception_fails_the_replica_naming_it(tmp_path, monkeypatch, raised, named):
    """A SystemExit (a library calling sys.exit) or KeyboardInterrupt raised in the engine
    process while it loaded the model crossed the bridge and was re-raised in the replica as
    itself: the replica exited (Ray takes a SystemExit for an actor's own wish to end) without
    a line saying why. It must fail the replica's start with an ordinary error naming the
    cause, the engine process's traceback kept as a note."""
    hook = tmp_path / "hook"
    hook.mkdir()
    # In the engine process only (the variable below), the load ends with `raised`.
    (hook / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os
        if os.environ.get("RAYLM_TEST_LOAD_RAISES"):
            from raylm.serve import engine

            def from_run(cls, uri, *args, **kw):
                raise {raised}

            engine.Engine.from_run = classmethod(from_run)
    """))
    monkeypatch.setenv("RAYLM_TEST_LOAD_RAISES", "1")
    monkeypatch.syspath_prepend(str(hook))  # the engine process's import path is the replica's
    try:
        EngineProcess(str(tmp_path / "run"), threads=1)
    except BaseException as e:  # noqa: BLE001: which one is what this test checks
        error = e
    else:
        pytest.fail("the engine process's load raised nothing in the replica")
    assert isinstance(error, EngineProcessDied), f"the replica got {error!r}, which ends it without a word"
    message = str(error)
    assert "\n" not in message and named in message and "loading" in message
    notes = "".join(getattr(error, "__notes__", []))
    assert "in the engine process" in notes and f"raise {raised}" in notes  # the traceback, for the bug


def _replica(run: str, engine):
    """The app's deployment class and one of its replicas holding `engine`, made without the
    __init__ that needs Serve (its checks read only `service`)."""
    from raylm.serve.app import build_app
    from raylm.serve.handlers import OpenAIService

    cfg = ServeConfig()
    cls = build_app(run, cfg)._bound_deployment.func_or_class
    self = cls.__new__(cls)
    self.service = OpenAIService(engine, cfg, "tiny")
    return cls, self


def test_a_hung_engine_process_fails_the_health_check_and_is_ended(tiny_run, monkeypatch):
    """The replica's health check asked only whether the engine process had exited: one that
    was there but hung (stopped, stuck in a C call) passed it for ever, so Serve never
    replaced the replica, and every request to it waited until its own timeout. Now the check
    fails once the process has left a ping unanswered past a bounded time, and ends the
    process (hung, it would not see the replica go, and would keep its memory): a request
    waiting on it fails then instead of waiting on."""
    from raylm.serve import app

    monkeypatch.setattr(app, "ENGINE_PING_TIMEOUT_S", 1.0, raising=False)

    async def main():
        loop = asyncio.get_running_loop()
        ep = EngineProcess(tiny_run, threads=1, max_batch_size=2)  # on the event loop, as Serve builds it
        try:
            cls, self = _replica(tiny_run, ep)

            def check():  # Serve calls a sync check_health on a thread of its own
                return loop.run_in_executor(None, cls.check_health, self)

            # A live engine answers each ping (before the request sent after it, on one socket):
            # past the limit, the check still passes.
            ids = ep.tokenizer.encode("The")
            await check()
            await _collect(ep, ids)
            await asyncio.sleep(1.5)
            await check()
            await _collect(ep, ids)
            os.kill(ep._proc.pid, signal.SIGSTOP)  # there, and answering nothing
            waiting = asyncio.ensure_future(_collect(ep, ids))
            failed = []

            async def health_fails():
                try:
                    await check()
                except RuntimeError as e:
                    failed.append(e)
                return bool(failed)

            deadline = time.monotonic() + 30
            while not await health_fails():
                assert time.monotonic() < deadline, "the health check passed a hung engine process"
                await asyncio.sleep(0.2)
            assert "not answered" in str(failed[0])
            deadline = time.monotonic() + 30
            while ep.alive():
                assert time.monotonic() < deadline, "the hung engine process was left running"
                await asyncio.sleep(0.05)
            with pytest.raises(RuntimeError, match="engine has exited"):
                await check()
            with pytest.raises(EngineProcessDied):
                await asyncio.wait_for(waiting, 30)  # it fails, rather than waiting for good
        finally:
            if ep._proc.poll() is None:
                ep._proc.kill()
                ep._proc.wait()
            ep._conn.close()

    asyncio.run(main())


async def _collect(ep, ids):
    return [out async for out in ep.generate(ids, SamplingParams(max_tokens=4, temperature=0.0))]
