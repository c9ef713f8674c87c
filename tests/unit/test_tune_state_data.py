"""A trial's config is the search space's keys, each with a value its distribution draws:
what `raylm tune --resume` checks in the saved state, and every trial as it starts (a config
drawn by a restored searcher, or read by Tune after raylm's check, goes through it there)."""

from __future__ import annotations

import pytest

from raylm.config import ConfigError
from raylm.tune import check_trial_params, parse_space

SPACE_TEXT = """\
train.lr: loguniform(1.0e-4, 3.0e-3)
train.weight_decay: uniform(0.0, 0.2)
train.micro_batch_size: randint(2, 9)
train.warmup_steps: choice([50, 100])
model.n_layers: grid_search([2, 4])
train.betas: [0.9, 0.95]
"""
GOOD = {"train.lr": 1e-3, "train.weight_decay": 0.2, "train.micro_batch_size": 8, "train.warmup_steps": 100,
        "model.n_layers": 2, "train.betas": [0.9, 0.95]}


def _space():
    return parse_space(SPACE_TEXT, "space.yaml")[0]


def test_configs_the_space_draws_pass():
    import numpy as np

    space = _space()
    check_trial_params(space, GOOD, "t")
    # Tune's draws: numpy scalars, a loguniform end a rounding away, a constant list as a tuple
    check_trial_params(space, {**GOOD, "train.micro_batch_size": np.int64(2), "train.lr": 3.0e-3 * (1 + 1e-12),
                               "train.betas": (0.9, 0.95)}, "t")


@pytest.mark.parametrize("change, match", [
    ({"data.path": "/x"}, "t: data.path is not a key of the search space"),
    ({"s3.endpoint_url": "http://evil"}, "t: s3.endpoint_url is not a key"),
    ({"train.lr": 1e-2}, "t: train.lr=0.01 is not a value of loguniform(0.0001, 0.003)"),
    ({"train.lr": float("nan")}, "train.lr=nan is not a value"),
    ({"train.lr": True}, "train.lr=True is not a value"),
    ({"train.micro_batch_size": 9}, "train.micro_batch_size=9 is not a value of randint(2, 9)"),
    ({"train.micro_batch_size": 2.5}, "train.micro_batch_size=2.5 is not a value"),
    ({"train.warmup_steps": 10_000}, "train.warmup_steps=10000 is not a value of choice("),
    ({"model.n_layers": 10 ** 6}, "model.n_layers=1000000 is not a value of grid_search("),
    ({"train.warmup_steps": "100"}, "train.warmup_steps='100' is not a value"),
    ({"train.betas": [0.5, 0.5]}, "train.betas=[0.5, 0.5] is not a value of [0.9, 0.95]"),
    ({"train.weight_decay": "x" * 10_000}, "train.weight_decay='xxxx"),
])
def test_a_config_the_space_does_not_draw_is_refused_in_one_line(change, match):
    with pytest.raises(ConfigError) as e:
        check_trial_params(_space(), {**GOOD, **change}, "t")
    msg = str(e.value)
    assert match in msg and "\n" not in msg and len(msg) < 600, msg


def test_a_missing_key_or_no_mapping_is_refused():
    space = _space()
    with pytest.raises(ConfigError, match="t: model.n_layers is missing; a key of the search space"):
        check_trial_params(space, {k: v for k, v in GOOD.items() if k != "model.n_layers"}, "t")
    with pytest.raises(ConfigError, match="t: list, not a trial's parameters"):
        check_trial_params(space, [], "t")
