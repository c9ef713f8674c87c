"""clean_text's output is NFC, as documented, whatever control characters the input held:
a control character between a letter and its combining mark kept NFC from composing them,
and its removal afterwards left the pair decomposed (not NFC, and cleaned again it changed)."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

from raylm.config import load_config
from raylm.data import find_duplicates, list_corpus
from raylm.documents import clean_text


@pytest.mark.parametrize("raw, cleaned", [
    ("A\x00\u0308", "\u00c4"),  # NUL
    ("cafe\x7f\u0301 au lait", "caf\u00e9 au lait"),  # DEL
    ("e\u0081\u0301", "\u00e9"),  # a C1 control
    ("A\r\n\u0308", "A\n\u0308"),  # a line break is not removed: nothing to compose across it
])
def test_removing_a_control_character_leaves_nfc_text(raw, cleaned):
    assert clean_text(raw) == cleaned
    assert unicodedata.is_normalized("NFC", clean_text(raw))


def test_cleaning_is_nfc_and_idempotent_on_mixed_input():
    alphabet = ["a", "e", "A", " ", "\t", "\n", "\r", "\x00", "\x0c", "\x85", "\x7f", "\x9f", "\x1f",
                "\u00a0", "\u3000", "\u0301", "\u0308", "\u0323", "\u212b", "\u2028"]
    rng = random.Random(0)
    for _ in range(20000):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        once = clean_text(raw)
        assert unicodedata.is_normalized("NFC", once), ascii(raw)
        assert clean_text(once) == once, ascii(raw)


def test_copies_that_differ_by_a_control_character_are_exact_duplicates(tmp_path):
    text = "Die Bl\u00fcte des M\u00e4rchens war sch\u00f6n, und alle G\u00e4ste kamen."
    copy = text.replace("\u00e4", "a\x00\u0308")  # a NUL inside each decomposed a-umlaut
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": copy}) + "\n")
    cfg = load_config(overrides=[f"data.path={tmp_path}", "data.dedup=exact"]).data
    drop, bad = find_duplicates(list_corpus(cfg.path), [], cfg, in_process=True)
    assert not bad and drop == {(0, 2): "exact_duplicate"}
