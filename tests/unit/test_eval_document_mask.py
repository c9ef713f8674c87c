"""Log-likelihood and generation of a checkpoint trained with data.document_mask=true are
computed with that mask (`raylm eval`, the harness's runner and in-training eval alike), as its
training forward and bits per byte read it: every scored context starts with EOS, a document
separator, which such a model never attended across."""

import json

import pytest
import torch
import torch.nn.functional as F

from raylm.config import load_config
from raylm.eval.in_training import TrainingEval
from raylm.eval.loglik import encode_pair, fit_to_length
from raylm.eval.pool import make_runner
from raylm.eval.scorers import mc_metrics, score_gen, score_mc
from raylm.eval.tasks import GenItem, MCItem
from tests.unit.test_eval_fixes import greedy_by_hand

REQUESTS = [("The cat sat on the", c) for c in (" mat", " moon and the stars", " a")] + \
           [("reverse: abc", " cba"), ("", "Hello world"), ("Answer: ", "yes"), ("word " * 200, " end")]


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    """A tiny run trained with data.document_mask=true (tests/tiny_run.py's, one setting more)."""
    from tests import tiny_run

    settings = tiny_run.TINY
    tiny_run.TINY = [*settings, "data.document_mask=true"]
    try:
        return tiny_run.make_tiny_run(str(tmp_path_factory.mktemp("masked")), "masked")
    finally:
        tiny_run.TINY = settings


def masked_by_hand(model, ctx: list[int], cont: list[int], sep: int) -> float:
    """One masked training forward (raylm.model's doc_sep=) over context + continuation."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ctx + cont[:-1]]), doc_sep=sep)
    logp = F.log_softmax(logits[0].double(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def masked_greedy_by_hand(model, tok, ctx: list[int], steps: int) -> str:
    """Full masked forward passes, no cache: `steps` greedy tokens after `ctx`, up to EOS."""
    return greedy_by_hand(model, tok, ctx, steps, doc_sep=tok.eos_id)


def test_a_scored_context_holds_a_separator_that_the_mask_hides(tiny_run, one_thread):
    """Why the mask matters: every context starts with EOS, and under the mask the tokens after
    it do not see it (a document of their own, from position 0), so the scores differ."""
    runner = make_runner(tiny_run)  # trained without the mask: scored as before
    assert runner.doc_sep is None
    model, tok = runner.model, runner.tok
    ctx, cont = encode_pair(tok, "The cat sat on the", " mat")
    assert ctx[0] == tok.eos_id and tok.eos_id not in ctx[1:] + cont
    with torch.no_grad():
        plain, _ = model(torch.tensor([ctx + cont[:-1]]))
        masked, _ = model(torch.tensor([ctx + cont[:-1]]), doc_sep=tok.eos_id)
    assert not torch.allclose(plain[0, 1:], masked[0, 1:], atol=1e-3)
    assert torch.allclose(plain[0, 0], masked[0, 0], atol=1e-5)  # EOS itself sees nothing either way


def test_loglik_of_a_masked_checkpoint_is_its_masked_forward(masked_run, one_thread):
    runner = make_runner(masked_run)
    model, tok = runner.model, runner.tok
    assert runner.doc_sep == tok.eos_id
    pairs = [encode_pair(tok, c, x) for c, x in REQUESTS]
    got = runner.loglikelihood(pairs)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        ctx, cont = fit_to_length(ctx, cont, model.cfg.max_seq_len)  # the long context is cut from the left
        assert lp == pytest.approx(masked_by_hand(model, ctx, cont, tok.eos_id), abs=1e-4)
        with torch.no_grad():
            logits, _ = model(torch.tensor([ctx + cont[:-1]]), doc_sep=tok.eos_id)
        assert greedy == (logits[0, len(ctx) - 1:].argmax(-1).tolist() == cont)
    # Another unit size, the same numbers.
    runner.batch_tokens = 1
    for (a, _), (b, _) in zip(got, runner.loglikelihood(pairs)):
        assert a == pytest.approx(b, abs=1e-5)


def test_generation_of_a_masked_checkpoint_reads_as_its_masked_forward(masked_run, one_thread):
    runner = make_runner(masked_run)
    tok = runner.tok
    contexts = ["The cat sat on the", "", "Once upon a time"]
    _, outputs = score_gen(runner, [GenItem(c, ("x",)) for c in contexts], max_new_tokens=12)
    expected = [masked_greedy_by_hand(runner.model, tok, [tok.eos_id] + tok.encode(c), 12).split("\n\n")[0]
                for c in contexts]
    assert outputs == expected and all(len(tok.encode(o)) > 1 for o in outputs)  # the empty prompt too


def test_in_training_eval_of_a_masked_run_scores_as_raylm_eval(masked_run, tmp_path, one_thread):
    runner = make_runner(masked_run)
    model, tok = runner.model, runner.tok
    items = [MCItem("The cat sat on the", (" mat", " moon and the stars", " a"), 0),
             MCItem("It was a", (" good day", " dog", " the"), 1),
             MCItem("", ("Hello world", "The"), 1)]
    mc_path, gen_path = tmp_path / "masked_mc.jsonl", tmp_path / "masked_gen.jsonl"
    mc_path.write_text("".join(json.dumps({"context": it.context, "choices": list(it.choices), "gold": it.gold})
                               + "\n" for it in items))
    contexts = ["The cat sat on the", "Once upon a time"]
    _, outputs = score_gen(runner, [GenItem(c, ("x",)) for c in contexts], max_new_tokens=8)
    gen_path.write_text("".join(json.dumps({"context": c, "answer": o or "none"}) + "\n"
                                for c, o in zip(contexts, outputs)))
    cfg = load_config(overrides=["eval.every=1", f"eval.mc_tasks=[{mc_path}]", f"eval.gen_tasks=[{gen_path}]",
                                 "eval.max_new_tokens=8", f"model.max_seq_len={model.cfg.max_seq_len}",
                                 "data.document_mask=true"])
    evaluator = TrainingEval(cfg, tok)
    # The log-likelihoods themselves, not only the accuracies they lead to.
    pairs = [p for choices in evaluator.mc_pairs["masked_mc"] for p in choices]
    with torch.no_grad():
        lps = evaluator._logprobs(model, pairs, torch.device("cpu"))
    for (ctx, cont), lp in zip(pairs, lps):
        assert lp == pytest.approx(masked_by_hand(model, ctx, cont, tok.eos_id), abs=1e-4)
    row = evaluator(model, step=2)
    direct = score_mc(runner, items)
    lls = [[masked_by_hand(model, *encode_pair(tok, it.context, c), tok.eos_id) for c in it.choices] for it in items]
    assert direct["acc"] == mc_metrics(items, lls)["acc"] == row["eval_masked_mc_acc"]
    assert direct["acc_norm"] == row["eval_masked_mc_acc_norm"]
    assert row["eval_masked_gen_exact_match"] == (1.0 if all(outputs) else 0.5)
