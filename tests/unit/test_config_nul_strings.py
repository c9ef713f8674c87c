"""A NUL character in a text setting (YAML writes one as "\\0") is refused when the config loads,
naming the key and the file. Every path and name reaches the OS, which raised ValueError
("embedded null byte") from inside the first stage to use it: a traceback reported as a bug."""

from __future__ import annotations

import json

import pytest

from raylm.cli import main
from raylm.config import ConfigError, load_config, load_serve_config


class Reached(BaseException):
    """Raised where the library would start work; main() lets it through (not an Exception)."""


@pytest.mark.parametrize("text, key", [
    ('name: "a\\0b"\n', "name"),
    ('storage: "runs\\0"\n', "storage"),
    ('data:\n  path: "corpus\\0.txt"\n', "data.path"),
    ('tokenizer:\n  path: "tok\\0"\n', "tokenizer.path"),
    ('eval:\n  mc_tasks: [ok.jsonl, "x\\0.jsonl"]\n', r"eval.mc_tasks\[1\]"),
])
def test_a_nul_in_a_config_file_names_the_key_and_file(tmp_path, text, key):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{key}=.*: contains a NUL character .*\(in config file {path}\)$"):
        load_config(str(path))


def test_pretrain_refuses_it_in_one_line(tmp_path, monkeypatch, capsys):
    def reached(*args, **kwargs):
        raise Reached()

    monkeypatch.setattr("raylm.pipeline.pretrain", reached)
    (tmp_path / "run.yaml").write_text('data:\n  path: "corpus\\0.txt"\n')
    assert main(["pretrain", "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: data.path='corpus\\x00.txt': contains a NUL character"), err


def test_a_recorded_or_serve_setting_with_a_nul_is_refused_too(tmp_path):
    with pytest.raises(ConfigError, match=r"^serve\.model_name="):
        load_serve_config([("model_name", "m\0")])
    with pytest.raises(ConfigError, match=r"^name="):
        load_config(base=json.loads('{"name": "a\\u0000b"}'))


def test_text_without_one_loads(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text('name: "a\\tb"\ndata:\n  path: "c 0.txt"\n')
    cfg = load_config(str(path))
    assert (cfg.name, cfg.data.path) == ("a\tb", "c 0.txt")
