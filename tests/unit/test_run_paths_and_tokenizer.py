"""raylm.pipeline.absolute_paths: the paths a run hands its Ray workers, read as the storage
layer reads local paths (raylm.storage._local: `~` expanded, `file://` dropped)."""

from __future__ import annotations

import os

from raylm.config import load_config
from raylm.pipeline import absolute_paths


def test_home_and_file_uris_are_the_places_storage_means(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(overrides=[
        "storage=~/runs", "data.path=file:///data/corpus/*.jsonl", "data.val_path=~/val.jsonl",
        "tokenizer.path=file://tok", "init_from=~/runs/base"]))
    home = str(tmp_path / "home")
    assert cfg.storage == f"{home}/runs" and cfg.run_dir == f"{home}/runs/{cfg.name}"
    assert cfg.data.path == "/data/corpus/*.jsonl"
    assert cfg.data.val_path == f"{home}/val.jsonl"
    assert cfg.tokenizer.path == os.path.join(str(tmp_path), "tok")
    assert cfg.init_from == f"{home}/runs/base"


def test_s3_relative_and_empty_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(overrides=["storage=s3://bucket/runs", "data.path=corpus/a.jsonl"]))
    assert cfg.storage == "s3://bucket/runs"
    assert cfg.data.path == os.path.join(str(tmp_path), "corpus/a.jsonl")
    assert cfg.data.val_path == "" and cfg.tokenizer.path == "" and cfg.init_from == ""


# --------------------------------------------------------------------------- keep_in_run


import itertools  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

from raylm import checkpoint  # noqa: E402
from raylm.errors import ConfigError  # noqa: E402
from raylm.generate import load_tokenizer  # noqa: E402
from raylm.pipeline import ensure_tokenizer, keep_in_run  # noqa: E402


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    from raylm.corpus import iter_builtin_documents
    from raylm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("toks")
    texts = list(itertools.islice(iter_builtin_documents(), 150))
    return (train_tokenizer(texts, str(root / "a"), 420), train_tokenizer(texts[::-1][:120], str(root / "b"), 400))


def _committed(run_dir, step: int = 4) -> None:
    ck = os.path.join(run_dir, checkpoint.checkpoint_name(step))
    os.makedirs(ck)
    with open(os.path.join(ck, checkpoint.COMMIT_MARKER), "w") as f:
        json.dump({"step": step}, f)


def test_a_runs_tokenizer_is_never_replaced_under_its_checkpoints(tmp_path, two_tokenizers):
    """tokenizer.path changed on a run that has checkpoints: refused in one line, and the run's
    own tokenizer (which its checkpoints name, and which may have no other copy) stays."""
    a, b = two_tokenizers
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=r", f"tokenizer.path={a.path}"])
    ensure_tokenizer(cfg)
    _committed(cfg.run_dir)
    other = load_config(overrides=[f"storage={tmp_path}", "name=r", f"tokenizer.path={b.path}"])
    with pytest.raises(ConfigError, match=f"{cfg.run_dir}/tokenizer: holds the tokenizer .*{b.path}"):
        ensure_tokenizer(other)
    assert load_tokenizer(os.path.join(cfg.run_dir, "tokenizer")).sha256 == a.sha256
    ensure_tokenizer(cfg)  # the same one again: fine


def test_a_run_without_checkpoints_takes_the_new_tokenizer(tmp_path, two_tokenizers):
    a, b = two_tokenizers
    target = str(tmp_path / "r" / "tokenizer")
    keep_in_run(a, target, None)
    keep_in_run(b, target, None)
    assert load_tokenizer(target).sha256 == b.sha256
