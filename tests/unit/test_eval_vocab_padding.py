"""A vocabulary padded past the tokenizer's (model.vocab_size=0 rounds it up to a multiple of 64)
is scored over the tokenizer's ids, as the HF export (which drops the padding rows), `raylm
generate` and serving read it: raylm's log-likelihoods and is_greedy equal transformers' on
the export, in every eval path (one process, a pool's units, document masking, in-training).
Bits per byte stays over the whole head: it is the training loss (raylm.eval.bpb says why).

The tests' tiny run has 384 ids, a multiple of 64, so it has no padding; here its model gets
64 padding rows. The first ones are twice the rows of the ids that the requests' greedy
continuations use, so wherever such an id leads, its padding twin leads more; the others are
zeros. A head read with its padding rows then picks padding ids and loses probability to them.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from raylm.config import load_config
from raylm.eval.bpb import bits_per_byte
from raylm.eval.in_training import TrainingEval
from raylm.eval.loglik import complete_until, encode_pair, fit_to_length
from raylm.eval.pool import LocalRunner, run_unit
from raylm.model import build_model

CONTEXTS = ["The cat sat on the", "Once upon a time", "reverse: abc", "Question: what is 2+2?"]
GREEDY = 4  # tokens of each context's greedy continuation
PAD = 64


@pytest.fixture(scope="module")
def model_tok(tiny_run):
    from raylm.generate import load_for_inference

    model, tok, _ = load_for_inference(tiny_run)
    assert model.cfg.vocab_size == tok.vocab_size  # not padded: the reference
    return model, tok


def greedy_ids(model, n: int, ctx: list[int], steps: int) -> list[int]:
    """Full forward passes, no cache: `steps` greedy ids after `ctx`, over the first n ids."""
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1, :n].argmax()))
    return ids[len(ctx):]


@pytest.fixture(scope="module")
def padded(model_tok):
    """(padded model, (context ids, continuation ids) pairs: each context's greedy continuation,
    which is_greedy must call greedy, and a fixed one)."""
    model, tok = model_tok
    n = tok.vocab_size
    ctxs = [[tok.eos_id] + tok.encode(c) for c in CONTEXTS]
    greedy = [greedy_ids(model, n, c, GREEDY) for c in ctxs]
    pairs = [(c, g) for c, g in zip(ctxs, greedy)] + [encode_pair(tok, c, " and the") for c in CONTEXTS]
    twins = sorted({t for g in greedy for t in g})
    assert len(twins) <= PAD
    state = model.state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):  # the tiny run ties them: the first only
        if name in state:
            w = state[name]
            rows = torch.zeros(PAD, w.shape[1], dtype=w.dtype)
            rows[:len(twins)] = 2 * w[twins]
            state[name] = torch.cat([w, rows])
    big = build_model(dataclasses.replace(model.cfg, vocab_size=n + PAD), seed=0)
    big.load_state_dict(state)
    return big.eval(), pairs


def by_hand(logits: torch.Tensor, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """(log-likelihood, is_greedy) from the logits (T, V) of one forward over ctx + cont[:-1]."""
    at = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
    logp = F.log_softmax(logits.double(), -1)[at]
    return float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()), logp.argmax(-1).tolist() == cont


def test_loglikelihood_equals_transformers_on_the_hf_export(model_tok, padded, tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    from raylm.export.hf import export_hf

    _, tok = model_tok
    big, pairs = padded
    out = export_hf(big, tok, {"step": 1}, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.vocab_size == tok.vocab_size  # the export drops the padding rows
    got = LocalRunner(big, tok).loglikelihood(pairs)
    whole_head = []
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0]
            whole_head.append(by_hand(big(torch.tensor([ctx + cont[:-1]]))[0][0], ctx, cont))
        want_lp, want_greedy = by_hand(theirs, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert greedy == want_greedy
    assert [g for _, g in got[:len(CONTEXTS)]] == [True] * len(CONTEXTS)  # each context's own greedy text
    # The test can fail: over the whole head, the padding rows take probability and the argmax.
    assert not any(g for _, g in whole_head[:len(CONTEXTS)])
    assert all(lp - full > 0.05 for (lp, _), (full, _) in zip(got, whole_head))


def test_every_eval_path_scores_a_padded_model_as_its_unpadded_one(model_tok, padded, tmp_path, one_thread):
    model, tok = model_tok
    big, pairs = padded
    for doc_sep in (None, tok.eos_id):  # the cached batches, and the masked forward
        want = LocalRunner(model, tok, doc_sep=doc_sep).loglikelihood(pairs)
        got = LocalRunner(big, tok, doc_sep=doc_sep).loglikelihood(pairs)
        assert [g for _, g in got] == [g for _, g in want]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
        # A pool's actor scores a unit without a tokenizer (UnitActor.tok): the unit says how many ids.
        actor = LocalRunner(big, tok, doc_sep=doc_sep)
        actor.run = lambda units, on_done=None: [run_unit(big, None, u) for u in units]
        assert actor.loglikelihood(pairs) == got

    task = tmp_path / "mc.jsonl"
    task.write_text(json.dumps({"context": CONTEXTS[0], "choices": [" mat", " moon"], "gold": 0}) + "\n")
    cfg = load_config(overrides=["eval.every=1", f"eval.mc_tasks=[{task}]",
                                 f"model.max_seq_len={model.cfg.max_seq_len}"])
    evaluator = TrainingEval(cfg, tok)
    fitted = [fit_to_length(c, x, model.cfg.max_seq_len) for c, x in pairs]
    with torch.no_grad():  # as the evaluator's __call__
        got, want = evaluator._logprobs(big, fitted, "cpu"), evaluator._logprobs(model, fitted, "cpu")
    assert got == pytest.approx(want, abs=1e-4)


def test_generation_in_eval_never_picks_a_padding_id(model_tok, padded, tmp_path, one_thread):
    """Already so before log-likelihoods were fixed; kept beside them: the twins lead every step."""
    model, tok = model_tok
    big, _ = padded
    want = []
    for context in CONTEXTS:
        ctx = [tok.eos_id] + tok.encode(context)
        want.append(complete_until(model, tok, ctx, [], GREEDY))
        assert want[-1].strip() and complete_until(big, tok, ctx, [], GREEDY) == want[-1]
    task = tmp_path / "gen.jsonl"
    task.write_text("".join(json.dumps({"context": c, "answer": w.strip()}) + "\n" for c, w in zip(CONTEXTS, want)))
    cfg = load_config(overrides=["eval.every=1", f"eval.gen_tasks=[{task}]", f"eval.max_new_tokens={GREEDY}",
                                 f"model.max_seq_len={model.cfg.max_seq_len}"])
    row = TrainingEval(cfg, tok)(big, step=1)
    assert row["eval_gen_exact_match"] == 1.0 and row["eval_gen_n"] == len(CONTEXTS)


def test_bits_per_byte_stays_the_training_loss_over_the_whole_head(model_tok, padded, one_thread):
    model, tok = model_tok
    big, _ = padded
    text = "The cat sat on the mat, and the dog sat on the rug."
    ids = torch.tensor([[tok.eos_id] + tok.encode_plain(text)])
    assert ids.shape[1] <= model.cfg.max_seq_len  # one window
    with torch.no_grad():
        _, training_loss = big(ids[:, :-1], targets=ids[:, 1:])  # the head's every row, as training
    got = bits_per_byte(big, tok, [text])
    assert got["loss"] == pytest.approx(float(training_loss), abs=1e-5)
    assert got["loss"] > bits_per_byte(model, tok, [text])["loss"] + 0.05  # the padding rows' share counts
