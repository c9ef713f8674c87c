"""Sampling semantics shared by `raylm.generate` and the server's engine: `sample_token`'s
filters as Hugging Face's warpers apply them (temperature, then top-k keeping ties at the
boundary, then top-p keeping the token that crosses it), and `generate` taking top_p, so a
seeded server request with top_p equals its `generate` whatever shares the batch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from raylm.generate import complete, generate, sample_token
from raylm.serve.engine import Engine, SamplingParams


def drawn(logits, temperature, top_k, top_p, n=300):
    g = torch.Generator().manual_seed(0)
    return {sample_token(logits, temperature, top_k, g, top_p) for _ in range(n)}


def test_filters_follow_hugging_face_warpers():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log()
    assert drawn(logits, 1.0, 0, 0.5) == {0}  # the first token alone reaches 0.5
    assert drawn(logits, 1.0, 0, 0.6) == {0, 1}  # the token that crosses top_p is kept
    assert drawn(logits, 1.0, 0, 0.81) == {0, 1, 2}
    # Temperature first: at 0.5 the first token holds 0.66 of the mass, so top_p=0.6 keeps it alone
    # (top_p before temperature would keep two).
    assert drawn(logits, 0.5, 0, 0.6) == {0}
    # top_k keeps every token tied with the k-th, as HF's TopKLogitsWarper (`scores < kth` removed).
    assert drawn(torch.tensor([3.0, 1.0, 1.0, 1.0, 0.0]), 1.0, 2, 1.0) == {0, 1, 2, 3}
    assert drawn(logits, 1.0, 1, 1.0) == {int(logits.argmax())} == {sample_token(logits, 0, 0, None)}


@pytest.fixture(scope="module")
def engine(tiny_run):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = Engine.from_run(tiny_run, max_batch_size=4)
    yield eng
    asyncio.run(eng.close())
    torch.set_num_threads(n)


@torch.no_grad()
def test_generate_with_top_p_equals_a_seeded_server_request_beside_others(engine):
    tok, model = engine.tokenizer, engine.model
    prompt = tok.encode("It was the best of times")
    params = SamplingParams(max_tokens=24, temperature=1.3, top_p=0.7, seed=5)
    other = SamplingParams(max_tokens=30, temperature=0.9, seed=1)

    async def run():
        async def ids(p, sp):
            return [t async for o in engine.generate(p, sp) for t in o.token_ids]
        return await asyncio.gather(ids(prompt, params), ids(tok.encode("In the beginning"), other))

    got, _ = asyncio.run(run())
    ref = generate(model, prompt, 24, 1.3, 0, None, 5, vocab_size=tok.vocab_size, top_p=0.7)
    assert got == ref
    # top_p mattered here: without it, the same seed draws other tokens.
    assert generate(model, prompt, 24, 1.3, 0, None, 5, vocab_size=tok.vocab_size) != ref
    # `complete` (what `raylm generate` prints) passes top_p on; no eos in `ref`, or it would end there.
    assert tok.eos_id not in ref
    assert complete(model, tok, ["It was the best of times"], 24, 1.3, 0, seed=5, top_p=0.7) == [
        "It was the best of times" + tok.decode(ref)]


def test_raylm_generate_takes_top_p(engine, tiny_run, capsys):
    from raylm.cli import main

    tok, model = engine.tokenizer, engine.model
    args = ["generate", tiny_run, "--prompt", "It was the best of times", "--max-new-tokens", "24",
            "--temperature", "1.3", "--top-k", "0", "--seed", "5"]
    assert main([*args, "--top-p", "0.7"]) in (0, None)
    want = complete(model, tok, ["It was the best of times"], 24, 1.3, 0, seed=5, top_p=0.7)[0]
    assert capsys.readouterr().out == f"{want}\n---\n"
    for bad in ("0", "1.5", "nan"):
        assert main([*args, "--top-p", bad]) == 2
        assert capsys.readouterr().err.strip() == f"raylm: error: --top-p {float(bad)}: expected a number in (0, 1]; " \
                                                  f"1: no cut-off"
