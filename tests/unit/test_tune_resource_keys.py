"""A search space may not draw a trial's resources (train.num_workers, train.cpus_per_worker,
train.use_gpu): the local cluster is sized from the base config's, and a trial drawing
`train.num_workers: choice([8])` over a base of 1 waited for its workers for ever, Ray Train's
worker start timing out every 60 s with a traceback each time."""

from __future__ import annotations

import pytest

from raylm import tune
from raylm.config import ConfigError, load_config


@pytest.mark.parametrize("line", ["train.num_workers: choice([1, 8])", "train.cpus_per_worker: choice([1, 4])",
                                  "train.use_gpu: choice([True, False])"])
def test_a_space_drawing_a_trials_resources_is_one_line_before_anything(tmp_path, monkeypatch, line):
    monkeypatch.setattr(tune, "init_ray_for", lambda *_, **__: pytest.fail("the search reached Ray"))
    monkeypatch.setattr(tune, "prepare_search", lambda *_, **__: pytest.fail("the search reached data preparation"))
    space = tmp_path / "space.yaml"
    space.write_text(f"train.lr: loguniform(1e-4, 3e-3)\n{line}\n")
    cfg = load_config(overrides=[f"storage={tmp_path / 'runs'}", "name=s", "train.num_workers=1"])
    with pytest.raises(ConfigError) as e:
        tune.tune(cfg, str(space))
    key = line.split(":")[0]
    msg = str(e.value)
    assert f"{key} cannot be searched" in msg and "base config" in msg and "\n" not in msg, msg
    assert not (tmp_path / "runs").exists()
