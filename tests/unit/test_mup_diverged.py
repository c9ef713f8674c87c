"""raylm.mup_sweep with diverged runs: a row where every rate diverged has no best rate (NaN),
so two such rows are no shift of 0 (which reads as perfect transfer), and a NaN loss counts as
diverged, as inf does, rather than winning the comparison."""

import math

from raylm.mup_sweep import SweepConfig, best_log2_lr, bracketed, shift_log2

INF, NAN = float("inf"), float("nan")
LRS = tuple(2.0 ** x for x in (-10, -9, -8))


def test_every_rate_diverged_has_no_best_rate_and_no_shift():
    assert math.isnan(best_log2_lr(LRS, [INF, INF, INF]))
    assert not bracketed([INF, INF, INF])
    cfg = SweepConfig(widths=(32, 128), lrs=LRS)
    result = {("mup", 32): [INF] * 3, ("mup", 128): [INF] * 3,
              ("none", 32): [2.0, 1.0, 2.0], ("none", 128): [NAN] * 3}
    assert math.isnan(shift_log2(cfg, result, "mup"))
    assert math.isnan(shift_log2(cfg, result, "none"))


def test_a_nan_loss_is_diverged_not_the_best():
    assert best_log2_lr(LRS, [NAN, 1.0, 2.0]) == -9
    assert bracketed([NAN, 1.0, 2.0])  # the diverged rate is the worse side
    assert bracketed([2.0, 1.0, NAN])  # a diverged rate is worse
    assert best_log2_lr(LRS, [2.0, 1.0, NAN]) == -9  # a diverged neighbour: the point itself
