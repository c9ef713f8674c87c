"""PII redaction: every supported format is replaced and counted, look-alikes survive, the
type filter and the error for unknown types, idempotence, and linear time on nasty input."""

from __future__ import annotations

import random
import time

import pytest

from raylm.pii import PII_TYPES, PLACEHOLDERS, luhn_ok, redact

# (type, text) pairs: each text is exactly one item of that type.
PLANTED = [
    ("email", "bob@example.com"),
    ("email", "first.last+tag@mail.example.co.uk"),
    ("email", "j_doe-99%x@sub-domain.example.org"),
    ("phone", "+1 415 555 0132"),
    ("phone", "+44 20 7946 0958"),
    ("phone", "+49 30 901820"),
    ("phone", "+1 (415) 555-0132"),
    ("phone", "+44 (0)20 7946 0958"),
    ("phone", "+1-201-555-0123"),
    ("phone", "+14155550132"),
    ("phone", "(415) 555-0132"),
    ("phone", "(415)555-0132"),
    ("phone", "415-555-0132"),
    ("phone", "415.555.0132"),
    ("phone", "415 555 0132"),
    ("phone", "1-800-555-0199"),
    ("phone", "1 (800) 555-0199"),
    ("ip", "192.168.1.20"),
    ("ip", "10.0.0.1"),
    ("ip", "255.255.255.255"),
    ("ip", "0.0.0.0"),
    ("ip", "2001:db8::8a2e:370:7334"),
    ("ip", "fe80::1"),
    ("ip", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("ip", "2001:db8::"),
    ("card", "4111 1111 1111 1111"),
    ("card", "4111-1111-1111-1111"),
    ("card", "4111111111111111"),
    ("card", "5555 5555 5555 4444"),
    ("card", "2221000000000009"),
    ("card", "3782 822463 10005"),  # Amex 4-6-5
    ("card", "371449635398431"),
    ("card", "6011-1111-1111-1117"),
    ("card", "30569309025904"),  # Diners, 14 digits
    ("card", "4222222222222"),  # legacy Visa, 13 digits
    ("card", "6011000990139420007"),  # 19 digits
]

# Look-alikes that must come back unchanged, with every count 0.
NEAR_MISSES = [
    "4111 1111 1111 1112",  # 16 digits, fails Luhn
    "4111-1111-1111-1112",
    "5555555555554445",
    "4111111111111111100",  # 19 digits, fails Luhn
    "0000 0000 0000 0000",  # passes Luhn, but no card starts with 0
    "9783161484100",  # ISBN-13 without hyphens: passes Luhn, starts with 9
    "1700000000006",  # a millisecond timestamp that passes Luhn
    "4111 1111-1111 1111",  # mixed separators: two numbers, not one card
    "123456789 123456789",  # groups longer than cards use
    "4111111111111111 2025",  # glued to another number: one 20-digit run
    "1990 1991 1992 1993 1994",  # a row of years
    "999.1.1.1",
    "256.1.1.1",
    "1.2.3",
    "1.2.3.4.5",
    "v1.2.3.4",
    "01.02.03.04",
    "2024-01-15",
    "15.01.2024",
    "12:30:45",
    "3.11.4",
    "std::vector",
    "cafe::babe",  # hex-only C++ name
    "a[1::2]",  # Python slice
    "x[::-1]",
    "00:1a:2b:3c:4d:5e",  # MAC address: not an IP (and not covered)
    "user@localhost",
    "a@b",
    "x@y.c",  # one-letter TLD
    "x@example.c0m",
    "@decorator.attr",
    "978-3-16-148410-0",  # ISBN
    "1999-2004",
    "x = 12345678",
    "line 1234: return 0",
    "page 415 of 555",
    "+35236450.6",  # a signed decimal
    "+1980-02-29 01:02:03",  # a signed date
    "+1 415",  # too few digits for a phone
    "415-555-013",
    "415-555.0132",  # separators disagree
    "145-555-0132",  # no area code starts with 1
    "12 415 555 0132",  # glued to another number
    "4155550132",  # unformatted, no '+'
    "Version 2.0.1-rc.3 (build 20240115)",
]

CONTEXTS = [("", ""), ("see ", " now"), ("(", ")"), ("<", ">"), ("x: ", "."), ("\n", "\n")]


def _counts(**nonzero: int) -> dict[str, int]:
    return {t: nonzero.get(t, 0) for t in PII_TYPES}


@pytest.mark.parametrize("kind,item", PLANTED)
@pytest.mark.parametrize("before,after", CONTEXTS)
def test_planted_item_is_replaced_by_its_placeholder(kind, item, before, after):
    out, counts = redact(f"{before}{item}{after}")
    assert out == f"{before}{PLACEHOLDERS[kind]}{after}"
    assert counts == _counts(**{kind: 1})


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_miss_survives(text):
    for before, after in CONTEXTS:
        assert redact(f"{before}{text}{after}") == (f"{before}{text}{after}", _counts())


def test_mixed_document_counts_and_output():
    doc = (
        "Contact Jane at jane.doe@example.com or (415) 555-0132; Bob: bob@corp.example.org.\n"
        "Server 192.168.0.12 and 2001:db8::8a2e:370:7334 (fallback 10.1.2.3:8080).\n"
        "Paid with 4111 1111 1111 1111, refund to 5555-5555-5555-4444, not 4111 1111 1111 1112.\n"
        "Call +44 20 7946 0958 or +1 415 555 0132 before 2024-01-15 12:30:45 (v3.11.4).\n"
    )
    expected = (
        "Contact Jane at <EMAIL> or <PHONE>; Bob: <EMAIL>.\n"
        "Server <IP_ADDRESS> and <IP_ADDRESS> (fallback <IP_ADDRESS>:8080).\n"
        "Paid with <CARD_NUMBER>, refund to <CARD_NUMBER>, not 4111 1111 1111 1112.\n"
        "Call <PHONE> or <PHONE> before 2024-01-15 12:30:45 (v3.11.4).\n"
    )
    out, counts = redact(doc)
    assert out == expected
    assert counts == _counts(email=2, phone=3, ip=3, card=2)
    assert list(counts) == list(PII_TYPES)


def test_text_without_pii_is_returned_as_is_with_zero_counts():
    for text in ["", "To be, or not to be: that is the question.", "a" * 10_000]:
        assert redact(text) == (text, _counts())


@pytest.mark.parametrize("kind,item", PLANTED)
def test_no_other_type_claims_any_part_of_an_item(kind, item):
    # What makes the pass order safe: a card never holds a phone or IP, and so on.
    for other in PII_TYPES:
        if other != kind:
            assert redact(f"see {item} now", (other,)) == (f"see {item} now", {other: 0})


@pytest.mark.parametrize("local", ["4111111111111111", "415-555-0132", "10.0.0.1", "+14155550132"])
def test_email_goes_first_so_digits_in_its_local_part_stay_in_it(local):
    assert redact(f"reach {local}@example.com") == ("reach <EMAIL>", _counts(email=1))


def test_subset_of_types_leaves_the_others():
    doc = "bob@example.com (415) 555-0132 10.0.0.1 4111 1111 1111 1111"
    assert redact(doc, ("email",)) == ("<EMAIL> (415) 555-0132 10.0.0.1 4111 1111 1111 1111", {"email": 1})
    assert redact(doc, ("card", "ip")) == (
        "bob@example.com (415) 555-0132 <IP_ADDRESS> <CARD_NUMBER>", {"ip": 1, "card": 1})
    assert redact(doc, ("phone",)) == ("bob@example.com <PHONE> 10.0.0.1 4111 1111 1111 1111", {"phone": 1})
    assert redact(doc, ()) == (doc, {})
    assert redact(doc, "email") == redact(doc, ("email",))  # a bare string is one type


def test_order_of_types_does_not_change_the_result():
    doc = "bob@example.com (415) 555-0132 10.0.0.1 4111 1111 1111 1111"
    forward = redact(doc, PII_TYPES)
    backward = redact(doc, tuple(reversed(PII_TYPES)))
    assert forward[0] == backward[0]
    assert forward[1] == backward[1]
    assert list(backward[1]) == list(PII_TYPES)  # counts always come in report order


def test_unknown_type_raises_naming_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"'ssn'") as err:
        redact("bob@example.com", ("email", "ssn"))
    for valid in PII_TYPES:
        assert valid in str(err.value)
    with pytest.raises(ValueError, match=r"'Email'"):
        redact("x", ("Email",))


def test_redaction_is_idempotent():
    items = [item for _, item in PLANTED] + NEAR_MISSES
    for item in items:
        once, _ = redact(item)
        assert redact(once) == (once, _counts()), item
    # Random documents glue items together with assorted separators, so that placeholders
    # end up next to digits, dots and colons.
    rng = random.Random(0)
    glue = [" ", "", ".", ":", "-", "\n", ", ", "@", "+"]
    for _ in range(500):
        doc = "".join(rng.choice(items) + rng.choice(glue) for _ in range(rng.randint(1, 6)))
        once, _ = redact(doc)
        assert redact(once) == (once, _counts()), doc


def test_placeholders_are_never_matched():
    text = " ".join(PLACEHOLDERS.values())
    assert redact(text) == (text, _counts())


@pytest.mark.parametrize("number,ok", [
    ("79927398713", True),  # the textbook example
    ("4111111111111111", True),
    ("378282246310005", True),
    ("0", True),
    ("79927398710", False),
    ("4111111111111112", False),
    ("", False),
    ("4111 1111 1111 1111", False),  # separators are the caller's to strip
    ("4111-1111-1111-1111", False),
    ("٤١١١١١١١١١١١١١١١", False),  # Arabic-Indic digits are not ASCII digits
])
def test_luhn_ok(number, ok):
    assert luhn_ok(number) is ok


@pytest.mark.parametrize("nasty", [
    "1234 " * 40_000,
    "7" * 200_000,
    "1." * 100_000,
    "ab12:" * 40_000,
    "1::" * 60_000,
    ("a" * 50 + "@") * 4_000,
    "x@" + "a." * 100_000,
    "a." * 100_000 + "@b.co",
    "+1 " * 60_000,
    "(415) " * 30_000,
])
def test_no_catastrophic_backtracking(nasty):
    # About 200 KB each; linear patterns take milliseconds, so a second is generous even on
    # a loaded machine, and exponential backtracking would take hours.
    start = time.process_time()
    redact(nasty)
    assert time.process_time() - start < 1.0
