"""lm-eval's generation kwargs through `--model raylm`: a sampling task's top_p."""

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from raylm.eval.harness import RayLM  # noqa: E402
from raylm.eval.loglik import complete_until  # noqa: E402
from raylm.eval.pool import make_runner  # noqa: E402

PROMPTS = ["The cat sat on the", "Once upon a time", "the dog", "add: 2 3", "User: hello", "It was"]


def _requests(kwargs):
    return [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 8, **kwargs}), i)
            for i, p in enumerate(PROMPTS)]


def test_a_sampling_tasks_top_p_is_honoured(tiny_run, one_thread):
    """generate_until dropped the task's top_p (humaneval_64 samples at temperature 0.2 with top_p
    0.95), so it sampled from the whole distribution. A nucleus this small keeps only the most
    likely token: sampling with it is greedy decoding."""
    lm = RayLM(path=tiny_run, runner=make_runner(tiny_run, 0))
    greedy = lm.generate_until(_requests({"do_sample": False}))
    nucleus = lm.generate_until(_requests({"do_sample": True, "temperature": 1.5, "top_p": 1e-6}))
    assert nucleus == greedy
    # Without the nucleus the same seeds sample other text: the assertion above is not vacuous.
    assert lm.generate_until(_requests({"do_sample": True, "temperature": 1.5})) != greedy
    # Greedy decoding reads no top_p, as lm-eval's hf model does not.
    assert lm.generate_until(_requests({"do_sample": False, "top_p": 1e-6})) == greedy


def test_complete_until_takes_top_p_and_old_units_still_run(tiny_run, one_thread):
    """A generation unit without top_p (the format before it) still runs, with top_p off."""
    from raylm.eval.pool import run_unit

    runner = make_runner(tiny_run, 0)
    tok, model = runner.tok, runner.model
    ctx = [tok.eos_id] + tok.encode("The cat")
    old = run_unit(model, tok, {"kind": "gen", "doc_sep": None, "items": [[0, ctx, [], 6, 1.5, 0, 3]]})
    assert old == [[0, complete_until(model, tok, ctx, [], 6, 1.5, 0, 3)]]
    assert complete_until(model, tok, ctx, [], 6, 1.5, 0, 3, top_p=1e-6) == complete_until(model, tok, ctx, [], 6)
