"""raylm tune without Ray: the results table's ranks, a space key given twice, a search.json
that raylm did not write."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from raylm import tune
from raylm.config import ConfigError, load_config, to_dict, tune_config


def _result(trial: str, params: dict, steps: list[int], values: list[float], error=None):
    from ray.tune import Result

    return Result(metrics={"trial_id": trial, "step": steps[-1], "config": params}, checkpoint=None, error=error,
                  path=f"/x/run_trial_{trial}", metrics_dataframe=pd.DataFrame({"step": steps, "val_loss": values}))


def test_a_failed_trial_is_not_ranked_first(tmp_path):
    """A trial that failed after reporting a low loss was rank 1 in results.csv and the printed
    table, while best.yaml (rightly) held another trial's config: the table's winner was a run
    that never finished."""
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=s", "train.max_steps=8", "train.eval_every=2"])
    (tmp_path / "s").mkdir()
    grid = [_result("a_00000", {"train.lr": 0.5}, [2, 4], [3.0, 2.0], error=RuntimeError("worker died")),
            _result("a_00001", {"train.lr": 0.003}, [2, 4, 6, 8], [5.0, 4.0, 3.6, 3.5])]
    summary = tune.report(grid, {"base": to_dict(cfg)}, cfg, tune_config({}), log=lambda *_: None)
    rows = list(csv.DictReader(open(tmp_path / "s" / "results.csv")))
    assert [(r["rank"], r["trial"], r["status"]) for r in rows] == [("1", "a_00001", "finished"),
                                                                    ("2", "a_00000", "error")]
    assert summary["best_trial"] == rows[0]["trial"]


def test_a_key_given_nested_and_dotted_is_one_line_error():
    """`train: {lr: ...}` and `train.lr: ...` in one space: the dotted one replaced the nested
    one without a word, so the search ran a space other than the one the reader saw."""
    text = "train:\n  lr: choice([1.0e-3])\n  warmup_steps: 5\ntrain.lr: loguniform(1.0e-4, 1.0e-2)\n"
    with pytest.raises(ConfigError) as e:
        tune.parse_space(text, "space.yaml")
    assert str(e.value) == "space.yaml: train.lr is given twice (nested and dotted); keep one"


@pytest.mark.parametrize("content", ["{\"tune\": {", "[]", "{\"tune\": {}}", "{\"tune\": {}, \"base\": {}}",
                                     b"\xff\xfe"])
def test_resume_of_a_search_json_raylm_did_not_write_is_one_line(tmp_path, monkeypatch, capsys, content):
    """A search.json that is not JSON, not an object, or lacks the saved space (damaged, or
    another tool's file of that name): `raylm tune --resume` printed a traceback and called
    it a bug in raylm, while a new search of that name is refused (a search is already there)."""
    from raylm.cli import main

    (tmp_path / "s").mkdir()
    path = tmp_path / "s" / tune.SEARCH_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.setattr(tune, "init_ray_for", lambda *_, **__: pytest.fail("the search reached Ray"))
    assert main(["tune", "--resume", "name=s", f"storage={tmp_path}"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: --resume: ") and "search.json" in err and "\n" not in err, err


def test_a_saved_tune_section_without_newer_keys_still_runs(tmp_path, monkeypatch):
    """The trainable read state["tune"]["driver_cpus"] raw: a saved tune section without the
    key (a default left out) was a KeyError as the search started; it gets the default now."""
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=s"])
    seen = {}

    def trainable(state, search_dir):
        seen.update(state["tune"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(tune, "_trainable", trainable)
    monkeypatch.setattr("raylm.storage.filesystem", lambda *_: (None, str(tmp_path)))
    state = {"base": to_dict(cfg), "tune": {"num_samples": 1}, "space_text": "train.lr: loguniform(1.0e-4, 1.0e-3)",
             "space_path": "space.yaml", "manifest": {}}
    with pytest.raises(RuntimeError, match="stop here"):
        tune._run(state, cfg, resume=False, log=lambda *_: None)
    assert seen["driver_cpus"] == tune_config({}).driver_cpus
