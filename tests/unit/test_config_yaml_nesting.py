"""YAML nested deeper than Python's recursion limit allows (a few hundred `[`) is a one-line
error naming the file or key. PyYAML's composer recurses once per level, and its RecursionError
came out of `--config`, a dotted override, a search space or a recipe as a traceback reported
as a bug in raylm."""

from __future__ import annotations

import pytest
import yaml

from raylm.cli import main
from raylm.config import ConfigError, load_config, load_yaml

DEEP_LIST = "[" * 5000 + "]" * 5000
DEEP_MAP = "{a: " * 3000 + "1" + "}" * 3000


@pytest.mark.parametrize("value", [DEEP_LIST, DEEP_MAP], ids=["list", "map"])
def test_a_deeply_nested_config_file_names_the_file(tmp_path, value):
    path = tmp_path / "run.yaml"
    path.write_text(f"name: {value}\n")
    with pytest.raises(ConfigError, match=rf"^config file {path}: not valid YAML \(nested too deeply\)$"):
        load_config(str(path))


def test_a_deeply_nested_override_names_the_key(capsys):
    assert main(["pretrain", f"train.lr={DEEP_LIST}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: train.lr='[[[[") and err.endswith("expected float, got str"), err[-200:]


def test_load_yaml_raises_a_yaml_error(tmp_path):
    # What raylm.tune's search spaces and raylm.recipe's recipes read with, and name the file for.
    with pytest.raises(yaml.YAMLError, match="nested too deeply"):
        load_yaml(f"train.lr: {DEEP_LIST}\n")


def test_recipe_file_nested_too_deeply_names_it(tmp_path):
    from raylm.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(f"stages: {DEEP_MAP}\n")
    with pytest.raises(ConfigError, match=rf"^recipe {path}: not valid YAML \(nested too deeply\)$"):
        load_recipe(str(path))
