"""The alias bomb of YAML merge keys: `<<: [*a, *a, ...]` nested a few levels multiplies the
entries PyYAML copies (repeats and all), so a 500-byte file held millions of them (8 levels:
31 s and 700 MB, 9: ten times that) before any key was checked. A mapping that its merges make
larger than `MAX_MERGED` entries is refused, naming the file and line; ordinary merges load."""

from __future__ import annotations

import pytest
import yaml

from raylm.config import ConfigError, load_config, load_yaml


def merge_bomb(levels: int) -> str:
    lines = ["a0: &a0 {x: 1}"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} {{<<: [{', '.join([f'*a{i - 1}'] * 9)}]}}")
    return "\n".join(lines) + "\n"


def test_a_merge_bomb_in_a_config_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(merge_bomb(7))
    with pytest.raises(ConfigError, match=rf"^config file {path}: not valid YAML \(line \d+: more than 10,000 keys "
                                          r"in one mapping once its merges \(<<\) are applied\)$"):
        load_config(str(path))


def test_a_merge_bomb_in_a_recipe_or_search_space_is_a_yaml_error():
    # raylm.recipe and raylm.tune read with load_yaml, and name their file for a yaml.YAMLError.
    with pytest.raises(yaml.YAMLError, match="once its merges"):
        load_yaml(merge_bomb(7))


def test_merges_still_load(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: &common {lr: 0.01, max_steps: 9}\n")
    assert load_config(str(path)).train.max_steps == 9
    text = "common: &common {lr: 0.01, max_steps: 9}\n"
    assert load_yaml(text + "train:\n  <<: *common\n  lr: 0.02\n")["train"] == {"lr": 0.02, "max_steps": 9}
    big = "\n".join(f"k{i}: {i}" for i in range(20_000))  # a large mapping without merges is not refused
    assert len(load_yaml(big)) == 20_000
