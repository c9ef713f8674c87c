"""A stage's `max_failures` takes what `--max-failures` takes: a count, or -1 for no limit.
Another negative number was accepted, and Ray Train reads any negative as no limit: a stage
whose workers kept dying restarted for ever."""

from __future__ import annotations

import pytest

from raylm.config import ConfigError
from raylm.recipe import load_recipe


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_a_negative_max_failures_other_than_minus_one_is_refused(tmp_path, stage):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path}\ndata: {{path: /c.txt}}\n"
                    "stages:\n  pretrain: {}\n  sft: {synthetic: word_after}\n  dpo: {synthetic: word_after}\n")
    with pytest.raises(ConfigError, match=rf"^recipe {path}: stages\.{stage}\.max_failures=-2: expected an integer "
                                          r">= 0 \(-1: no limit\)$"):
        load_recipe(str(path), [f"stages.{stage}.max_failures=-2"])
    recipe = load_recipe(str(path), [f"stages.{stage}.max_failures=-1"])
    assert recipe.sections[stage][1]["max_failures"] == -1
