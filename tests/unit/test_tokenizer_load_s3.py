"""`Tokenizer.load` reads an `s3://` tokenizer's two files straight from storage. Loading through
a temporary copy of the whole prefix (`raylm.generate.load_tokenizer`) named that deleted
temporary directory in its errors ("tokenizer file not found: /tmp/raylm-tok-x/tokenizer.model"
for a tokenizer whose upload was cut), and copied every object under a run directory named by
mistake (checkpoints included) before failing."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm import storage
from raylm.errors import ConfigError
from raylm.tokenizer import META_FILE, MODEL_FILE, Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["the quick brown fox jumps over the lazy dog " * 40, "pack my box with five dozen jugs " * 40]
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "t"), 300)


def test_load_from_s3_reads_its_two_files_and_names_the_uri(tok, s3_prefix):
    uri = storage.join(s3_prefix, "run", "tokenizer")
    storage.write_bytes(storage.join(uri, META_FILE), (Path(tok.path) / META_FILE).read_bytes())
    with pytest.raises(ConfigError) as err:  # the model's upload never happened
        Tokenizer.load(uri)
    assert str(err.value) == f"tokenizer file not found: {uri}/{MODEL_FILE}"

    storage.write_bytes(storage.join(uri, MODEL_FILE), tok.model_bytes)
    loaded = Tokenizer.load(uri)
    assert loaded.path == uri and loaded.sha256 == tok.sha256 == loaded.meta["sha256"]
    assert loaded.encode_plain("the lazy dog <|end|>") == tok.encode_plain("the lazy dog <|end|>")

    storage.write_bytes(storage.join(uri, MODEL_FILE), tok.model_bytes + b"x")  # tampered
    with pytest.raises(ConfigError, match=rf"tokenizer model {uri}/{MODEL_FILE} has sha256 .* but {uri}/{META_FILE}"):
        Tokenizer.load(uri)


def test_load_from_s3_reads_nothing_else_under_the_prefix(tok, monkeypatch):
    """A run directory named as the tokenizer: two HEADs, no listing, no copy of its checkpoints."""
    read: list[str] = []
    monkeypatch.setattr(storage, "exists", lambda uri, s3=None: read.append(uri) or False)
    monkeypatch.setattr(storage, "download_dir", lambda *a, **k: pytest.fail("copied the whole prefix"))
    with pytest.raises(ConfigError, match=r"tokenizer file not found: s3://bucket/run/tokenizer\.model\Z"):
        Tokenizer.load("s3://bucket/run")
    assert read == ["s3://bucket/run/tokenizer.model"]
