"""The Ray actor pool scores a checkpoint trained with data.document_mask=true with that mask,
exactly as one process does (raylm.eval.loglik's module docstring)."""

import pytest

from raylm.eval.loglik import encode_pair
from raylm.eval.pool import LocalRunner, PoolSpec, RayPoolRunner
from tests.unit.test_eval_document_mask import REQUESTS, masked_by_hand, masked_run  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration


def test_pool_scores_a_masked_checkpoint_as_one_process(ray_local, masked_run, one_thread):  # noqa: F811
    from raylm.generate import load_for_inference

    model, tok, _ = load_for_inference(masked_run)
    local = LocalRunner(model, tok, batch_tokens=64, doc_sep=tok.eos_id)
    pool = RayPoolRunner(masked_run, tok, model.cfg.max_seq_len, PoolSpec(workers=1, num_cpus=1), batch_tokens=64,
                         driver_scores=False)
    try:
        assert pool.doc_sep == tok.eos_id  # from the checkpoint's config
        pairs = [encode_pair(tok, c, x) for c, x in REQUESTS[:-1]]
        got = pool.loglikelihood(pairs)
        assert got == local.loglikelihood(pairs)  # floats compared exactly
        for (ctx, cont), (lp, _) in zip(pairs, got):
            assert lp == pytest.approx(masked_by_hand(model, ctx, cont, tok.eos_id), abs=1e-4)
        requests = [([tok.eos_id] + tok.encode(c), ["\n\n"], 8, 0.0, 0, 0) for c in ("The cat sat on the", "")]
        assert pool.complete(requests) == local.complete(requests)
        assert sum(a["units"] for a in pool.info()) == sum(t["units"] for t in pool.timings)  # the actor did them
    finally:
        pool.close()
