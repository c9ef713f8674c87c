"""Decoding with the static KV cache: fixed shapes per step, correct masking, and the compiled
step (what benchmarks/decode_throughput.py --compile runs) gives the tokens of the plain path."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from raylm.config import ModelConfig
from raylm.generate import compile_decode_step, generate, greedy_decode, last_logits, sample_token
from raylm.model import build_model

CFG = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, ffn_multiple_of=16)


def _tokens(B, T, seed):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def reference_greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """No cache at all: the whole sequence through the model for every new token."""
    seq = prompt
    for _ in range(new_tokens):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:]


@pytest.mark.parametrize("qk_norm", [False, True])
@torch.no_grad()
def test_static_steps_match_full_forward_whatever_the_unwritten_slots_hold(qk_norm):
    """Teacher-forced: the logits of each fixed-shape step equal the full forward's. The slots
    after the current position are filled with large garbage first (what a reused cache holds):
    a mask that let a query see them would change every step."""
    model = build_model(replace(CFG, qk_norm=qk_norm), seed=3).eval()
    tokens = _tokens(2, 14, seed=4)
    full, _ = model(tokens)
    caches = model.make_caches(2, max_len=20)
    g = torch.Generator().manual_seed(5)
    for c in caches:
        c.k.copy_(100 * torch.randn(c.k.shape, generator=g))
        c.v.copy_(100 * torch.randn(c.v.shape, generator=g))
    got = [last_logits(model, tokens[:, :5], caches, 0)]  # prefill: int start
    pos = torch.tensor(5)
    for t in range(5, 14):
        got.append(last_logits(model, tokens[:, t:t + 1], caches, pos))
        pos += 1
    torch.testing.assert_close(torch.stack(got, dim=1), full[:, 4:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_static_prefill_and_multi_token_chunks_match_full_forward():
    """The tensor path also takes several tokens at once (a prefill with start=tensor(0), then a
    chunk): causal masking inside the chunk, and past the chunk."""
    model = build_model(CFG, seed=6).eval()
    tokens = _tokens(2, 12, seed=7)
    full, _ = model(tokens)
    caches = model.make_caches(2, max_len=16)
    a, _ = model(tokens[:, :6], caches=caches, start=torch.tensor(0))
    b, _ = model(tokens[:, 6:10], caches=caches, start=torch.tensor(6))
    c, _ = model(tokens[:, 10:12], caches=caches, start=torch.tensor(10))
    torch.testing.assert_close(torch.cat([a, b, c], dim=1), full, rtol=1e-5, atol=1e-5)


def test_tensor_start_without_caches_is_refused():
    model = build_model(CFG, seed=0)
    with pytest.raises(ValueError, match="caches"):
        model(_tokens(1, 3, 0), start=torch.tensor(0))


def test_greedy_decode_equals_recomputing_the_whole_sequence():
    model = build_model(CFG, seed=8).eval()
    prompt = _tokens(3, 7, seed=9)
    got = greedy_decode(model, prompt, 12)
    assert got.shape == (3, 12)
    assert torch.equal(got, reference_greedy(model, prompt, 12))


def test_compiled_decode_gives_the_plain_tokens_with_one_graph_for_all_steps(one_thread):
    """The benchmark's compiled step: same greedy tokens as eager, and compiled exactly twice
    (the prefill and the decode step) however many tokens follow. A position that reached the
    graph as a Python int would recompile at every step (or go dynamic), which CUDA graphs
    cannot capture once."""
    from torch._dynamo.utils import counters

    model = build_model(CFG, seed=10).eval()
    prompt = _tokens(2, 5, seed=11)
    eager = greedy_decode(model, prompt, 9)
    torch._dynamo.reset()
    counters.clear()
    compiled = greedy_decode(model, prompt, 9, step=compile_decode_step())
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def reference_sample(model, prompt: list[int], n: int, temperature: float, top_k: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(sample_token(logits[0, -1], temperature, top_k, gen))
    return seq[len(prompt):]


@torch.no_grad()
def test_generate_samples_what_the_uncached_model_would():
    model = build_model(CFG, seed=12).eval()
    prompt = [5, 17, 3, 40]
    greedy = reference_greedy(model, torch.tensor([prompt]), 10)[0].tolist()
    assert generate(model, prompt, 10, temperature=0.0) == greedy
    sampled = reference_sample(model, prompt, 10, 0.9, 20, 3)
    assert generate(model, prompt, 10, temperature=0.9, top_k=20, seed=3) == sampled
    # Clamped to the model's context; an EOS ends it early.
    assert len(generate(model, prompt, 100, temperature=0.0)) == CFG.max_seq_len - len(prompt)
    first = generate(model, prompt, 1, temperature=0.0)[0]
    assert generate(model, prompt, 10, temperature=0.0, eos_id=first) == []


# --------------------------------------------------------------------------- with a tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from raylm.tokenizer import train_tokenizer

    texts = ["The quick brown fox jumps over the lazy dog.\n", "Ray schedules tasks across a cluster.\n"] * 50
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 300)


def _padded_model(tok, favour):
    """A model whose vocabulary is the tokenizer's rounded up to 64s (model.vocab_size=0), with
    the logits of the ids `favour` selects (a boolean mask over the model's ids) raised by 100."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=32, ffn_multiple_of=16).with_vocab(tok.vocab_size)
    model = build_model(cfg, seed=0).eval()
    bonus = 100.0 * favour(torch.arange(cfg.vocab_size)).float()
    plain = model.logits
    model.logits = lambda h: plain(h) + bonus  # every decoding path reads the head through this
    return model


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ids_past_the_tokenizer_are_never_sampled(tok, temperature):
    """The padding rows of a vocabulary rounded up to 64s have no text: `raylm generate`, the
    end-of-pretrain samples, chat replies and eval generation tasks sample below the
    tokenizer's size, even where those rows hold the largest logits."""
    from raylm.eval.loglik import complete_until
    from raylm.generate import chat_reply, complete

    model = _padded_model(tok, lambda ids: ids >= tok.vocab_size)
    assert model.cfg.vocab_size > tok.vocab_size
    text = complete(model, tok, ["The "], 6, temperature, 0)[0]  # decoding a padding id raised IndexError
    assert text.startswith("The ")
    chat_reply(model, tok, [{"role": "user", "content": "hi"}], 6, temperature)
    complete_until(model, tok, [tok.eos_id], ["\n\n"], 6, temperature)
    ids = generate(model, tok.encode("The "), 6, temperature, 0, seed=1, vocab_size=tok.vocab_size)
    assert len(ids) == 6 and max(ids) < tok.vocab_size


def test_chat_reply_ends_at_eos_as_at_the_end_of_turn(tok, monkeypatch):
    """A model that ends the document (EOS) ends its reply: what it samples after EOS is
    another document, which serving and the exports' generation settings never show."""
    import raylm.generate as G
    from raylm.tokenizer import END

    model = _padded_model(tok, lambda ids: ids < 0)  # no bonus
    word = tok.encode("fox")
    for stop in (tok.eos_id, tok.special_ids[END]):
        picks = iter(word + [stop] + tok.encode(" Unrelated next document"))
        monkeypatch.setattr(G, "sample_token", lambda *a, **k: next(picks))
        assert G.chat_reply(model, tok, [{"role": "user", "content": "hi"}], 12) == "fox"


def test_in_training_generation_never_picks_ids_past_the_tokenizer(tok, tmp_path):
    """In-training eval's greedy generation, early in training, picked a padding id with the
    largest logit, and decoding it failed the run."""
    import json

    from raylm.config import load_config
    from raylm.eval.in_training import TrainingEval

    model = _padded_model(tok, lambda ids: ids >= tok.vocab_size)
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"context": "The ", "answer": "fox"}) + "\n")
    cfg = load_config(overrides=["eval.every=1", f"eval.gen_tasks=[{gen}]", "eval.max_new_tokens=4",
                                 "model.max_seq_len=32", "data.seq_len=32"])
    row = TrainingEval(cfg, tok)(model, step=1)
    assert row["eval_gen_exact_match"] == 0.0
