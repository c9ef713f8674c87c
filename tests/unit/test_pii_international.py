"""International phone numbers the PII pass missed: groups longer than six digits (Dutch and
German mobiles, a national number written without spaces), a country code in parentheses,
and a phone followed by another number after a space. Signed decimals stay."""

from __future__ import annotations

import pytest

from raylm.pii import PII_TYPES, redact


def _counts(**nonzero: int) -> dict[str, int]:
    return {t: nonzero.get(t, 0) for t in PII_TYPES}


@pytest.mark.parametrize("phone", [
    "+31 6 12345678",  # Dutch mobile
    "+49 151 12345678",  # German mobile
    "+358 40 1234567",  # Finnish mobile
    "+1 4155550132",  # the national number in one group
    "+7 9161234567",
    "+44 7911123456",
    "+49-30-12345678",
    "(+44) 20 7946 0958",  # country code in parentheses
    "(+49) 30 901820",
    "(+31) 6-12345678",
])
def test_international_phones_with_long_groups_or_a_bracketed_country_code(phone):
    for before, after in [("", ""), ("call ", " now"), ("(", ")"), ("tel: ", ".")]:
        assert redact(f"{before}{phone}{after}") == (f"{before}<PHONE>{after}", _counts(phone=1))


@pytest.mark.parametrize("text, expected", [
    ("+44 20 7946 0958 2024", "<PHONE> 2024"),  # a year after the phone: 16 digits in all
    ("+44 20 7946 0958 12345678", "<PHONE> 12345678"),
    ("+31 6 12345678 20240115", "<PHONE> 20240115"),
])
def test_a_number_after_the_phone_is_given_back_not_taken_with_it(text, expected):
    assert redact(text) == (expected, _counts(phone=1))


@pytest.mark.parametrize("text", [
    "+40.712776, -74.005974",  # a signed latitude
    "+3.14159265",
    "+4.1234567",
    "+35236450.6",
    "+1 415",
    "+1980-02-29 01:02:03",
    "a+31 6 12345678",  # glued to a word
    "(+44)",
])
def test_signed_decimals_and_short_numbers_stay(text):
    assert redact(text) == (text, _counts())


def test_a_card_after_a_phone_is_found_once_the_phone_gives_it_back():
    assert redact("+44 20 7946 0958 4111 1111 1111 1111") == ("<PHONE> <CARD_NUMBER>", _counts(phone=1, card=1))


@pytest.mark.parametrize("address", ["fe80::1", "2001:db8::8a2e:370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
                                     "2001:db8::"])
def test_an_ipv6_address_before_a_sentences_colon(address):
    for after in (": unreachable", ":\n", ":"):
        assert redact(f"connect to {address}{after}") == (f"connect to <IP_ADDRESS>{after}", _counts(ip=1))
    # A ':' followed by more of an address still keeps a prefix from being taken alone.
    assert redact("1:2:3:4:5:6:7:8:9") == ("1:2:3:4:5:6:7:8:9", _counts())


@pytest.mark.parametrize("nasty", ["(+1 " * 50_000, "(+1) " * 40_000, "+1 " + "1234567 " * 25_000,
                                   "(+44) 20 " * 20_000, "+4.1" * 50_000])
def test_no_catastrophic_backtracking_in_the_new_phone_forms(nasty):
    import time

    start = time.process_time()
    redact(nasty)
    assert time.process_time() - start < 1.0
