"""Scoring requests (lm-eval's and the built-in tasks') reports how many are done, on stderr."""

import pytest

from raylm.eval.loglik import encode_pair
from raylm.eval.pool import LocalRunner


@pytest.fixture(scope="module")
def model_tok(tiny_run):
    from raylm.generate import load_for_inference

    model, tok, _ = load_for_inference(tiny_run)
    return model, tok


def test_loglikelihood_and_generation_report_requests_done(model_tok, one_thread, capsys):
    model, tok = model_tok
    runner = LocalRunner(model, tok, batch_tokens=1)  # a unit per request: one line each
    runner.progress_every_s = 0
    pairs = [encode_pair(tok, "The cat sat on the", c) for c in (" mat", " moon", " a", " rug", " sofa")]
    scores = runner.loglikelihood(pairs)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines and all(line.startswith("eval: loglikelihood ") for line in lines), err
    assert "100% 5.0/5.0 requests" in lines[-1], lines[-1]
    assert scores == LocalRunner(model, tok, batch_tokens=1).loglikelihood(pairs)  # progress changes nothing
    capsys.readouterr()

    requests = [(tok.encode(f"{i} + {i} ="), ["\n"], 2, 0.0, 0, 0) for i in range(10)]
    runner.complete(requests)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines and all(line.startswith("eval: generate ") for line in lines), err
    assert "100% 10.0/10.0 requests" in lines[-1], lines[-1]


def test_no_log_no_progress(model_tok, one_thread, capsys):
    model, tok = model_tok
    runner = LocalRunner(model, tok)
    runner.progress_log, runner.progress_every_s = None, 0
    runner.loglikelihood([encode_pair(tok, "a", " b")])
    assert capsys.readouterr() == ("", "")
