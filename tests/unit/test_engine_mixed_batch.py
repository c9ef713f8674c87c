"""The engine and the OpenAI service under a random mix of what clients do at once
(raylm/serve/engine.py, engine_process.py, handlers.py): every feature sharing one batch
(echo with max_tokens 0, stop strings, logprobs, seeds, top-k/top-p, greedy, prompts chunked
over several steps, late arrivals) gives each request what it gets alone, with the slotted
cache and the fixed-shape decode alike; and a mix of finished, disconnected, closed and
timed-out requests, plain and streamed, n > 1, leaves no slot, queued request or stream
counted behind, with every stream a client read to its end framed by [DONE] (or an error
event). The mixes are seeded; the single paths each have their own tests in test_engine.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from collections import Counter

import pytest
import torch

from raylm.config import ServeConfig
from raylm.serve import protocol as P
from raylm.serve.engine import Engine, SamplingParams
from raylm.serve.handlers import OpenAIService
from tests.unit.test_engine import LOGIT_ATOL, assert_same_tokens

WORDS = "the cat sat on a mat and then it ran far away into deep woods where owls live".split()


def random_requests(tok, rng: random.Random, n: int, context: int) -> list[tuple[list[int], SamplingParams, float]]:
    """(prompt ids, params, arrival delay in seconds) of `n` requests of every kind."""
    reqs = []
    for _ in range(n):
        prompt = tok.encode(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))))
        echo = rng.random() < 0.3
        max_tokens = 0 if echo and rng.random() < 0.5 else min(rng.randint(1, 30), context - len(prompt))
        params = SamplingParams(
            max_tokens=max_tokens, temperature=rng.choice([0, 0, 0.7, 1.0, 1.5]), top_k=rng.choice([0, 0, 5, 1000]),
            top_p=rng.choice([1.0, 1.0, 0.9]), seed=rng.randint(0, 100), logprobs=rng.choice([None, 0, 3]),
            echo=echo, stop=tuple(rng.sample(["o", "at", "e w", " the"], rng.randint(0, 2))),
            stop_token_ids=(tok.eos_id,))
        reqs.append((prompt, params, rng.random() * 0.05))
    return reqs


async def collect(eng, prompt, params):
    return [out async for out in eng.generate(prompt, params)]


def logprobs_of(outs) -> list[float]:
    return [lp.logprob for o in outs for lp in (o.logprobs or [])]


@pytest.mark.parametrize("kind", ["slotted", "fixed_shapes"])
@torch.no_grad()
def test_a_mixed_batch_gives_each_request_what_it_gets_alone(tiny_run, one_thread, kind):
    eng = Engine.from_run(tiny_run, max_batch_size=3, prefill_tokens_per_step=5 if kind == "slotted" else 3,
                          fixed_shapes=kind == "fixed_shapes")
    tok, model = eng.tokenizer, eng.model
    reqs = random_requests(tok, random.Random(0 if kind == "slotted" else 1), 12, eng.max_seq_len)
    assert any(p.echo and p.max_tokens == 0 for _, p, _ in reqs) and any(p.stop for _, p, _ in reqs)

    async def batched():
        async def one(prompt, params, delay):
            await asyncio.sleep(delay)
            return await collect(eng, prompt, params)
        return await asyncio.gather(*(one(*r) for r in reqs))

    try:
        together = asyncio.run(batched())
        alone = [asyncio.run(collect(eng, prompt, params)) for prompt, params, _ in reqs]
        assert eng.stats()["free_slots"] == eng.max_batch_size
    finally:
        asyncio.run(eng.close())
    for i, ((prompt, p, _), got, ref) in enumerate(zip(reqs, together, alone)):
        ids, ref_ids = [t for o in got for t in o.token_ids], [t for o in ref for t in o.token_ids]
        if ids != ref_ids:  # greedy only, at a floating-point tie of the reference's top two
            assert_same_tokens(model, prompt, ids, ref_ids, None, p.temperature == 0, f"request {i} ({p})")
            continue
        what = f"request {i} ({p})"
        assert "".join(o.text for o in got) == "".join(o.text for o in ref), what
        assert (got[-1].finish_reason, got[-1].completion_tokens) == (ref[-1].finish_reason, ref[-1].completion_tokens), what
        assert logprobs_of(got) == pytest.approx(logprobs_of(ref), abs=10 * LOGIT_ATOL), what
        plp, ref_plp = got[0].prompt_logprobs, ref[0].prompt_logprobs
        assert (plp is None) == (not p.echo) and (ref_plp is None) == (not p.echo), what
        if p.echo:
            assert len(plp) == len(prompt) and plp[0] is None, what
            assert [e.logprob for e in plp[1:]] == pytest.approx([e.logprob for e in ref_plp[1:]], abs=10 * LOGIT_ATOL)


def random_body(rng: random.Random) -> dict:
    body = {"model": "m", "max_tokens": rng.randint(1, 60), "temperature": rng.choice([0, 1.0]),
            "seed": rng.randint(0, 9), "n": rng.randint(1, 3), "stream": rng.random() < 0.6}
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
    if rng.random() < 0.5:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.5:
            body.update(logprobs=True, top_logprobs=2)
    else:
        body["prompt"] = text
        if rng.random() < 0.4:
            body["logprobs"] = 2
        if rng.random() < 0.3:
            body["echo"] = True
    if rng.random() < 0.4:
        body["stop"] = rng.sample(["o", "at", " w", "e "], 2)
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return body


@pytest.mark.parametrize("where", ["thread", "process"])
def test_abandoned_timed_out_and_finished_requests_leave_nothing_behind(tiny_run, one_thread, where):
    """40 requests at once on 3 slots: some read to their end, some whose client disconnects at
    a random moment (queued, prefilling or decoding), some streams closed after their first
    event, some past a 0.4 s request limit. Afterwards the engine has nothing running or
    waiting within a few steps of the last client's end (abandoned work is dropped, not run
    to its max_tokens) and the service no stream counted (its SSE hold grows with that count)."""
    if where == "process":
        from raylm.serve.engine_process import EngineProcess

        eng = EngineProcess(tiny_run, threads=1, max_batch_size=3, prefill_tokens_per_step=6)
    else:
        eng = Engine.from_run(tiny_run, max_batch_size=3, prefill_tokens_per_step=6)
    cfg = dataclasses.replace(ServeConfig(), request_timeout_s=0.4, stream_event_interval_s=0.002)
    service = OpenAIService(eng, cfg, "m")
    rng = random.Random(3)
    plan = [(random_body(rng), rng.random() * 0.3, rng.random() * 0.3 if rng.random() < 0.3 else None,
             rng.random() < 0.2) for _ in range(40)]
    outcomes: list = []

    async def one(body, delay, leave_after, close_early):
        chat = "messages" in body
        req = P.parse_request(json.dumps(body).encode(), P.ChatCompletionRequest if chat else P.CompletionRequest)
        gone = asyncio.Event()

        async def leave():
            if leave_after is not None:
                await asyncio.sleep(leave_after)
                gone.set()

        await asyncio.sleep(delay)
        leaving = asyncio.ensure_future(leave())
        try:
            r = await (service.chat if chat else service.completions)(req, gone.wait)
            if isinstance(r, dict):
                outcomes.append(("whole", r))
            elif close_early:
                events = r.__aiter__()
                await anext(events, None)
                await events.aclose()
                outcomes.append(("closed", None))
            else:
                text = "".join([s async for s in r])
                outcomes.append(("left" if gone.is_set() else "streamed", text))
        except Exception as e:  # noqa: BLE001 - a timeout (408) or a disconnect: what this test expects of some
            outcomes.append((type(e).__name__, e))
        finally:
            leaving.cancel()

    async def main():
        await asyncio.gather(*(one(*p) for p in plan))
        await asyncio.sleep(0.05)  # an EngineProcess's counters: as of its latest message
        done_at = eng.stats()["steps"]  # every client is done: what is left is abandoned work
        for _ in range(500):
            s = eng.stats()
            if s["running"] == 0 and s["waiting"] == 0:
                break
            await asyncio.sleep(0.01)
        return eng.stats(), done_at

    loop = asyncio.new_event_loop()  # one loop for all: an EngineProcess serves the loop that first used it
    try:
        stats, done_at = loop.run_until_complete(main())
    finally:
        loop.run_until_complete(eng.close())
        loop.close()
    assert (stats["running"], stats["waiting"], stats["free_slots"]) == (0, 0, 3), stats
    assert stats["steps"] - done_at <= 5, "abandoned requests ran on after their clients had gone"
    assert service._streams == 0
    kinds = Counter(kind for kind, _ in outcomes)
    assert kinds["streamed"] and kinds["closed"] and kinds["whole"] + kinds["APIError"], kinds  # timing decides the rest
    assert set(kinds) <= {"streamed", "whole", "closed", "left", "APIError", "ClientGone"}, outcomes
    for kind, value in outcomes:
        if kind == "APIError":
            assert value.status == 408, value.message
        if kind == "streamed":  # read to its end by a client that stayed
            last = value.split("data: ")[-1]
            assert last == "[DONE]\n\n" or json.loads(last)["error"]["code"] == "timeout", value[-300:]
