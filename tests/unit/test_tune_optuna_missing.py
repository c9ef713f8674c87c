"""tune.search=optuna without optuna installed is one line before any work (the check sat
after a raise, where nothing reached it)."""

import sys

import pytest

from raylm.config import TuneConfig
from raylm.errors import ConfigError
from raylm.tune import check_space, parse_space


def test_optuna_search_without_optuna_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError, as uninstalled
    space, _ = parse_space("train.lr: loguniform(1e-4, 1e-2)\n", "space.yaml")
    with pytest.raises(ConfigError, match=r"tune.search=optuna needs optuna: pip install"):
        check_space(space, {}, TuneConfig(search="optuna", num_samples=2), "space.yaml")
