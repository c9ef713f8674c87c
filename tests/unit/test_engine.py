"""The continuous-batching engine (raylm/serve/engine.py) on the tiny trained run: concurrent
requests equal their `generate` / sequential answers, stop strings cut exactly, logprobs and
echo equal a direct forward pass's, an abandoned request frees its slot within one step.

Token parity is exact where the choice is not a floating-point tie (see the engine's module
docstring): a greedy mismatch passes only if the reference's top-2 logit gap at that step is
below TIE, a margin ten times the logit error that `test_logprobs_...` bounds."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
import torch

from raylm.generate import generate, sample_token
from raylm.serve.engine import Engine, EngineClosed, SamplingParams
from raylm.tokenizer import END

LOGIT_ATOL = 1e-5  # batched vs batch-of-one rounding, fp32 (measured: under 7e-6)
TIE = 10 * LOGIT_ATOL

PROMPTS = [
    "The",
    "It was the best of times, it was the worst of times",
    "A list of words: apple, river, stone, cloud. The word after river is",
    "In the beginning",
    "Python is a programming language that lets you work quickly and integrate systems more effectively.",
]


@pytest.fixture(scope="module")
def engine(tiny_run):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: OpenMP threads on a shared 2-core machine only slow it
    eng = Engine.from_run(tiny_run, max_batch_size=4)
    yield eng
    asyncio.run(eng.close())
    torch.set_num_threads(n)


async def collect(eng, prompt, params, log=None, tag=None):
    outs = []
    async for out in eng.generate(prompt, params):
        outs.append(out)
        if log is not None:
            log.append((tag, out.finish_reason))
    return outs


def ids_of(outs):
    return [t for o in outs for t in o.token_ids]


def text_of(outs):
    return "".join(o.text for o in outs)


def assert_same_tokens(model, prompt, got, ref, eos, greedy, what):
    """Equal, or (greedy only) differing first at a step where the reference's top-2 logits tie."""
    if got == ref:
        return
    i = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    assert greedy, f"{what}: sampled tokens differ at step {i}: {got} vs generate's {ref}"
    logits, _ = model(torch.tensor([prompt + ref[:i]]))
    top = logits[0, -1].float().topk(2).values
    assert top[0] - top[1] < TIE, f"{what}: differs from generate at step {i} (no tie: margin {top[0] - top[1]:.2e})"


@torch.no_grad()
def test_concurrent_requests_each_equal_their_generate_or_sequential_answer(engine):
    """Six requests (prompts of 1 to 20 tokens, greedy and sampled, seeds, temperatures, top-k,
    top-p, eos and end-of-turn stops) on 4 slots: two queue, one joins while the batch is
    running. Each equals `raylm.generate.generate` (top-p, which generate lacks: the same
    request alone); streamed text equals the decoded tokens."""
    tok, model = engine.tokenizer, engine.model
    end = tok.special_ids[END]
    chat, _ = tok.encode_chat([{"role": "user", "content": "the word after cat in: dog cat fish"}],
                              add_generation_prompt=True)
    reqs = [  # (prompt ids, params); request 0 runs longest, the last joins mid-batch
        (tok.encode(PROMPTS[1]), SamplingParams(max_tokens=40, temperature=0)),
        (tok.encode(PROMPTS[0]), SamplingParams(max_tokens=20, temperature=1.0, seed=1, stop_token_ids=(tok.eos_id,))),
        (tok.encode(PROMPTS[2]), SamplingParams(max_tokens=24, temperature=0.7, top_k=10, seed=2)),
        (chat, SamplingParams(max_tokens=16, temperature=0, stop_token_ids=(end,))),
        (tok.encode(PROMPTS[4]), SamplingParams(max_tokens=18, temperature=0.9, top_p=0.8, seed=3)),
        (tok.encode(PROMPTS[3]), SamplingParams(max_tokens=25, temperature=1.3, top_k=50, seed=4)),
    ]
    log: list = []
    steps0 = engine.stats()["steps"]

    async def main():
        first = [asyncio.create_task(collect(engine, p, s, log, i)) for i, (p, s) in enumerate(reqs[:-1])]
        while sum(1 for tag, _ in log if tag == 0) < 3:  # request 0 is decoding: the batch is running
            await asyncio.sleep(0.001)
        late = asyncio.create_task(collect(engine, *reqs[-1], log, len(reqs) - 1))
        return await asyncio.gather(*first, late)

    results = asyncio.run(main())
    total = sum(len(ids_of(outs)) for outs in results)
    assert engine.stats()["steps"] - steps0 < total / 2, "requests did not share decode steps"
    late_first = next(k for k, (tag, _) in enumerate(log) if tag == len(reqs) - 1)
    first_done = next(k for k, (tag, fin) in enumerate(log) if tag == 0 and fin)
    assert late_first < first_done, "the late request did not join while request 0 was running"

    for i, ((prompt, p), outs) in enumerate(zip(reqs, results)):
        got = ids_of(outs)
        assert text_of(outs) == tok.decode(got)
        assert [o.completion_tokens for o in outs][-1] == len(got) and outs[-1].prompt_tokens == len(prompt)
        assert all(o.finish_reason is None for o in outs[:-1])
        eos = p.stop_token_ids[0] if p.stop_token_ids else None
        if p.top_p < 1:
            alone = asyncio.run(collect(engine, prompt, p))
            assert got == ids_of(alone), f"request {i}: batched differs from alone"
            continue
        ref = generate(model, prompt, p.max_tokens, p.temperature, p.top_k, eos, p.seed or 0)
        assert_same_tokens(model, prompt, got, ref, eos, p.temperature == 0, f"request {i}")
        assert outs[-1].finish_reason == ("length" if len(got) == p.max_tokens else "stop")


@torch.no_grad()
def test_logprobs_equal_a_forward_pass_while_sharing_the_batch(engine):
    """logprobs=3 on a greedy and a sampled request running together with a third: each token's
    logprob and its top-3 alternatives equal log_softmax of a full forward pass of prompt +
    output, to fp32 rounding. The third ends first, from slot 0: the last slot's request moves
    into it (compaction) and must go on as if nothing happened."""
    tok = engine.tokenizer
    reqs = [(tok.encode(PROMPTS[0]), SamplingParams(max_tokens=4, temperature=1.0, seed=8)),
            (tok.encode(PROMPTS[1]), SamplingParams(max_tokens=12, temperature=0, logprobs=3)),
            (tok.encode(PROMPTS[3]), SamplingParams(max_tokens=12, temperature=1.0, seed=7, logprobs=3))]

    async def main():
        return await asyncio.gather(*(collect(engine, p, s) for p, s in reqs))

    results = asyncio.run(main())
    assert all(o.logprobs is None for o in results[0])
    for (prompt, _), outs in zip(reqs[1:], results[1:]):
        assert_logprobs_match_forward(engine, prompt, outs, 3)


def assert_logprobs_match_forward(engine, prompt, outs, k):
    got = ids_of(outs)
    lps = [lp for o in outs for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == got
    logits, _ = engine.model(torch.tensor([prompt + got]))
    # Normalised over the tokenizer's ids: a model's vocabulary padded past them has no text there.
    ref = torch.log_softmax(logits[0, len(prompt) - 1:-1, :engine.tokenizer.vocab_size].float(), -1)
    for step, (lp, row) in enumerate(zip(lps, ref)):
        assert lp.token == engine.token_text(lp.token_id)
        assert abs(lp.logprob - row[lp.token_id].item()) < LOGIT_ATOL, step
        values, ids = row.topk(k)
        assert [t for t, _ in lp.top] == [engine.token_text(i) for i in ids.tolist()]
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=LOGIT_ATOL)


@torch.no_grad()
def test_echo_with_no_new_tokens_scores_the_prompt(engine):
    tok, model = engine.tokenizer, engine.model
    prompt = tok.encode(PROMPTS[2])
    outs = asyncio.run(collect(engine, prompt, SamplingParams(max_tokens=0, echo=True, logprobs=2)))
    assert len(outs) == 1
    out = outs[0]
    assert (out.token_ids, out.text, out.finish_reason) == ([], "", "length")
    assert (out.prompt_tokens, out.completion_tokens) == (len(prompt), 0)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    ref = torch.log_softmax(model(torch.tensor([prompt]))[0][0].float(), -1)
    for i, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp.token_id == prompt[i]
        assert abs(lp.logprob - ref[i - 1, prompt[i]].item()) < LOGIT_ATOL
        assert [v for _, v in lp.top] == pytest.approx(ref[i - 1].topk(2).values.tolist(), abs=LOGIT_ATOL)
    # echo with new tokens: prompt logprobs ride on the first Output only
    outs = asyncio.run(collect(engine, prompt, SamplingParams(max_tokens=3, temperature=0, echo=True)))
    assert outs[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outs[1:])
    assert all(lp.top == [] for lp in outs[0].prompt_logprobs[1:])


def test_stop_strings_cut_exactly_even_across_tokens(engine):
    tok = engine.tokenizer
    prompt = tok.encode(PROMPTS[3])
    base = SamplingParams(max_tokens=30, temperature=1.0, seed=11)
    full_outs = asyncio.run(collect(engine, prompt, base))
    ids, text = ids_of(full_outs), text_of(full_outs)
    assert text == tok.decode(ids)
    # A stop string made of the last two characters of one token and the first of the next.
    ends = [len(tok.decode(ids[:j])) for j in range(1, len(ids))]
    stop = next(s for e in ends if e >= 2 and e < len(text) and (s := text[e - 2:e + 1]) and text.find(s) == e - 2)
    cut = text.find(stop)
    for params in (dataclasses.replace(base, stop=(stop,)),
                   dataclasses.replace(base, stop=("\x00never", stop, text[cut + 1:cut + 3] + "\x01"))):
        outs = asyncio.run(collect(engine, prompt, params))
        assert text_of(outs) == text[:cut] and outs[-1].finish_reason == "stop", (stop, params.stop)
    # A stop string whose start matches the end of the text but never completes: held back, then flushed.
    outs = asyncio.run(collect(engine, prompt, dataclasses.replace(base, stop=(text[-2:] + "\x00",))))
    assert text_of(outs) == text and outs[-1].finish_reason == "length"
    assert ids_of(outs) == ids


def test_an_abandoned_request_frees_its_slot_within_one_step(engine):
    """aclose() of the stream, and cancelling the task that consumes it: the slot is free before
    the next step ends; the request running beside them is unaffected."""
    tok = engine.tokenizer
    long = SamplingParams(max_tokens=90, temperature=0)
    prompt = tok.encode(PROMPTS[0])

    async def main():
        keeper = asyncio.create_task(collect(engine, prompt, long))
        agen = engine.generate(tok.encode(PROMPTS[3]), long, request_id="closed")
        for _ in range(3):
            await agen.__anext__()
        await agen.aclose()
        closed_at = engine.stats()["steps"]

        started = asyncio.Event()

        async def consume():
            async for _ in engine.generate(tok.encode(PROMPTS[1]), long, request_id="cancelled"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        cancelled_at = engine.stats()["steps"]
        while engine.freed_at_step("closed") is None or engine.freed_at_step("cancelled") is None:
            await asyncio.sleep(0.001)
        return closed_at, cancelled_at, await keeper

    closed_at, cancelled_at, kept = asyncio.run(main())
    assert engine.freed_at_step("closed") <= closed_at + 1
    assert engine.freed_at_step("cancelled") <= cancelled_at + 1
    assert_same_tokens(engine.model, prompt, ids_of(kept), generate(engine.model, prompt, 90, 0, 0, None, 0),
                       None, True, "the request beside them")
    assert engine.stats()["free_slots"] == engine.max_batch_size


def test_a_tiny_temperature_is_greedy_and_a_failing_request_fails_alone(engine, monkeypatch):
    """A temperature so small that logits / temperature overflows (valid JSON, within the API's
    range) samples its limit, the greedy token, instead of a NaN softmax; and whatever fails in
    one request's own sampling fails that request alone, not the batch beside it."""
    from raylm.serve import engine as engine_module

    tok = engine.tokenizer
    prompt = tok.encode(PROMPTS[1])
    greedy = generate(engine.model, prompt, 24, 0, 0, None, 0)

    async def beside(params):
        return await asyncio.gather(collect(engine, prompt, SamplingParams(max_tokens=24, temperature=0)),
                                    collect(engine, prompt, params), return_exceptions=True)

    for t in (1e-45, 1e-60):
        kept, tiny = asyncio.run(beside(SamplingParams(max_tokens=24, temperature=t, seed=1)))
        assert not isinstance(tiny, BaseException), f"temperature={t}: {tiny!r}"
        assert_same_tokens(engine.model, prompt, ids_of(tiny), greedy, None, True, f"temperature={t}")
        assert_same_tokens(engine.model, prompt, ids_of(kept), greedy, None, True, "the greedy request beside it")

    # NaN logits are a model's bug, not a small temperature: they still fail the request.
    with pytest.raises(RuntimeError):
        sample_token(torch.tensor([0.5, float("nan"), 1.0]), 0.7, 0, torch.Generator().manual_seed(0))

    real = engine_module.sample_token

    def broken(logits, temperature, *args):
        if temperature == 0.5:
            raise RuntimeError("a bug in this request's sampling")
        return real(logits, temperature, *args)

    monkeypatch.setattr(engine_module, "sample_token", broken)
    kept, failed = asyncio.run(beside(SamplingParams(max_tokens=24, temperature=0.5, seed=1)))
    assert isinstance(failed, RuntimeError) and "a bug in this request's sampling" in str(failed), failed
    assert not isinstance(kept, BaseException), f"the request beside it failed too: {kept!r}"
    assert_same_tokens(engine.model, prompt, ids_of(kept), greedy, None, True, "the request beside the failing one")
    assert engine.stats()["free_slots"] == engine.max_batch_size


def test_bad_requests_are_one_line_value_errors_naming_the_field(engine):
    bad = {"max_tokens": -1, "temperature": float("nan"), "top_p": 0.0, "top_k": -2, "stop": ("",),
           "stop_token_ids": (-1,), "seed": "x", "logprobs": 21, "echo": "yes"}
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"^{name}="):
            SamplingParams(**{name: value}).validate()
    with pytest.raises(ValueError, match="^max_tokens=0"):
        SamplingParams(max_tokens=0).validate()
    limit = engine.max_seq_len
    cases = [([], SamplingParams(), "^prompt: empty"),
             ([1, 10 ** 6], SamplingParams(), "^prompt: token id 1000000"),
             ([1] * (limit - 3), SamplingParams(max_tokens=4), f"^max_tokens=4: .*{limit} tokens"),
             ([1], SamplingParams(stop_token_ids=(10 ** 6,)), "^stop_token_ids")]
    for prompt, params, match in cases:
        with pytest.raises(ValueError, match=match):
            engine.check(prompt, params)

        async def first():
            return await engine.generate(prompt, params).__anext__()

        with pytest.raises(ValueError, match=match):
            asyncio.run(first())
    assert engine.stats()["waiting"] == 0


def test_top_p_one_leaves_sampling_unchanged_and_small_top_p_keeps_the_nucleus():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    for seed in range(20):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        old = int(torch.multinomial(torch.softmax(logits / 0.7, -1), 1, generator=g1))  # sample_token before top_p
        assert sample_token(logits, 0.7, 0, g2, 1.0) == old
    probs = torch.softmax(logits, -1)
    order = probs.argsort(descending=True)
    nucleus = set(order[: int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist())
    g = torch.Generator().manual_seed(1)
    drawn = {sample_token(logits, 1.0, 0, g, 0.6) for _ in range(300)}
    assert drawn == nucleus
    assert {sample_token(logits, 1.0, 0, g, 1e-6) for _ in range(20)} == {int(logits.argmax())}


def test_fixed_shapes_and_close_finish_in_flight_requests(engine):
    """fixed_shapes=True (the CUDA-graph layout: all slots, all keys every step) gives the same
    tokens and logprobs; close() lets running and queued requests finish, then refuses new ones."""
    tok, model = engine.tokenizer, engine.model
    eng = Engine(model, tok, max_batch_size=2, fixed_shapes=True)
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=1)

    async def main():
        tasks = [asyncio.create_task(collect(eng, p, params)) for p in prompts]  # the third queues
        while eng.stats()["running"] < 2:
            await asyncio.sleep(0.001)
        await eng.close()
        with pytest.raises(EngineClosed):
            await eng.generate(prompts[0], params).__anext__()
        return await asyncio.gather(*tasks)  # all finished (their last Outputs may still be in flight)

    for prompt, outs in zip(prompts, asyncio.run(main())):
        assert outs[-1].finish_reason == "length"
        ref = generate(model, prompt, 10, 0, 0, None, 0)
        assert_same_tokens(model, prompt, ids_of(outs), ref, None, True, "fixed shapes")
        assert_logprobs_match_forward(eng, prompt, outs, 1)
    assert not eng._thread.is_alive()


def test_chunked_prefill_equals_whole_and_a_short_prompt_is_not_held_back(engine):
    """prefill_tokens_per_step=4: a 20-odd-token prompt enters the cache 4 tokens (or its share)
    a step, beside a second long prompt and a short one. Its echoed prompt logprobs, its tokens'
    logprobs and its greedy tokens equal a whole forward pass's / `generate`'s, to fp32
    rounding; the short prompt, sent after it, gets its first token before it does (each
    prefilling prompt gets a share of every step's budget); the prefill took several steps."""
    tok, model = engine.tokenizer, engine.model
    eng = Engine(model, tok, max_batch_size=3, prefill_tokens_per_step=4)
    long_a, long_b, short = (tok.encode(PROMPTS[4]), tok.encode(PROMPTS[2]), tok.encode(PROMPTS[0]))
    assert len(long_a) > 12 and len(long_b) > 12 and len(short) <= 2
    greedy = SamplingParams(max_tokens=12, temperature=0, logprobs=2, echo=True)
    sampled = SamplingParams(max_tokens=10, temperature=0.8, seed=5, logprobs=2)
    log: list = []

    async def main():
        a = asyncio.create_task(collect(eng, long_a, greedy, log, "a"))
        b = asyncio.create_task(collect(eng, long_b, sampled, log, "b"))
        await asyncio.sleep(0)  # both queued before the short one
        s = asyncio.create_task(collect(eng, short, SamplingParams(max_tokens=3, temperature=0), log, "s"))
        return await asyncio.gather(a, b, s)

    try:
        steps0 = eng.stats()["steps"]
        outs_a, outs_b, outs_s = asyncio.run(main())
        assert eng.stats()["steps"] - steps0 >= len(long_a) // 4  # chunks, not one whole-prompt step
    finally:
        asyncio.run(eng.close())
    order = [tag for tag, _ in log]
    assert order.index("s") < order.index("a") and order.index("s") < order.index("b"), order

    ref = torch.log_softmax(model(torch.tensor([long_a]))[0][0].float(), -1)
    plp = outs_a[0].prompt_logprobs
    assert plp[0] is None and [lp.token_id for lp in plp[1:]] == long_a[1:]
    for i, lp in enumerate(plp[1:], start=1):
        assert abs(lp.logprob - ref[i - 1, long_a[i]].item()) < LOGIT_ATOL, i
        assert [v for _, v in lp.top] == pytest.approx(ref[i - 1].topk(2).values.tolist(), abs=LOGIT_ATOL)
    for prompt, outs, p in ((long_a, outs_a, greedy), (long_b, outs_b, sampled)):
        assert_logprobs_match_forward(eng, prompt, outs, 2)
        ref_ids = generate(model, prompt, p.max_tokens, p.temperature, p.top_k, None, p.seed or 0)
        assert_same_tokens(model, prompt, ids_of(outs), ref_ids, None, p.temperature == 0, "chunked prefill")


def _submit_mid_decode(eng, running, *groups: dict):
    """Run `running` alone, and submit each group of newcomers ({tag: (prompt, params)}) from
    inside a decode step, a group a step from the step after `running`'s third token on, from
    a hook on the first layer (so the timing is certain). Returns every request's outputs, the
    value of `eng.steps` at each one's first output, and at each group's submit."""
    outs: dict[str, list] = {tag: [] for tag in ("running", *(t for g in groups for t in g))}
    first_step: dict[str, int] = {}
    sent_at: list[int] = []

    def sink(tag):
        def put(items):
            for _, item in items:  # on the engine thread: record only, the test asserts
                first_step.setdefault(tag, eng.steps)
                outs[tag].append(item)
        return put

    decoding = []  # non-empty while a decode step (not a prefill) runs
    decode = eng._decode

    def in_decode(budget):
        decoding.append(True)
        try:
            decode(budget)
        finally:
            decoding.clear()

    def hook(layer, args):
        if (decoding and len(sent_at) < len(groups) and len(outs["running"]) >= 3
                and (not sent_at or eng.steps > sent_at[-1])):  # a decode step, well under way
            sent_at.append(eng.steps)
            for tag, req in groups[len(sent_at) - 1].items():
                eng.submit(*req, sink(tag))

    eng._decode = in_decode
    handle = eng.model.layers[0].register_forward_pre_hook(hook)
    try:
        eng.submit(*running, sink("running"))
        deadline = time.time() + 60
        while time.time() < deadline and not all(
                o and (isinstance(o[-1], BaseException) or o[-1].finish_reason) for o in outs.values()):
            time.sleep(0.01)
    finally:
        handle.remove()
        asyncio.run(eng.close())
    assert len(sent_at) == len(groups), "decode steps ran out before every group was sent"
    failed = [o for o in sum(outs.values(), []) if isinstance(o, BaseException)]
    assert not failed, failed[0]
    return outs, first_step, sent_at


def assert_equal_generate(eng, reqs: dict, outs: dict) -> None:
    for tag, (prompt, p) in reqs.items():
        got = ids_of(outs[tag])
        assert len(got) == p.max_tokens and outs[tag][-1].finish_reason == "length", tag
        if p.logprobs is not None:
            assert_logprobs_match_forward(eng, prompt, outs[tag], p.logprobs)
        ref = generate(eng.model, prompt, p.max_tokens, p.temperature, p.top_k, None, p.seed or 0)
        assert_same_tokens(eng.model, prompt, got, ref, None, p.temperature == 0, tag)


def test_a_request_arriving_mid_decode_gets_its_first_token_within_that_step(engine):
    """Two requests submitted from inside a decode step are prefilled before its next layer and
    their first tokens sent within that step, not after it. The first of them ends at its
    first token, so its slot is freed and the second one's keys move into it while the decode
    step is still running. Every request's tokens and logprobs still equal `generate` / a
    forward pass."""
    tok = engine.tokenizer
    eng = Engine(engine.model, tok, max_batch_size=4)
    running = (tok.encode(PROMPTS[1]), SamplingParams(max_tokens=16, temperature=0, logprobs=2))
    newcomers = {"one": (tok.encode(PROMPTS[0]), SamplingParams(max_tokens=1, temperature=0)),
                 "late": (tok.encode(PROMPTS[2]), SamplingParams(max_tokens=10, temperature=0.8, seed=7, logprobs=2))}
    outs, first_step, (sent_at,) = _submit_mid_decode(eng, running, newcomers)
    assert eng.stats()["prefills_within_decode"] == 1
    assert first_step["one"] == first_step["late"] == sent_at, (first_step, sent_at)
    assert_equal_generate(eng, {"running": running, **newcomers}, outs)


def test_a_prefill_inside_a_decode_step_keeps_to_the_steps_budget(engine):
    """prefill_tokens_per_step=4: a newcomer of 20-odd tokens that arrives mid-decode gets 4 of
    them in at once and the rest at the next steps' starts, which use each step's whole budget;
    so a short one that arrives in the next decode step is not prefilled there (nothing is left
    of that step's budget) but at the step after, beside the long one. The running request
    never waits for more than one budget's prefill a step; every answer equals `generate`'s."""
    tok = engine.tokenizer
    eng = Engine(engine.model, tok, max_batch_size=3, prefill_tokens_per_step=4)
    running = (tok.encode(PROMPTS[0]), SamplingParams(max_tokens=20, temperature=0))
    long = (tok.encode(PROMPTS[4]), SamplingParams(max_tokens=6, temperature=0, logprobs=1))
    short = (tok.encode(PROMPTS[0]), SamplingParams(max_tokens=4, temperature=0))
    assert len(long[0]) > 12
    outs, first_step, sent_at = _submit_mid_decode(eng, running, {"long": long}, {"short": short})
    assert eng.stats()["prefills_within_decode"] == 1  # the long one's first chunk only
    assert first_step["short"] == sent_at[1] + 1, (first_step, sent_at)  # the next step's prefill
    assert first_step["long"] >= sent_at[0] + (len(long[0]) - 4) // 4, (first_step, sent_at)
    assert_equal_generate(eng, {"running": running, "long": long, "short": short}, outs)


def test_stream_coalesces_a_choices_pending_outputs_in_order():
    """The SSE stream (raylm.serve.handlers) sends what piled up while it was busy as one event
    per choice: each choice's outputs merged in order, other choices and end markers kept."""
    from raylm.serve.engine import Output, TokenLogprob
    from raylm.serve.handlers import _DONE, _Choice, _coalesce

    a, b = _Choice(0, [1], SamplingParams()), _Choice(1, [1], SamplingParams())

    def out(t, finish=None):
        return Output([t], f"<{t}>", [TokenLogprob(t, "", -1.0, [])], None, finish, 1, t)

    merged = _coalesce([(a, out(1)), (b, out(2)), (a, out(3)), (a, out(4, "length")), (a, _DONE), (b, out(5))])
    assert [(c.index, o if o is _DONE else (o.token_ids, o.text, o.finish_reason, o.completion_tokens))
            for c, o in merged] == [(0, ([1, 3, 4], "<1><3><4>", "length", 4)), (1, ([2, 5], "<2><5>", None, 5)),
                                    (0, _DONE)]
    assert [lp.token_id for lp in merged[0][1].logprobs] == [1, 3, 4]
    assert _coalesce([(a, out(1, "stop")), (a, out(2))])[1][1].token_ids == [2]  # never past a finish


def test_a_busy_replica_sends_fewer_larger_events_but_never_holds_first_text_end_or_disconnect(engine):
    """raylm.serve.handlers' event budget (serve.stream_event_interval_s): with other streams in
    flight a stream holds its later outputs and sends them as one event, while a choice's first
    text, its end and a client's disconnect act at once; a lone stream, and every stream at
    interval 0, sends every step's output. The interval here is so long that holding shows in
    the events, whatever the machine's speed. The stop string (the first token's text and a
    "!") holds back the first output's text, which could start it, so the first text comes
    after an event has gone out: it must not wait for the hold. It is taken from the model's
    own greedy output, which differs between machines and library versions."""
    from raylm.config import ServeConfig
    from raylm.serve import protocol as P
    from raylm.serve.handlers import OpenAIService

    service = OpenAIService(engine, ServeConfig(stream_event_interval_s=3600.0), "tiny")
    unheld = OpenAIService(engine, ServeConfig(stream_event_interval_s=0), "tiny")
    body = {"model": "tiny", "prompt": "The ", "max_tokens": 24, "temperature": 0}

    async def never():
        await asyncio.Event().wait()

    def request(**kw):
        return P.parse_request(json.dumps({**body, **kw}).encode(), P.CompletionRequest)

    async def stream(leaves: asyncio.Event | None = None, on=service, **kw):
        """The events of a streamed completion; with `leaves`, the client goes away after the
        first text, when its stream holds what follows."""
        events = []
        async for event in await on.completions(request(stream=True, **kw), leaves.wait if leaves else never):
            events.append([json.loads(x[6:]) for x in event.split("\n\n") if x.startswith("data: {")])
            if leaves and "".join(texts(events)):
                leaves.set()
        return events

    def texts(events):
        return ["".join(c["text"] for d in e for c in d["choices"]) for e in events]

    async def cut_short():
        """A stream sharing the replica with another, whose client leaves after the first
        text: (its events, tokens the engine made for both)."""
        before = engine.stats()["tokens_generated"]
        partner = asyncio.ensure_future(stream())
        events = await stream(asyncio.Event(), max_tokens=100)
        await partner
        return events, engine.stats()["tokens_generated"] - before

    async def first_text():
        agen = engine.generate(service._prompt(body["prompt"]).ids, SamplingParams(max_tokens=24, temperature=0))
        try:
            async for out in agen:
                if out.text:
                    return out.text
        finally:
            await agen.aclose()

    async def main():
        body["stop"] = [await first_text() + "!"]
        plain = await service.completions(request(), never)
        alone = await stream()
        together = await asyncio.gather(*(stream(stream_options={"include_usage": True}) for _ in range(3)))
        together_unheld = await asyncio.gather(*(stream(on=unheld) for _ in range(3)))
        return plain, alone, together, together_unheld, await cut_short()

    plain, alone, together, together_unheld, (cut, made) = asyncio.run(asyncio.wait_for(main(), 60))
    want, n = plain["choices"][0]["text"], plain["usage"]["completion_tokens"]
    stop = body["stop"][0]
    assert n == 24 and want.startswith(stop[:-1]) and stop not in want
    assert "".join(texts(alone)) == want and len(alone) > 4  # never held: one event per engine step
    for events in together:
        got = texts(events)
        first = next(i for i, t in enumerate(got) if t)
        assert "".join(got) == want
        assert first == len(events) - 2, got  # first text at once, then everything else with the end
        assert events[-1][-1]["usage"]["completion_tokens"] == n
        assert events[-1][-2]["choices"][0]["finish_reason"] == "length"
    assert texts(cut)[-1] and made < n + 100, made  # the disconnect was acted on, not held until the end
    for events in together_unheld:  # interval 0: one event per engine step (n), whatever else is in flight
        assert "".join(texts(events)) == want and len(events) > n // 2, texts(events)
        assert not any("usage" in d for e in events for d in e)  # not asked for
    held = OpenAIService(engine, ServeConfig(), "tiny")
    held._streams = 3  # the default's hold under load: 5 ms per other stream in flight
    assert held._hold_s() == pytest.approx(2 * 0.005)


def test_a_listener_hears_every_output_in_order_queued_ones_first(engine):
    """`Outputs.listen` (how a streaming replica takes its requests' outputs, with no task per
    request): the outputs queued before it, then the rest as they arrive, the same tokens as
    reading them; the request then ends without a cancel, and its slot is free."""
    ids = engine.tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=16, temperature=0)

    async def main():
        want = [out async for out in engine.generate(ids, params)]
        outputs = engine.open(ids, params)
        while outputs._queue.qsize() < 3:  # some outputs wait in the queue before anyone listens
            await asyncio.sleep(0.001)
        heard, done = [], asyncio.Event()

        def hear(item):
            heard.append(item)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                done.set()

        outputs.listen(hear)
        await asyncio.wait_for(done.wait(), 30)
        return want, heard, outputs

    want, heard, outputs = asyncio.run(main())
    assert [t for o in heard for t in o.token_ids] == [t for o in want for t in o.token_ids]
    assert "".join(o.text for o in heard) == "".join(o.text for o in want)
    assert heard[-1].finish_reason == want[-1].finish_reason == "length"
    assert outputs._done and engine.stats()["running"] == 0


def test_a_stream_is_queued_before_its_response_reads_it_and_freed_if_never_read(engine, tiny_run):
    """raylm.serve.handlers queues a streamed request's engine work before it returns the
    response's events (the time to first token does not wait for the response to start), so
    a client that leaves before the response reads anything must still free the slot; and a
    request the engine refuses is an HTTP error, not an error event in a 200 stream."""
    from raylm.config import ServeConfig
    from raylm.serve import protocol as P
    from raylm.serve.handlers import OpenAIService

    service = OpenAIService(engine, ServeConfig(), "tiny")
    prompt = "The "
    limit = engine.max_seq_len - len(service._prompt(prompt).ids)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": limit, "temperature": 0, "stream": True}
    request = P.parse_request(json.dumps(body).encode(), P.CompletionRequest)

    def busy() -> int:
        s = engine.stats()
        return s["running"] + s["waiting"]

    async def main():
        assert busy() == 0
        leaves = asyncio.Event()
        events = await service.completions(request, leaves.wait)  # never read
        queued = busy()  # before this coroutine let the loop run anything else
        start = engine.stats()["tokens_generated"]
        deadline = time.monotonic() + 30
        while engine.stats()["tokens_generated"] == start and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        generating = engine.stats()["tokens_generated"] > start
        leaves.set()  # the client goes away; nobody ever reads `events`
        while busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        made = engine.stats()["tokens_generated"] - start
        await events.aclose()
        return queued, generating, busy(), made, service._streams

    queued, generating, left, made, streams = asyncio.run(main())
    assert queued == 1 and generating, "the request waited for its response to be read"
    assert left == 0 and made < limit, f"an unread stream kept its slot ({made} of {limit} tokens made)"
    assert streams == 0
    closed = Engine.from_run(tiny_run, max_batch_size=1)
    asyncio.run(closed.close())
    with pytest.raises(P.APIError) as e:
        asyncio.run(OpenAIService(closed, ServeConfig(), "tiny").completions(request, asyncio.Event().wait))
    assert e.value.status == 503 and e.value.headers["retry-after"]

def test_a_whole_response_hears_its_choices_and_frees_them_on_a_disconnect_or_a_bug(engine, monkeypatch):
    """The non-streaming path (`OpenAIService._run_all`, outputs heard as they arrive, no task
    per choice): n choices equal `generate`'s answer; a client that leaves mid-way gets
    ClientGone and every slot is free; a bug while adding an output reaches the caller as
    itself (a 500 with its traceback, not a hang) and frees the slots too."""
    from raylm.config import ServeConfig
    from raylm.serve import handlers
    from raylm.serve import protocol as P

    service = handlers.OpenAIService(engine, ServeConfig(), "tiny")
    prompt = "The "
    ids = service._prompt(prompt).ids
    limit = engine.max_seq_len - len(ids)

    def request(max_tokens):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "n": 3}
        return P.parse_request(json.dumps(body).encode(), P.CompletionRequest)

    def busy() -> int:
        s = engine.stats()
        return s["running"] + s["waiting"]

    async def answered():
        want = [out async for out in engine.generate(ids, SamplingParams(max_tokens=12, temperature=0))]
        got = await service.completions(request(12), asyncio.Event().wait)
        return text_of(want), got

    want, got = asyncio.run(answered())
    assert [c["text"] for c in got["choices"]] == [want] * 3
    assert got["usage"]["completion_tokens"] == 3 * 12 and busy() == 0

    async def left_midway():
        leaves = asyncio.Event()
        start = engine.stats()["tokens_generated"]
        call = asyncio.ensure_future(service.completions(request(limit), leaves.wait))
        deadline = time.monotonic() + 30
        while engine.stats()["tokens_generated"] - start < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        leaves.set()
        with pytest.raises(handlers.ClientGone):
            await asyncio.wait_for(call, 30)
        while busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return busy(), engine.stats()["tokens_generated"] - start

    left, made = asyncio.run(left_midway())
    assert left == 0 and made < 3 * limit, f"a client that left kept its slots ({made} of {3 * limit} tokens made)"

    def broken_add(self, out):
        raise RuntimeError("a bug while adding an output")

    monkeypatch.setattr(handlers._Choice, "add", broken_add)

    async def bug():
        with pytest.raises(RuntimeError, match="a bug while adding"):
            await asyncio.wait_for(service.completions(request(limit), asyncio.Event().wait), 30)
        deadline = time.monotonic() + 30
        while busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return busy()

    assert asyncio.run(bug()) == 0, "a request that hit a bug kept its slots"


def test_a_prompt_that_fills_the_context_with_no_max_tokens(engine):
    """Echo scores it (no room is needed to score a prompt); without echo it is refused as
    context_length_exceeded, naming the prompt rather than a max_tokens never sent."""
    from raylm.config import ServeConfig
    from raylm.serve import protocol as P
    from raylm.serve.handlers import OpenAIService

    service = OpenAIService(engine, ServeConfig(), "tiny")
    ids = (engine.tokenizer.encode("the river and the stone ") * engine.max_seq_len)[:engine.max_seq_len]

    def request(**extra):
        body = {"model": "tiny", "prompt": ids, "max_tokens": None, **extra}
        return P.parse_request(json.dumps(body).encode(), P.CompletionRequest)

    got = asyncio.run(service.completions(request(echo=True, logprobs=0), asyncio.Event().wait))
    assert len(got["choices"][0]["logprobs"]["tokens"]) == len(ids) and got["usage"]["completion_tokens"] == 0
    with pytest.raises(P.APIError) as e:
        asyncio.run(service.completions(request(), asyncio.Event().wait))
    assert e.value.status == 400 and e.value.body()["error"]["code"] == "context_length_exceeded"
    assert e.value.body()["error"]["param"] == "prompt"


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(engine):
    """vLLM's stream option, accepted by this server: every chunk carries the usage of what
    has been sent so far (counting each choice's tokens as they go out), the last the total."""
    from raylm.config import ServeConfig
    from raylm.serve import protocol as P
    from raylm.serve.handlers import OpenAIService

    service = OpenAIService(engine, ServeConfig(), "tiny")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 10,
            "temperature": 0, "n": 2, "logprobs": True, "stream": True,
            "stream_options": {"continuous_usage_stats": True}}
    request = P.parse_request(json.dumps(body).encode(), P.ChatCompletionRequest)

    async def main():
        events = await service.chat(request, asyncio.Event().wait)
        return "".join([e async for e in events])

    chunks = [json.loads(line[6:]) for line in asyncio.run(main()).split("\n\n")
              if line.startswith("data: ") and line != "data: [DONE]"]
    usages = [c.get("usage") for c in chunks]
    assert all(u is not None for u in usages), "a chunk without usage"
    assert usages[0]["completion_tokens"] == 0 and usages[-1]["completion_tokens"] == 2 * 10
    sent, so_far = 0, []  # tokens in the chunks up to each one (a token, a logprobs entry)
    for c in chunks:
        sent += sum(len((ch.get("logprobs") or {}).get("content") or []) for ch in c["choices"])
        so_far.append(sent)
    assert [u["completion_tokens"] for u in usages] == so_far
    assert {u["prompt_tokens"] for u in usages} == {usages[0]["prompt_tokens"]}


def test_compiled_engine_gives_the_same_tokens_and_logprobs_without_recompiling(engine):
    """serve.compile: the decode step and the prefill forward compiled (on this CPU, inductor's
    C++ kernels) before any request, then the same tokens and logprobs as `generate`, with
    requests of different lengths sharing the fixed-shape batch, and no graph compiled while
    serving. A prefill budget of 3 tokens a step makes every prefill shape the compiled one
    must take in one graph: a lone request (padded with the scratch row), three one-token chunks
    (padded with a dummy token), groups of two and three; and, with the context cut to 127, an echo of
    a 127-token prompt, whose last chunk is one token at the last position (run eager)."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on a CPU needs a C++ compiler; none on PATH")
    tok, model = engine.tokenizer, engine.model
    before = _compiled_frames()
    eng = Engine(model, tok, max_batch_size=3, max_seq_len=127, prefill_tokens_per_step=3, compile=True)
    compiled = _compiled_frames()
    assert compiled >= before + 2, "the decode step and the prefill were not compiled before the first request"
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=1)
    long_prompt = (tok.encode(PROMPTS[4]) * 10)[:127]

    async def main():
        return await asyncio.gather(*[collect(eng, p, params) for p in prompts])

    try:
        for prompt, outs in zip(prompts, asyncio.run(main())):
            ref = generate(model, prompt, 10, 0, 0, None, 0)
            assert_same_tokens(model, prompt, ids_of(outs), ref, None, True, "compiled")
            assert_logprobs_match_forward(eng, prompt, outs, 1)
        (out,) = asyncio.run(collect(eng, long_prompt, SamplingParams(max_tokens=0, echo=True)))
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([long_prompt]))[0][0].float(), -1)
        assert len(out.prompt_logprobs) == len(long_prompt)
        for i, lp in enumerate(out.prompt_logprobs[1:], start=1):
            assert abs(lp.logprob - ref[i - 1, long_prompt[i]].item()) < LOGIT_ATOL, i
        assert _compiled_frames() == compiled, "serving compiled another graph"
    finally:
        asyncio.run(eng.close())


def _compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def padded_engine(tmp_path_factory):
    """An engine over a tiny run whose tokenizer has 400 ids and whose model's vocabulary is
    padded to 448 (raylm's default: the tokenizer's size rounded up to a multiple of 64)."""
    import tests.tiny_run as T

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(T, "VOCAB", 400)
        run = T.make_tiny_run(str(tmp_path_factory.mktemp("padded-run")))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = Engine.from_run(run, max_batch_size=4)
    assert (eng.tokenizer.vocab_size, eng.model.cfg.vocab_size) == (400, 448)
    yield eng
    asyncio.run(eng.close())
    torch.set_num_threads(n)


@torch.no_grad()
def test_a_padded_vocabulary_samples_as_generate_does(padded_engine):
    """Sampled requests sharing the batch draw over the tokenizer's ids only, as `raylm
    generate` does (`vocab_size=tok.vocab_size`): the same tokens, none a padding id, and
    logprobs normalised over those ids."""
    eng = padded_engine
    tok, model = eng.tokenizer, eng.model
    reqs = [(tok.encode(p), SamplingParams(max_tokens=20, temperature=1.5, seed=seed, logprobs=5))
            for seed, p in enumerate(PROMPTS[:4])]

    async def main():
        return await asyncio.gather(*(collect(eng, p, s) for p, s in reqs))

    for (prompt, p), outs in zip(reqs, asyncio.run(main())):
        got = ids_of(outs)
        assert got == generate(model, prompt, 20, 1.5, 0, None, p.seed, vocab_size=tok.vocab_size)
        assert max(got) < tok.vocab_size
        assert_logprobs_match_forward(eng, prompt, outs, 5)


@torch.no_grad()
def test_padding_ids_are_never_chosen_scored_or_accepted(padded_engine, monkeypatch):
    """Even where the model rates the padding ids highest (here: +30 on their logits), a greedy
    request's tokens, top logprobs and echoed prompt's logprobs hold only the tokenizer's ids,
    and a prompt or stop token among the padding ids is refused."""
    eng = padded_engine
    tok, model, V = eng.tokenizer, eng.model, eng.tokenizer.vocab_size
    bonus = torch.zeros(model.cfg.vocab_size)
    bonus[V:] = 30.0
    monkeypatch.setattr(model, "logits", lambda h, logits=model.logits: logits(h) + bonus)
    prompt = tok.encode(PROMPTS[2])
    outs = asyncio.run(collect(eng, prompt, SamplingParams(max_tokens=8, temperature=0, logprobs=3, echo=True)))
    got = ids_of(outs)
    assert got == generate(model, prompt, 8, 0, 0, None, 0, vocab_size=V)
    assert_logprobs_match_forward(eng, prompt, outs, 3)
    ref = torch.log_softmax(model(torch.tensor([prompt]))[0][0, :, :V].float(), -1)
    for i, lp in enumerate(outs[0].prompt_logprobs[1:], start=1):
        assert abs(lp.logprob - ref[i - 1, prompt[i]].item()) < LOGIT_ATOL
        assert "" not in dict(lp.top)
    for ids, params in [(prompt + [V], SamplingParams()), (prompt, SamplingParams(stop_token_ids=(V,)))]:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            eng.check(ids, params)


def _service(engine):
    from raylm.config import ServeConfig
    from raylm.serve.handlers import OpenAIService

    return OpenAIService(engine, ServeConfig(stream_event_interval_s=0), "tiny")


def _complete(service, **body) -> dict | list:
    """A completions response, or a stream's chunks."""
    from raylm.serve import protocol as P

    request = P.parse_request(json.dumps({"model": "tiny", **body}).encode(), P.CompletionRequest)

    async def main():
        got = await service.completions(request, asyncio.Event().wait)
        return got if isinstance(got, dict) else "".join([e async for e in got])

    got = asyncio.run(main())
    if isinstance(got, dict):
        return got
    return [json.loads(x[6:]) for x in got.split("\n\n") if x.startswith("data: ") and x != "data: [DONE]"]


def test_an_echoed_prompts_first_token_is_its_piece_and_offsets_count_characters(engine):
    """Echo with logprobs: the prompt's first token is its piece, as every other token's entry
    ("<0xC3>" for the first byte of "\u00fc"), not a decoded U+FFFD, so the pieces' bytes join
    into the text and each text_offset counts the characters before it ("b" is at 1)."""
    from raylm.serve import protocol as P

    text = "\u00fcber alles"
    first = engine.tokenizer.id_to_piece(engine.tokenizer.encode(text)[0])
    assert P._BYTE_PIECE.fullmatch(first)
    got = _complete(_service(engine), prompt=text, max_tokens=3, temperature=0, logprobs=0, echo=True)["choices"][0]
    lp = got["logprobs"]
    assert lp["tokens"][0] == first
    pieces = [P.token_bytes(t) for t in lp["tokens"]]
    assert b"".join(pieces).decode("utf-8") == got["text"]
    assert lp["text_offset"] == [len(b"".join(pieces[:i]).decode("utf-8", "ignore")) for i in range(len(pieces))]
    assert lp["text_offset"][2] == 1 and got["text"][1] == "b"


def test_each_prompt_of_a_list_is_seeded_as_raylm_generate_seeds_it(engine):
    """Choice i, counted over all prompts, gets seed + i: a list of prompts answers as
    `raylm.generate.complete` (prompt i: seed + i), and with n = 2 prompt p's choices j get
    seed + 2p + j, as one prompt's n choices always had."""
    from raylm.generate import complete

    tok, model = engine.tokenizer, engine.model
    prompts = [PROMPTS[0], PROMPTS[3], PROMPTS[1]]
    service = _service(engine)
    got = _complete(service, prompt=prompts, max_tokens=12, temperature=1.0, seed=5)["choices"]
    assert [p + c["text"] for p, c in zip(prompts, got)] == complete(model, tok, prompts, 12, 1.0, 0, 5)
    got = _complete(service, prompt=prompts[:2], n=2, max_tokens=12, temperature=1.0, seed=5)["choices"]
    for c in got:
        p = prompts[c["index"] // 2]
        want = generate(model, tok.encode(p), 12, 1.0, 0, tok.eos_id, 5 + c["index"], vocab_size=tok.vocab_size)
        assert c["text"] == tok.decode(want), c["index"]


def test_streamed_text_offsets_go_on_across_chunks(engine):
    """A streamed completion's text_offset counts on from chunk to chunk (the echoed prompt
    included), so they equal the whole response's."""
    service = _service(engine)
    body = dict(prompt="\u00fcber the river", max_tokens=8, temperature=0, logprobs=1, echo=True)
    whole = _complete(service, **body)["choices"][0]["logprobs"]["text_offset"]
    chunks = _complete(service, **body, stream=True)
    assert len(chunks) > 2, "one chunk: nothing to count across"
    assert [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]] == whole
    assert len(whole) == len(engine.tokenizer.encode(body["prompt"])) + 8


def test_the_engine_keeps_no_sink_for_an_event_loop_that_has_closed(engine):
    """Each event loop that queues a request gets its own sink, which holds the loop; one per
    loop ever used kept every closed loop (and its selector) alive for the engine's life."""
    prompt = engine.tokenizer.encode("The")
    for _ in range(4):
        asyncio.run(collect(engine, prompt, SamplingParams(max_tokens=2, temperature=0)))
    assert len(engine._loop_sinks) == 1, engine._loop_sinks
