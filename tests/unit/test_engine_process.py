"""The engine in a process of its own (raylm/serve/engine_process.py): concurrent requests
through the bridge equal the in-process engine's answers, a dropped request frees its slot
and the replica's counters follow, close lets in-flight requests finish, a bad run fails in
the replica with the engine's own error, a killed engine process fails its requests, and the
engine process ends when the replica's side of the socket goes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from raylm.errors import PathNotFoundError
from raylm.serve.engine import Engine, EngineClosed, SamplingParams
from raylm.serve.engine_process import EngineProcess, EngineProcessDied

TIE = 1e-4  # greedy tokens may differ only where the reference's top-2 logprobs are this close (test_engine)

PROMPTS = ["The", "It was the best of times", "In the beginning", "A list of words: apple, river, stone"]


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def remote(tiny_run, loop):
    ep = EngineProcess(tiny_run, threads=1, max_batch_size=4)
    yield ep
    if ep.alive():
        loop.run_until_complete(ep.close())


async def collect(eng, prompt, params):
    return [out async for out in eng.generate(prompt, params)]


def test_concurrent_requests_equal_the_in_process_engine(tiny_run, remote, loop):
    tok = remote.tokenizer
    reqs = [(tok.encode(p), SamplingParams(max_tokens=12 + 3 * i, temperature=0.0 if i % 2 else 0.9, seed=i,
                                           logprobs=2, stop=("\n\n",)))
            for i, p in enumerate(PROMPTS * 2)]

    async def remote_all():
        return await asyncio.gather(*(collect(remote, ids, params) for ids, params in reqs))

    got = loop.run_until_complete(remote_all())
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    local = Engine.from_run(tiny_run, max_batch_size=4)
    try:
        want = [loop.run_until_complete(collect(local, ids, params)) for ids, params in reqs]
    finally:
        loop.run_until_complete(local.close())
        torch.set_num_threads(n)
    for (ids, params), g, w in zip(reqs, got, want):
        assert g[-1].finish_reason == w[-1].finish_reason or _tie(g, w)
        g_ids = [t for o in g for t in o.token_ids]
        w_ids = [t for o in w for t in o.token_ids]
        if g_ids != w_ids:
            assert _tie(g, w), f"{params}: {g_ids} != {w_ids}"
            continue
        assert "".join(o.text for o in g) == "".join(o.text for o in w)
        assert g[-1].completion_tokens == w[-1].completion_tokens and g[-1].prompt_tokens == len(ids)
        g_lp = [lp.logprob for o in g for lp in o.logprobs]
        w_lp = [lp.logprob for o in w for lp in o.logprobs]
        assert g_lp == pytest.approx(w_lp, abs=1e-5)


def _tie(got, want) -> bool:
    """At the first differing token, the reference's two best logprobs are within TIE."""
    g = [lp for o in got for lp in o.logprobs]
    w = [lp for o in want for lp in o.logprobs]
    for a, b in zip(g, w):
        if a.token_id != b.token_id:
            return len(b.top) >= 2 and b.top[0][1] - b.top[1][1] < TIE
    return False


def test_a_dropped_request_frees_its_slot_and_the_stats_follow(remote, loop):
    ids = remote.tokenizer.encode("The")

    async def drop_one():
        agen = remote.generate(ids, SamplingParams(max_tokens=100, temperature=0.0))
        first = await agen.__anext__()
        assert first.token_ids
        await agen.aclose()
        deadline = time.monotonic() + 10
        while remote.stats()["running"] or remote.stats()["waiting"]:
            assert time.monotonic() < deadline, remote.stats()
            await asyncio.sleep(0.02)
        return remote.stats()

    before = remote.stats()["tokens_generated"]
    after = loop.run_until_complete(drop_one())
    assert 1 <= after["tokens_generated"] - before < 100  # cut short, not run to its end


def test_bad_requests_fail_in_the_replica_naming_the_field(remote, loop):
    ids = remote.tokenizer.encode("The")
    with pytest.raises(ValueError, match="max_tokens"):
        loop.run_until_complete(collect(remote, ids, SamplingParams(max_tokens=10_000)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        loop.run_until_complete(collect(remote, [remote.vocab_size], SamplingParams(max_tokens=1)))


def test_close_finishes_in_flight_requests_then_refuses_new_ones(tiny_run, loop):
    """...and a request whose client leaves while the engine closes frees its slot then, as
    in-process, rather than running to its max_tokens before the process may end."""
    ep = EngineProcess(tiny_run, threads=1, max_batch_size=4)
    ids = ep.tokenizer.encode("In the beginning")
    longest = ep.max_seq_len - len(ids)

    async def run():
        # Submitted before the close (`open` sends at once), in flight when it comes: the
        # engine reads its socket in order. (Waiting for the stats to show them could wait for
        # ever on a loaded machine, where all three had finished before the first look.)
        shorts = [ep.open(ids, SamplingParams(max_tokens=30, temperature=0.0)) for _ in range(3)]
        leaving = ep.open(ids, SamplingParams(max_tokens=longest, temperature=0.0))
        await leaving.__anext__()
        # The engine's process is held still while the close and the client's leaving are sent,
        # so the leaving request is still running when they arrive, however loaded this
        # machine is (else it could reach its max_tokens first, and the test said nothing).
        os.kill(ep._proc.pid, signal.SIGSTOP)
        try:
            closing = asyncio.ensure_future(ep.close())
            await asyncio.sleep(0.05)  # the close is sent
            leaving.close()  # the client goes away
            await asyncio.sleep(0.05)
        finally:
            os.kill(ep._proc.pid, signal.SIGCONT)
        await closing
        outs = [[out async for out in short] for short in shorts]
        with pytest.raises(EngineClosed):
            await collect(ep, ids, SamplingParams(max_tokens=1))
        return outs

    outs = loop.run_until_complete(run())
    assert all(o[-1].finish_reason == "length" and o[-1].completion_tokens == 30 for o in outs)
    made = ep.stats()["tokens_generated"]
    assert made < 3 * 30 + longest, f"the request whose client left ran to its max_tokens ({made} tokens in all)"
    assert ep._proc.returncode == 0 and not ep.alive()


def test_a_run_that_cannot_load_raises_the_engines_own_error(tmp_path):
    with pytest.raises(PathNotFoundError, match=str(tmp_path / "missing")) as e:
        EngineProcess(str(tmp_path / "missing"), threads=1)
    assert "in the engine process" in "".join(getattr(e.value, "__notes__", []))


def test_a_killed_engine_process_fails_its_requests_and_the_replica_sees_it(tiny_run, loop):
    ep = EngineProcess(tiny_run, threads=1, max_batch_size=4)
    ids = ep.tokenizer.encode("The")

    async def run():
        agen = ep.generate(ids, SamplingParams(max_tokens=120, temperature=0.0))
        await agen.__anext__()
        os.kill(ep._proc.pid, signal.SIGKILL)
        with pytest.raises(EngineProcessDied, match="exited with code -9"):
            async for _ in agen:
                pass
        with pytest.raises(EngineProcessDied):
            await collect(ep, ids, SamplingParams(max_tokens=1))

    loop.run_until_complete(run())
    assert not ep.alive()


def test_the_engine_process_ends_when_the_replica_goes(tiny_run):
    ep = EngineProcess(tiny_run, threads=1, max_batch_size=4)
    ep._conn.close()  # what the replica's death does to its end of the socket
    assert ep._proc.wait(timeout=60) == 0
