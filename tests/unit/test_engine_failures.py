"""The engine's failure paths (raylm/serve/engine.py): a step that fails fails the requests
in flight and the engine goes on serving; a failure that even failing them does not survive
(a GPU whose every op fails after an illegal memory access, freeing a slot included) ends
every request with EngineClosed and refuses new ones, instead of leaving them all waiting on
a dead engine thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from raylm.serve.engine import Engine, EngineClosed, SamplingParams, SlotCache

PARAMS = SamplingParams(max_tokens=20, temperature=0)


@pytest.fixture
def engine(tiny_run):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = Engine.from_run(tiny_run, max_batch_size=4)
    yield eng
    if eng.alive():
        asyncio.run(eng.close())
    torch.set_num_threads(n)


async def outcome(eng, prompt):
    try:
        return [out async for out in eng.generate(prompt, PARAMS)]
    except Exception as e:  # noqa: BLE001 - the test looks at which
        return e


def two_at_once(eng, prompts):
    async def main():
        return await asyncio.wait_for(asyncio.gather(*(outcome(eng, p) for p in prompts)), 30)

    return asyncio.run(main())


def failing_batched_decode(eng, broken: threading.Event):
    """The decode step raises once two rows share it (an illegal memory access, say)."""
    real = eng._decode_fn

    def decode(model, tokens, *args, **kw):
        if tokens.shape[0] >= 2 and not broken.is_set():
            broken.set()
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(model, tokens, *args, **kw)

    eng._decode_fn = decode


def test_a_failed_step_fails_the_requests_in_it_and_the_engine_goes_on(engine):
    tok = engine.tokenizer
    prompts = [tok.encode("The"), tok.encode("In the beginning")]
    failing_batched_decode(engine, threading.Event())
    results = two_at_once(engine, prompts)
    assert all(isinstance(r, RuntimeError) and "engine step failed" in str(r) for r in results), results
    assert engine.stats()["running"] == 0 and engine.alive()
    (after,) = two_at_once(engine, prompts[:1])
    assert not isinstance(after, BaseException) and after[-1].finish_reason == "length"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_failure_that_failing_the_batch_cannot_survive_ends_every_request(engine, monkeypatch):
    tok = engine.tokenizer
    prompts = [tok.encode("The"), tok.encode("In the beginning")]
    broken = threading.Event()
    failing_batched_decode(engine, broken)
    real_move = SlotCache.move

    def move(self, *args):  # a device that fails every op once broken: compacting slots too
        if broken.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered (sticky)")
        return real_move(self, *args)

    monkeypatch.setattr(SlotCache, "move", move)
    try:
        results = two_at_once(engine, prompts)
    except asyncio.TimeoutError:
        pytest.fail("the requests in flight never ended: the engine thread died under them")
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert any(isinstance(r, EngineClosed) for r in results), results  # the one failing could not reach
    engine._thread.join(10)
    assert not engine.alive()
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0
    (late,) = two_at_once(engine, prompts[:1])  # not queued behind a dead thread
    assert isinstance(late, EngineClosed), late
