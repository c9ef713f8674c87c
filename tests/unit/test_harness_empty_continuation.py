"""`--model raylm` and a loglikelihood request whose continuation is empty (no Ray: workers=0)."""

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from raylm.eval.harness import RayLM  # noqa: E402
from raylm.eval.loglik import encode_pair  # noqa: E402


def _reqs(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def test_an_empty_continuation_scores_zero_and_leaves_the_others_alone(tiny_run, one_thread):
    """An empty continuation raised "an empty continuation has no log-likelihood to score" from
    raylm's scoring, a bare traceback that ended the whole evaluation. The empty string has
    probability 1 after any context: log-likelihood 0, and greedy decoding gives it (is_greedy
    True), as lm-eval's onnx model answers; every other request keeps its score."""
    lm = RayLM.create_from_arg_string(f"path={tiny_run},workers=0", {"device": "cpu"})
    tok = lm.runner.tok
    others = [("The cat sat on the", " mat"), ("The cat sat on the", " moon"),
              ("The cat sat on the ", "")]  # its trailing space moves to the continuation: scored
    mixed = [others[0], ("The cat sat on the", ""), others[1], ("", ""), others[2]]
    got = lm.loglikelihood(_reqs(mixed))
    assert got[1] == (0.0, True) and got[3] == (0.0, True)
    alone = lm.loglikelihood(_reqs(others))
    assert [got[0], got[2], got[4]] == alone  # exactly, not approximately
    assert alone == lm.runner.loglikelihood([encode_pair(tok, *p) for p in others])
    assert alone[2][0] < 0  # " " is a token scored like any other

    class OnlyTokenizes:  # a runner that must not be asked to score: every continuation is empty
        def __init__(self, tok):
            self.tok = tok

        def loglikelihood(self, pairs):
            raise AssertionError(f"asked to score {pairs}")

    assert RayLM(runner=OnlyTokenizes(tok)).loglikelihood(_reqs([("x", ""), ("", "")])) == [(0.0, True), (0.0, True)]
