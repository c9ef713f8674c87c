"""A vocabulary too large for the tokenizer's sample: when the sample was cut at
tokenizer.sample_bytes, the corpus has more text than the trainer saw, so "more text" is the
wrong advice; a larger tokenizer.sample_bytes is the remedy."""

from __future__ import annotations

import pytest

from raylm.errors import ConfigError
from raylm.tokenizer import train_tokenizer

DOCS = ["the quick brown fox jumps over the lazy dog " * 20, "pack my box with five dozen jugs " * 20] * 20


def test_a_cut_sample_advises_a_larger_sample(tmp_path):
    with pytest.raises(ConfigError) as err:
        train_tokenizer(DOCS, str(tmp_path / "t"), 2000, source="c/", sample_bytes=3000)
    msg = str(err.value)
    assert "the 3000-byte tokenizer corpus (source: c/)" in msg and "\n" not in msg
    assert msg.endswith("or a larger tokenizer.sample_bytes (the sample stopped at 3000)")


def test_a_whole_corpus_advises_more_text(tmp_path):
    with pytest.raises(ConfigError) as err:
        train_tokenizer(DOCS, str(tmp_path / "t"), 2000, source="c/", sample_bytes=10**7)
    assert str(err.value).endswith(" or more text")
