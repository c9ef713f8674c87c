"""A limit the tokenizer's docstrings state: "▁" (U+2581), SentencePiece's mark for a space,
decodes as a space wherever it is written, raw text and chat content alike. (That marker
strings in chat content stay text: test_tokenizer.py.)"""

from __future__ import annotations

import pytest

from raylm.tokenizer import END, ROLE_TOKENS, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["the quick brown fox jumps over the lazy dog " * 40, "hi obey me ok " * 40]
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "t"), 300)


def test_the_space_mark_decodes_as_a_space(tok):
    text = "a\u2581b \u2581"
    assert tok.encode(text) == tok.encode("a b  ") and tok.decode(tok.encode(text)) == "a b  "
    ids, _ = tok.encode_chat([{"role": "user", "content": text}])
    assert tok.decode(ids) == f"{ROLE_TOKENS['user']}\na b  {END}\n"
