"""Evaluation's scoring rules checked against independent computations: lm-eval's truncation
rule, batching, rolling windows token by token, and what lm-eval's `hf` model on the HF
export scores differently (the context's leading EOS)."""

import random

import pytest
import torch
import torch.nn.functional as F

from raylm.eval.loglik import encode_pair, score_pairs


@pytest.fixture(scope="module")
def model_tok(tiny_run):
    from raylm.generate import load_for_inference

    model, tok, _ = load_for_inference(tiny_run)
    return model, tok


def lm_eval_rule(model, ctx, cont, vocab, doc_sep=None):
    """lm-eval's HFLM._loglikelihood_tokens: the last max_length + 1 tokens of context +
    continuation, the last one a target only; the continuation's tokens are the last len(cont)."""
    inp = (ctx + cont)[-(model.cfg.max_seq_len + 1):][:-1]
    with torch.no_grad():
        logits, _ = model(torch.tensor([inp])) if doc_sep is None else model(torch.tensor([inp]), doc_sep=doc_sep)
    logp = F.log_softmax(logits[0, :, :vocab].double(), -1)[len(inp) - len(cont):]
    return float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum()), logp.argmax(-1).tolist() == cont


@pytest.mark.parametrize("masked", [False, True])
def test_truncated_and_batched_scores_follow_lm_evals_rule(model_tok, one_thread, masked):
    model, tok = model_tok
    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran far away from home while dogs barked".split()
    reqs = [(" ".join(rng.choices(words, k=rng.randint(0, 120))), " " + " ".join(rng.choices(words, k=rng.randint(1, 8))))
            for _ in range(16)]
    reqs += [("The cat", " sat"), ("The cat", " sat on"), ("The cat ", "sat"), ("", "hello"), ("the dog", "s barked")]
    pairs = [encode_pair(tok, c, x) for c, x in reqs]
    assert max(len(c) + len(x) for c, x in pairs) > model.cfg.max_seq_len + 1  # some contexts are cut
    sep = tok.eos_id if masked else None
    batched = score_pairs(model, pairs, batch_tokens=300, doc_sep=sep, vocab_size=tok.vocab_size)
    for p, (lp, greedy) in zip(pairs, batched):
        (alone, alone_greedy), = score_pairs(model, [p], doc_sep=sep, vocab_size=tok.vocab_size)
        want, want_greedy = lm_eval_rule(model, *p, tok.vocab_size, sep)
        assert lp == pytest.approx(want, abs=1e-4) and alone == pytest.approx(want, abs=1e-4)
        assert greedy == alone_greedy == want_greedy


def test_rolling_scores_every_token_once_after_its_windows_context(model_tok, one_thread):
    """lm-eval's rolling windows, computed token by token without its window functions: token t
    (0-based, after the EOS prefix) in block k = t // L is predicted from the stream's inputs
    starting at k*L, or, in a last block that does not fill, from the last L inputs."""
    from lm_eval.api.instance import Instance

    from raylm.eval.harness import RayLM
    from raylm.eval.pool import LocalRunner

    model, tok = model_tok
    L = model.cfg.max_seq_len
    texts = ["The cat sat on the mat. " * 30, "Hello world.", "x"]
    lm = RayLM(runner=LocalRunner(model, tok))
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts])
    for text, total in zip(texts, got):
        ids = tok.encode(text)
        seq, n = [tok.eos_id] + ids, len(ids)
        full = n // L * L
        want = 0.0
        with torch.no_grad():
            for t in range(n):  # target seq[t + 1]
                start = t // L * L if t < full else max(0, n - L)
                logits, _ = model(torch.tensor([seq[start:t + 1]]))
                want += float(F.log_softmax(logits[0, -1, :tok.vocab_size].double(), -1)[seq[t + 1]])
        assert total == pytest.approx(want, abs=1e-3)
    assert len(tok.encode(texts[0])) > 2 * L  # several windows and a tail


def test_lm_evals_hf_model_on_the_export_reads_no_eos_before_the_context(model_tok, tmp_path, one_thread):
    """raylm scores a context after EOS; lm-eval's `hf` model on the HF export encodes the
    context with the export's tokenizer, which adds nothing (add_bos_token false), so its numbers
    differ from `raylm eval`'s; fed raylm's ids, the export gives raylm's numbers."""
    transformers = pytest.importorskip("transformers")
    from raylm.export.hf import export_hf

    model, tok = model_tok
    out = export_hf(model, tok, {"step": 1}, str(tmp_path / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    def score(ctx, cont):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0]
        logp = F.log_softmax(logits.double(), -1)[len(ctx) - 1:]
        return float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())

    context, continuation = "The cat", " sat"
    ctx, cont = encode_pair(tok, context, continuation)
    (ours, _), = score_pairs(model, [(ctx, cont)], vocab_size=tok.vocab_size)
    assert ours == pytest.approx(score(ctx, cont), abs=1e-4)
    whole, hf_ctx = hf_tok.encode(context + continuation), hf_tok.encode(context)  # lm-eval's _encode_pair
    assert hf_ctx == ctx[1:] and whole[len(hf_ctx):] == cont
    assert abs(score(hf_ctx, cont) - ours) > 1e-3


def test_a_contexts_trailing_space_moves_to_an_empty_continuation_as_lm_eval_moves_it(model_tok, one_thread):
    """lm-eval's _encode_pair moves the context's trailing whitespace to the continuation
    whatever the continuation: ("Answer: ", "") is scored as ("Answer:", " ")."""
    from lm_eval.api.instance import Instance

    from raylm.eval.harness import RayLM
    from raylm.eval.pool import LocalRunner

    model, tok = model_tok
    assert encode_pair(tok, "Answer: ", "") == encode_pair(tok, "Answer:", " ")
    lm = RayLM(runner=LocalRunner(model, tok))
    a, b = lm.loglikelihood([Instance("loglikelihood", {}, ("Answer: ", ""), 0),
                             Instance("loglikelihood", {}, ("Answer:", " "), 1)])
    assert a == b
