"""raylm.mup_sweep.best_log2_lr on a grid given out of order or with a rate twice
(benchmarks/mup_transfer.py --lrs takes any rates, in any order): the neighbours of the best
point are the next smaller and larger rates, not the next ones in the list."""

import pytest

from raylm.mup_sweep import best_log2_lr


def _losses(xs, vertex):
    return [(x - vertex) ** 2 + 1.0 for x in xs]


@pytest.mark.parametrize("xs", [
    [-8, -10, -9],  # the best point last in the list: it was taken for the grid's end
    [-9, -7, -10, -8],
    [-10, -9, -9, -8],  # -9 twice: a division by zero
])
def test_the_vertex_whatever_the_order_of_the_rates(xs):
    assert best_log2_lr([2.0 ** x for x in xs], _losses(xs, -9.3)) == pytest.approx(-9.3)


def test_a_rate_given_twice_keeps_its_best_loss():
    lrs = [2.0 ** -10, 2.0 ** -9, 2.0 ** -8, 2.0 ** -9]
    assert best_log2_lr(lrs, [2.0, float("inf"), 2.0, 1.0]) == pytest.approx(-9)


def test_rates_and_losses_of_different_lengths_are_refused():
    with pytest.raises(ValueError):
        best_log2_lr([2.0 ** -10, 2.0 ** -9], [1.0])
