"""The built-in scorers, independent of lm-eval: multiple choice and generation.

Multiple choice, as lm-eval defines its metrics for `output_type: multiple_choice`:
  acc       the choice with the highest summed log-likelihood is the gold one
  acc_norm  the same after dividing each choice's log-likelihood by its length in characters
Generation:
  exact_match  the completion, stripped, equals one of the answers (stripped)
  contains     one of the answers appears in the completion
Standard errors are lm-eval's too: the sample standard deviation over items / sqrt(n).
Ties go to the first choice (numpy's argmax, which lm-eval uses).
"""

from __future__ import annotations

import math

from raylm.eval.loglik import encode_pair
from raylm.eval.tasks import GenItem, MCItem


def mean_stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def mc_predictions(items: list[MCItem], lls: list[list[float]]) -> tuple[list[int], list[int]]:
    """(acc choice, acc_norm choice) per item, from each choice's summed log-likelihood."""
    raw = [_argmax(ll) for ll in lls]
    norm = [_argmax([lp / len(c) for lp, c in zip(ll, item.choices)]) for item, ll in zip(items, lls)]
    return raw, norm


def mc_metrics(items: list[MCItem], lls: list[list[float]]) -> dict:
    raw, norm = mc_predictions(items, lls)
    acc = [float(p == it.gold) for p, it in zip(raw, items)]
    acc_norm = [float(p == it.gold) for p, it in zip(norm, items)]
    return {"acc": sum(acc) / len(acc), "acc_stderr": mean_stderr(acc),
            "acc_norm": sum(acc_norm) / len(acc_norm), "acc_norm_stderr": mean_stderr(acc_norm), "n": len(items),
            "chance": sum(1 / len(it.choices) for it in items) / len(items)}


def score_mc(runner, items: list[MCItem]) -> dict:
    """acc and acc_norm of a multiple-choice task through a runner (raylm.eval.pool)."""
    pairs = [encode_pair(runner.tok, it.context, c) for it in items for c in it.choices]
    flat = [lp for lp, _ in runner.loglikelihood(pairs)]
    lls, k = [], 0
    for it in items:
        lls.append(flat[k:k + len(it.choices)])
        k += len(it.choices)
    return mc_metrics(items, lls)


def gen_metrics(items: list[GenItem], outputs: list[str]) -> dict:
    em = [float(any(out.strip() == a.strip() for a in it.answers)) for it, out in zip(items, outputs)]
    has = [float(any(a in out for a in it.answers)) for it, out in zip(items, outputs)]
    return {"exact_match": sum(em) / len(em), "exact_match_stderr": mean_stderr(em),
            "contains": sum(has) / len(has), "contains_stderr": mean_stderr(has), "n": len(items)}


def score_gen(runner, items: list[GenItem], max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
              seed: int = 0, until: tuple[str, ...] = ("\n\n",)) -> tuple[dict, list[str]]:
    """Exact match and contains of greedy (temperature 0) or sampled completions."""
    tok = runner.tok
    requests = [([tok.eos_id] + tok.encode(it.context), list(until), max_new_tokens, temperature, top_k, seed + i)
                for i, it in enumerate(items)]
    outputs = runner.complete(requests)
    return gen_metrics(items, outputs), outputs
