"""Text holding a lone UTF-16 surrogate (a command-line argument in another encoding than UTF-8
reaches Python as "\\udce9"; JSON may escape one as "\\ud800") is a one-line DataError naming
the character, from every encoder, not SentencePiece's bare "Unable to cast Python instance"
RuntimeError (or a TypeError / UnicodeEncodeError), which the CLI prints as a bug's traceback."""

from __future__ import annotations

import pytest

from raylm.errors import DataError, UserError
from raylm.tokenizer import train_tokenizer

TEXT = "caf\udce9 au lait"  # "café" typed in Latin-1, decoded with surrogateescape (sys.argv)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["the quick brown fox jumps over the lazy dog " * 40, "pack my box with five dozen jugs " * 40]
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "t"), 300)


ENCODERS = {
    "encode": lambda tok, t: tok.encode(t),
    "encode_plain": lambda tok, t: tok.encode_plain(t),
    "encode_plain_with_marker": lambda tok, t: tok.encode_plain("<|end|> " + t),
    "encode_batch": lambda tok, t: tok.encode_batch(["fine", t]),
    "encode_flat": lambda tok, t: tok.encode_flat(["fine", t]),
    "encode_chat": lambda tok, t: tok.encode_chat([{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": t}]),
}


@pytest.mark.parametrize("name", ENCODERS)
def test_lone_surrogate_is_a_one_line_data_error(tok, name):
    with pytest.raises(DataError) as err:
        ENCODERS[name](tok, TEXT)
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert "U+DCE9" in msg and "surrogate" in msg
    if name in ("encode_batch", "encode_flat"):
        assert "text #1" in msg  # which text of the batch
    if name == "encode_chat":
        assert msg.startswith("chat message 1 content")
    if name == "encode_plain_with_marker":
        assert "character 11" in msg  # its place in the text given, not in a part of it


@pytest.mark.parametrize("name", ENCODERS)
def test_text_without_surrogates_still_encodes(tok, name):
    out = ENCODERS[name](tok, "café au lait 🎉 日本")
    assert out is not None
    assert tok.decode(tok.encode_plain("café au lait 🎉 日本")) == "café au lait 🎉 日本"
