"""What `--config` may name besides a plain file. A pipe is read (`--config <(...)`, `cat run.yaml |
raylm pretrain --config /dev/stdin`), where it was "not found"; a directory is named as one, where
it was "not found" too."""

from __future__ import annotations

import os

import pytest

from raylm.cli import main
from raylm.config import ConfigError, load_config


def test_a_pipe_is_read(tmp_path):
    r, w = os.pipe()
    os.write(w, b"name: piped\ntrain:\n  lr: 0.01\n")
    os.close(w)
    try:
        cfg = load_config(f"/dev/fd/{r}")
    finally:
        os.close(r)
    assert (cfg.name, cfg.train.lr) == ("piped", 0.01)


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(ConfigError, match=rf"^config file {tmp_path}: a directory; pass a YAML file$"):
        load_config(str(tmp_path))


def test_a_missing_file_is_not_found(tmp_path, capsys):
    assert main(["pretrain", "--config", str(tmp_path / "run.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"raylm: error: config file {tmp_path / 'run.yaml'}: not found"
