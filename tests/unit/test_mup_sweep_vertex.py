"""raylm.mup_sweep.best_log2_lr: the vertex of the parabola through the best grid point and
its neighbours, on an even grid (the test's and the benchmark's default) and an uneven one
(benchmarks/mup_transfer.py --lrs takes any rates)."""

from __future__ import annotations

import pytest

from raylm.mup_sweep import best_log2_lr


def _losses(xs, vertex):
    return [(x - vertex) ** 2 + 1.0 for x in xs]


@pytest.mark.parametrize("xs, vertex", [
    ([-10, -9, -8, -7, -6], -7.3),  # even: powers of 2
    ([-10, -9, -6], -8.0),  # uneven: the step to the right is 3 doublings, to the left 1
    ([-12, -10, -9.5, -6], -9.8),
    ([-10, -9, -6], -9.0),  # the vertex on the best point
])
def test_vertex_of_a_parabola_is_found_exactly(xs, vertex):
    """The right-hand step stood for both sides: on -10, -9, -6 with the optimum at -8 the
    answer was -9."""
    assert best_log2_lr([2.0 ** x for x in xs], _losses(xs, vertex)) == pytest.approx(vertex)


def test_ends_and_flat_points():
    xs = [-10, -9, -8]
    lrs = [2.0 ** x for x in xs]
    assert best_log2_lr(lrs, [1.0, 2.0, 3.0]) == -10  # not bracketed: that end
    assert best_log2_lr(lrs, [3.0, 2.0, 1.0]) == -8
    assert best_log2_lr(lrs, [1.0, 1.0, 1.0]) == -10  # flat: the first best point
    assert best_log2_lr(lrs, [float("inf"), 1.0, 2.0]) == -9  # a diverged neighbour: the point itself
