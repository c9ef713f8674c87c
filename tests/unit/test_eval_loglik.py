"""Log-likelihood scoring against a direct computation, on the session's tiny trained run."""

import pytest
import torch
import torch.nn.functional as F

from raylm.eval.loglik import encode_pair, plan_units, score_pairs
from raylm.eval.pool import LocalRunner


@pytest.fixture(scope="module")
def model_tok(tiny_run):
    from raylm.generate import load_for_inference

    model, tok, _ = load_for_inference(tiny_run)
    return model, tok


def by_hand(model, ctx: list[int], cont: list[int]) -> float:
    """One full forward pass over context + continuation, no cache, no batching."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ctx + cont[:-1]]))  # the last token is a target only
    logp = F.log_softmax(logits[0].double(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def test_split_inside_a_token_scores_the_exact_text(model_tok, one_thread):
    model, tok = model_tok
    # A word the tokenizer keeps whole, cut in its middle: no token boundary at the split.
    word = next(p for p in (tok.id_to_piece(i) for i in range(tok.vocab_size))
                if p.isalpha() and p.isascii() and len(p) >= 4 and len(tok.encode(p)) == 1)
    context, continuation = word[:2], word[2:] + " of"
    ctx, cont = encode_pair(tok, context, continuation)
    whole = tok.encode(context + continuation)
    assert whole[0] != ctx[1] and len(whole[0:1]) == 1, "the split must fall inside a token for this test"
    assert ctx[0] == tok.eos_id and tok.decode(ctx[1:] + cont) == context + continuation
    (lp, _), = score_pairs(model, [(ctx, cont)])
    assert lp == pytest.approx(by_hand(model, ctx, cont), abs=1e-4)


def test_batched_cached_scores_equal_one_forward_each(model_tok, one_thread):
    model, tok = model_tok
    requests = [("The cat sat on the", c) for c in (" mat", " moon and the stars", " a")] + \
               [("reverse: abc", " cba"), ("reverse: abd", " dba"), ("reverse: abd", " abd x"),
                ("", "Hello world"), ("Answer: ", "yes")]
    pairs = [encode_pair(tok, c, x) for c, x in requests]
    assert pairs[-1][1] == encode_pair(tok, "Answer:", " yes")[1]  # trailing space moves to the continuation
    units = plan_units(pairs, model.cfg.max_seq_len, batch_tokens=4096)
    assert sum(len(g[1]) for u in units for g in u) == len(pairs)
    assert any(len(g[1]) == 3 for u in units for g in u)  # one item's choices share one context
    got = score_pairs(model, pairs)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        assert lp == pytest.approx(by_hand(model, ctx, cont), abs=1e-4)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ctx + cont[:-1]]))
        argmax = logits[0, len(ctx) - 1:].argmax(-1).tolist()
        assert greedy == (argmax == cont)
    # Small units (many batches) give the same numbers as one big one.
    small = LocalRunner(model, tok, batch_tokens=1).loglikelihood(pairs)
    for (a, _), (b, _) in zip(got, small):
        assert a == pytest.approx(b, abs=1e-5)


def test_long_context_is_cut_from_the_left(model_tok, one_thread):
    model, tok = model_tok
    ctx = [tok.eos_id] + tok.encode("word " * 200)
    cont = tok.encode(" end")
    (lp, _), = score_pairs(model, [(ctx, cont)])
    keep = model.cfg.max_seq_len + 1 - len(cont)
    assert len(ctx[-keep:]) + len(cont) - 1 == model.cfg.max_seq_len
    assert lp == pytest.approx(by_hand(model, ctx[-keep:], cont), abs=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        score_pairs(model, [(ctx, [5] * (model.cfg.max_seq_len + 1))])
