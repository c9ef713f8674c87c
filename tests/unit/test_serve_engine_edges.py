"""Edges of the serving engine and the app around it (raylm/serve/engine.py, raylm/serve/app.py):
a replica whose engine has died (its thread in the replica, or its process) says so on its
probes (`/ready` and `/health` 503) instead of reporting ready while every request gets 503
until Serve's health check replaces it; a draining one is alive but not ready."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from raylm.config import ServeConfig
from raylm.serve.engine import EngineClosed, SamplingParams, SlotCache
from tests.unit.test_engine_failures import engine  # noqa: F401  (a fixture: a real engine on the tiny run)

# The replicas made here without Serve are dropped unawaited: their ingress wrapper's async __del__.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")




def replica(run: str, engine):
    """The app's deployment class and one of its replicas holding `engine`, made without the
    __init__ that needs Serve (its routes and checks read only `service`)."""
    from raylm.serve.app import build_app
    from raylm.serve.handlers import OpenAIService

    cfg = ServeConfig()
    cls = build_app(run, cfg)._bound_deployment.func_or_class
    self = cls.__new__(cls)
    self.service = OpenAIService(engine, cfg, "tiny")
    return cls, self


def status_of(response) -> int:
    return 200 if isinstance(response, dict) else response.status_code


def kill_engine_thread(eng, monkeypatch) -> None:
    """A device that fails every op from some point on (a GPU after an illegal memory access):
    the decode step fails, and so does freeing a slot while failing the batch, which ends the
    engine thread (`Engine._abandon`)."""

    def broken(*args, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    eng._decode_fn = broken
    monkeypatch.setattr(SlotCache, "move", broken)
    params = SamplingParams(max_tokens=4, temperature=0)
    prompts = [eng.tokenizer.encode("The"), eng.tokenizer.encode("In the beginning")]

    async def main():
        async def one(p):
            try:
                return [o async for o in eng.generate(p, params)]
            except Exception as e:  # noqa: BLE001 - how each ended is not what this test checks
                return e
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 30)

    assert any(isinstance(r, EngineClosed) for r in asyncio.run(main()))
    eng._thread.join(10)
    assert not eng.alive()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_probes_report_a_replica_whose_engine_thread_died(tiny_run, engine, monkeypatch):  # noqa: F811
    cls, self = replica(tiny_run, engine)
    assert status_of(asyncio.run(cls.ready(self))) == 200
    assert status_of(asyncio.run(cls.health(self))) == 200
    kill_engine_thread(engine, monkeypatch)
    with pytest.raises(RuntimeError, match="engine has exited"):
        cls.check_health(self)  # Serve's own check: the replica is replaced, in time
    ready, health = asyncio.run(cls.ready(self)), asyncio.run(cls.health(self))
    assert status_of(ready) == 503 and b"engine" in ready.body, "ready while every request gets 503"
    assert status_of(health) == 503 and b"engine" in health.body


def test_probes_report_a_replica_whose_engine_process_died(tiny_run):
    """The default replica (`serve.engine_process`): its engine's process killed (out of memory)."""
    from raylm.serve.engine_process import EngineProcess

    ep = EngineProcess(tiny_run, threads=1, max_batch_size=2)
    cls, self = replica(tiny_run, ep)
    assert status_of(asyncio.run(cls.ready(self))) == 200
    os.kill(ep._proc.pid, signal.SIGKILL)
    ep._proc.wait(30)
    assert status_of(asyncio.run(cls.ready(self))) == 503
    assert status_of(asyncio.run(cls.health(self))) == 503
    ep._conn.close()


def test_a_draining_replica_is_alive_but_not_ready(tiny_run, engine):  # noqa: F811
    """Graceful shutdown: not ready from its start, while in-flight requests finish; alive
    throughout, the engine thread's end included (it ends because the replica closed it)."""
    cls, self = replica(tiny_run, engine)
    asyncio.run(self.service.close())
    assert not engine.alive()
    assert status_of(asyncio.run(cls.ready(self))) == 503
    assert status_of(asyncio.run(cls.health(self))) == 200
    cls.check_health(self)
