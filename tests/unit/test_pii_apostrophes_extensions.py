"""PII redaction of e-mail local parts with an apostrophe and of phone numbers with an
extension (raylm.pii): taken whole, where part of each was left in the text (`o'<EMAIL>`,
`<PHONE> x123`) or the whole number was missed (`415-555-0132x89`)."""

import time

import pytest

from raylm.pii import PII_TYPES, redact


def _counts(**nonzero: int) -> dict[str, int]:
    return {t: nonzero.get(t, 0) for t in PII_TYPES}


@pytest.mark.parametrize("text, expected", [
    ("mail o'brien@example.com now", "mail <EMAIL> now"),
    ("john.o'reilly@mail.example.org", "<EMAIL>"),
    ("'o'brien@example.com'", "'<EMAIL>'"),
    ("a'b'c@example.com", "<EMAIL>"),
])
def test_an_apostrophe_inside_the_local_part_is_part_of_the_address(text, expected):
    assert redact(text) == (expected, _counts(email=1))


@pytest.mark.parametrize("text, expected", [
    ("'bob@example.com'", "'<EMAIL>'"),  # quotes around an address stay
    ("it's bob@example.com", "it's <EMAIL>"),
    ("print('user'+'bob@example.com')", "print('user'+'<EMAIL>')"),  # not between two letters
    ("o''brien@example.com", "o''<EMAIL>"),
])
def test_an_apostrophe_at_the_edge_of_the_local_part_stays_outside_it(text, expected):
    assert redact(text) == (expected, _counts(email=1))


@pytest.mark.parametrize("text", ["don't@ me", "x'@example.com", "'@example.com", "rock'n'roll"])
def test_apostrophes_make_no_new_addresses(text):
    assert redact(text) == (text, _counts())


@pytest.mark.parametrize("text", [
    "415-555-0132x89", "555-223-4567x89", "415.555.0132x7", "(415) 555-0132 x12", "415 555 0132 x12",
    "415-555-0132 ext. 12", "415-555-0132 Ext 12", "415-555-0132 ext123",
    "+1 415 555 0100 x123", "+1 415 555 0100x123", "+14155550132x5", "(+44) 20 7946 0958 ext. 5",
])
@pytest.mark.parametrize("before, after", [("", ""), ("call ", " now"), ("(", ")"), ("x: ", ".")])
def test_a_phone_with_an_extension_is_taken_whole(text, before, after):
    assert redact(f"{before}{text}{after}") == (f"{before}<PHONE>{after}", _counts(phone=1))


@pytest.mark.parametrize("text, expected", [
    ("415-555-0132 x", "<PHONE> x"),
    ("415-555-0132 extra", "<PHONE> extra"),
    ("415-555-0132 x 2", "<PHONE> x 2"),
    ("+44 20 7946 0958 2024 x12", "<PHONE> 2024 x12"),  # the extension goes with the number given back
])
def test_what_is_not_an_extension_stays(text, expected):
    assert redact(text) == (expected, _counts(phone=1))


@pytest.mark.parametrize("text", ["1920x1080", "0x1F", "415-555-0132xyz", "3x4 = 12", "x123", "ext. 42"])
def test_extensions_make_no_new_phones(text):
    assert redact(text) == (text, _counts())


def test_no_catastrophic_backtracking_on_extensions_and_apostrophes():
    start = time.process_time()
    for nasty in ["415-555-0132 ext " * 10_000, "+1 415 555 0100 x" * 10_000, "o'" * 100_000 + "@example.com"]:
        redact(nasty)
    assert time.process_time() - start < 1.0
