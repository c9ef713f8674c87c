"""A space that samples nothing (`tune.search=grid`, or the default random search over grid keys
and constants only) runs each grid point once. Tune runs the whole grid num_samples times, and
with nothing sampled and every trial at the base config's seed, each repeat was the same run
again: a 2-point grid with the default num_samples (8) ran 16 trials. Checked on Tune's own
variant generator, without Ray."""

from __future__ import annotations

import pytest

from raylm import tune
from raylm.config import ConfigError, load_config

GRID = "tune: {search: grid%s}\nmodel.n_layers: grid_search([1, 2])\n"


def _searched(tmp_path, monkeypatch, text: str, overrides: dict | None = None):
    """The TuneConfig `tune.tune` would start the search with (Ray and data preparation
    never reached), and the trials' parameters Tune's generator makes from it."""
    from ray.tune.experiment import Experiment

    path = tmp_path / "space.yaml"
    path.write_text(text)
    cfg = load_config(overrides=[f"storage={tmp_path / 'runs'}", "name=s"])
    monkeypatch.setattr(tune, "init_ray_for", lambda *_, **__: pytest.fail("the search reached Ray"))
    started = {}
    monkeypatch.setattr(tune, "_new_search", lambda cfg, space, tc, *_: started.update(space=space, tc=tc))
    tune.tune(cfg, str(path), overrides)
    space, tc = started["space"], started["tc"]
    experiment = Experiment("s", lambda config: None, config={k: d.domain() for k, d in space.items()},
                            num_samples=tc.num_samples, storage_path=str(tmp_path / "tune"))
    searcher = tune._searcher(tc)
    searcher.add_configurations([experiment])
    trials = []
    while (trial := searcher.next_trial()) is not None:
        trials.append(trial.config)
        searcher.on_trial_complete(trial.trial_id)
    return tc, trials


def test_grid_search_runs_each_point_once(tmp_path, monkeypatch):
    tc, trials = _searched(tmp_path, monkeypatch, GRID % "")
    assert tc.num_samples == 1  # saved in search.json as such, so --resume runs the same trials
    assert trials == [{"model.n_layers": 1}, {"model.n_layers": 2}]


def test_grid_search_repeats_through_the_seed(tmp_path, monkeypatch):
    _, trials = _searched(tmp_path, monkeypatch, GRID % "" + "seed: grid_search([0, 1])\n")
    assert sorted((t["model.n_layers"], t["seed"]) for t in trials) == [(1, 0), (1, 1), (2, 0), (2, 1)]


@pytest.mark.parametrize("in_file, overrides", [(", num_samples: 8", None), ("", {"num_samples": 8})])
def test_grid_search_refuses_repeats_in_one_line(tmp_path, monkeypatch, in_file, overrides):
    with pytest.raises(ConfigError) as e:
        _searched(tmp_path, monkeypatch, GRID % in_file, overrides)
    msg = str(e.value)
    assert "\n" not in msg and "tune.num_samples=8" in msg and "seed: grid_search" in msg, msg
    assert not (tmp_path / "runs").exists()


def test_random_search_keeps_tunes_repeats_of_its_grid(tmp_path, monkeypatch):
    """With a sampled key each repeat differs, as Tune's num_samples means it to."""
    _, trials = _searched(tmp_path, monkeypatch, "tune: {num_samples: 2}\nmodel.n_layers: grid_search([1, 2])\n"
                                                 "train.lr: loguniform(1.0e-4, 1.0e-2)\n")
    assert sorted(t["model.n_layers"] for t in trials) == [1, 1, 2, 2]
    assert len({t["train.lr"] for t in trials}) == 4


def test_a_random_search_that_samples_nothing_runs_each_point_once(tmp_path, monkeypatch):
    """The default search (random) over grid keys and constants only: each repeat would be the
    same run again, as for search=grid."""
    tc, trials = _searched(tmp_path, monkeypatch, "model.n_layers: grid_search([1, 2])\ntrain.lr: 1.0e-3\n")
    assert tc.search == "random" and tc.num_samples == 1
    assert sorted(t["model.n_layers"] for t in trials) == [1, 2]
    with pytest.raises(ConfigError, match="tune.num_samples=3: nothing in the space is sampled"):
        _searched(tmp_path, monkeypatch, "tune: {num_samples: 3}\nmodel.n_layers: grid_search([1, 2])\n")


def test_an_optuna_search_that_samples_nothing_is_told_what_optuna_takes(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"seed: choice\(\[0, 1, \.\.\.\]\) for repeats"):
        _searched(tmp_path, monkeypatch, "tune: {search: optuna, num_samples: 3}\ntrain.lr: 1.0e-3\n")
