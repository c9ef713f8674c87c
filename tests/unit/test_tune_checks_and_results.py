"""`raylm tune`: its checks before a search starts, --resume of a search that stopped before
Tune did, and the ranked results and best.yaml (built from stand-in Tune results: no cluster)."""

from __future__ import annotations

import csv
import json
import math

import pandas as pd
import pytest
import yaml

from raylm import tune
from raylm.config import Config, ConfigError, TuneConfig, load_config, to_dict, tune_config


def _no_ray(monkeypatch):
    monkeypatch.setattr(tune, "init_ray_for", lambda *_, **__: pytest.fail("the search reached Ray"))
    monkeypatch.setattr(tune, "prepare_search", lambda *_, **__: pytest.fail("the search reached data preparation"))


# --------------------------------------------------------------------------- checks before anything runs


def test_asha_default_first_rung_fits_a_run_shorter_than_eval_every():
    """train.max_steps=50 with train.eval_every's default (100): ASHA's grace period was 100 >
    max_t=50, and Tune's ASHAScheduler raised a bare AssertionError, after the data had been
    prepared and search.json written. The run evaluates at its last step: the first rung is there."""
    from ray.tune.schedulers import ASHAScheduler

    base = load_config(overrides=["train.max_steps=50"])
    sched = tune._scheduler(TuneConfig(scheduler="asha"), base)
    assert isinstance(sched, ASHAScheduler)
    assert [m for m, _ in sched._brackets[0]._rungs] == [50]


def test_asha_grace_period_past_max_steps_is_one_line_error_before_anything(tmp_path, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: loguniform(1e-4, 3e-3)\n")
    cfg = load_config(overrides=[f"storage={tmp_path / 'runs'}", "name=s", "train.max_steps=400"])
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError) as e:
        tune.tune(cfg, str(space), {"grace_period": 500})
    msg = str(e.value)
    assert "tune.grace_period=500" in msg and "train.max_steps=400" in msg and "\n" not in msg, msg
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("metric, mode, cfg_overrides, want", [
    ("eval_arc_acc", "min", ["eval.every=10", "eval.mc_tasks=[tasks/arc.jsonl]"], "max"),
    ("eval_gsm_exact_match", "min", ["eval.every=10", "eval.gen_tasks=[gsm.jsonl]"], "max"),
    ("val_loss", "max", [], "min"),
    ("val_ppl", "max", [], "min"),
])
def test_a_mode_against_the_metrics_direction_is_refused(metric, mode, cfg_overrides, want):
    """tune.metric=eval_arc_acc with tune.mode=min (the default before auto): ASHA stopped the
    most accurate trials and best.yaml was the least accurate one's config, without a word."""
    cfg = load_config(overrides=cfg_overrides)
    with pytest.raises(ConfigError) as e:
        tune.check_metric(TuneConfig(metric=metric, mode=mode), cfg)
    msg = str(e.value)
    assert f"tune.mode={mode!r}" in msg and metric in msg and f"tune.mode={want}" in msg, msg
    tune.check_metric(TuneConfig(metric=metric, mode=want), cfg)
    # tune.mode's default, auto, takes the metric's direction
    assert tune_config({"metric": metric}).mode == want
    tune.check_metric(tune_config({"metric": metric}), cfg)


def test_model_preset_cannot_be_searched():
    """A preset is a whole model shape, where a search compares settings of one model (it
    once trained the base model in every trial, while the table credited the preset): the
    fields themselves are searched instead."""
    base = to_dict(Config())
    for text in ("model.preset: choice(['tiny', 'gpt2-124m'])", "model: {preset: gpt2-124m}"):
        space = tune.parse_space(text + "\n", "space.yaml")[0]
        with pytest.raises(ConfigError, match=r"^space.yaml: model.preset cannot be searched"):
            tune.check_space(space, base, TuneConfig(), "space.yaml")


@pytest.mark.parametrize("value", ["choice([{[1]: 2}])", "randint(0, 1" + "0" * 400 + ")"])
def test_odd_literals_are_one_line_errors(value):
    with pytest.raises(ConfigError) as e:
        tune.parse_dimension("space.yaml", "train.warmup_steps", value)
    assert str(e.value).startswith("space.yaml: train.warmup_steps: ") and "\n" not in str(e.value)


# --------------------------------------------------------------------------- results


def result(trial: str, params: dict, steps: list[int], values: list[float], error=None):
    """A ray.tune.Result as a finished trial's: its last report (with its config) and the
    history of its reports."""
    from ray.tune import Result

    return Result(metrics={"trial_id": trial, "step": steps[-1] if steps else 0, "config": params},
                  checkpoint=None, error=error, path=f"/x/run_trial_{trial}",
                  metrics_dataframe=pd.DataFrame({"step": steps, "val_loss": values}) if steps else None)


def _report(tmp_path, grid, base_overrides=()):
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=s", "train.max_steps=8", "train.eval_every=2",
                                 *base_overrides])
    (tmp_path / "s").mkdir(exist_ok=True)
    state = {"base": to_dict(cfg)}
    summary = tune.report(grid, state, cfg, TuneConfig(), log=lambda *_: None)
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    return summary, rows


def test_a_trial_whose_last_metric_is_nan_is_not_ranked_best(tmp_path):
    """NaN points were dropped before ranking, so a trial that diverged after step 4 ranked on
    its step-4 loss, ahead of every trial that trained to the end, and best.yaml was its config."""
    grid = [result("a_00000", {"train.lr": 0.5}, [2, 4, 6, 8], [5.0, 3.0, math.nan, math.nan]),
            result("a_00001", {"train.lr": 0.003}, [2, 4, 6, 8], [5.0, 4.0, 3.6, 3.5])]
    rows = tune.trial_rows(grid, "val_loss", "min")
    assert [r["trial"] for r in rows] == ["a_00001", "a_00000"]
    assert math.isnan(rows[1]["last"]) and rows[1]["history"] == [(2, 5.0), (4, 3.0)]  # the plot's points
    summary, table = _report(tmp_path, grid)
    assert summary["best_trial"] == "a_00001"
    assert yaml.safe_load(open(summary["best_config"]))["train"]["lr"] == 0.003
    assert [(r["trial"], r["last_val_loss"]) for r in table] == [("a_00001", "3.5000"), ("a_00000", "nan")]


def test_only_nan_trials_give_no_best_config(tmp_path):
    grid = [result("a_00000", {"train.lr": 0.5}, [2, 4], [5.0, math.nan])]
    summary, _ = _report(tmp_path, grid)
    assert "best_config" not in summary and not (tmp_path / "s" / "best.yaml").exists()


def test_status_uses_each_trials_own_max_steps(tmp_path):
    """A space that searches train.max_steps: a trial that ran its own 4 steps finished; it was
    called "stopped" (4 < the base's 8), drawn dashed and listed among ASHA's stops."""
    grid = [result("a_00000", {"train.max_steps": 4}, [2, 4], [5.0, 4.0]),
            result("a_00001", {"train.max_steps": 8}, [2], [5.5])]
    summary, table = _report(tmp_path, grid)
    assert {r["trial"]: r["status"] for r in table} == {"a_00000": "finished", "a_00001": "stopped"}
    assert summary["stopped"] == ["a_00001"]


def test_results_csv_keeps_the_parameters_as_drawn(tmp_path):
    """results.csv held 4 significant digits of each parameter (0.001235 for 0.0012345678), so
    a trial other than the best could not be run again from it."""
    lr = 0.0012345678901
    summary, table = _report(tmp_path, [result("a_00000", {"train.lr": lr, "train.warmup_steps": 3},
                                                   [2, 8], [5.0, 4.0])])
    assert float(table[0]["train.lr"]) == lr and table[0]["train.warmup_steps"] == "3"
    assert json.loads(json.dumps(summary["best_params"]))["train.lr"] == lr
