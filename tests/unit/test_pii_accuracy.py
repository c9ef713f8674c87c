"""PII redaction on realistic text: look-alikes from code and prose that must survive, leaks
that must not, text around a replacement kept as it was, and time linear in the length of a
chain of glued items (each freed only when its neighbour is replaced)."""

from __future__ import annotations

import random

import pytest

from raylm import pii
from raylm.pii import PII_TYPES, redact


def _found(text: str) -> dict[str, int]:
    return {kind: n for kind, n in redact(text)[1].items() if n}


@pytest.mark.parametrize("text", [
    '<img srcset="logo@2x.png 2x, logo@3x.png 3x">',  # high-resolution image variants
    "background: url(icon@2x.webp);",
    "<script src=\"/vendor/jquery@3.6.0.min.js\"></script>",  # versioned assets
    "bootstrap@5.3.0.min.css",
    "git clone git@github.com:org/repo.git",  # the SSH account of every Git host
    "git remote add origin ssh://git@gitlab.example.com/team/repo.git",
])
def test_file_names_and_git_remotes_are_not_emails(text):
    assert redact(text) == (text, dict.fromkeys(PII_TYPES, 0))


@pytest.mark.parametrize("text", [
    "mail bob@example.zip",  # .zip, .mov, .py, .sh are top-level domains: still addresses
    "mail bob@example.py",
    "mail gitlab@example.com",  # only the bare `git` account is a Git host's
    "mail git.user@example.com",
    "mail JOHN.DOE+TAG@MAIL.SUB.EXAMPLE.CO.UK",
])
def test_addresses_near_those_look_alikes_are_still_redacted(text):
    assert redact(text)[0] == "mail <EMAIL>"


@pytest.mark.parametrize("text", [
    "released 2024-01-15 at 10:30:45, due 12/31/2023",
    "the war of 1914-1918, pp. 123-145",
    "ISBN 978-3-16-148410-0",
    "invoice INV-2024-000123, order #123-456",
    "x = 1234567890123456",  # 16 digits failing Luhn
    "coords 40.7128, -74.0060; total $1,234,567.89",
    "sha 3f786850e387550fdab836ed7e6dc881de23001b",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "v2.10.0.1 and 1.2.3.4.5",
    "@user wrote: @media screen { a { color: red } }",
    "open https://user@host/path",
    "std::vector<int> v; a[1::2]",
])
def test_look_alikes_survive(text):
    assert _found(text) == {}, redact(text)[0]


@pytest.mark.parametrize("text,kind", [
    ("+44 20 7946 0958", "phone"),
    ("+7 (495) 123-45-67", "phone"),
    ("(415) 555-0132", "phone"),
    ("415.555.0132", "phone"),
    ("[2001:DB8::8A2E:370:7334]:8080", "ip"),
    ("fe80::a00:27ff:fe4e:66a1", "ip"),
    ("5555-5555-5555-4444", "card"),
    ("3782 822463 10005", "card"),
])
def test_leaks_are_redacted(text, kind):
    assert _found(text) == {kind: 1}


def test_full_width_at_sign_counts_as_at():
    # CJK pages write addresses with U+FF20 to dodge harvesters; the address is still one.
    text = "お問い合わせ：info＠example.co.jp まで"
    assert redact(text) == ("お問い合わせ：<EMAIL> まで", {"email": 1, "phone": 0, "ip": 0, "card": 0})
    assert _found("＠user と a＠b") == {}


def test_text_around_replacements_is_kept_character_for_character():
    text = "café «bob@example.com» naïve\t192.168.0.1\n日本 +44 20 7946 0958。"
    assert redact(text)[0] == "café «<EMAIL>» naïve\t<IP_ADDRESS>\n日本 <PHONE>。"


@pytest.mark.parametrize("unit,kinds", [
    ("+14155550199", {"phone": 1}),  # each freed when the one before becomes <PHONE>
    ("+14155550199 4111111111111111", {"phone": 1, "card": 1}),  # phone frees card frees phone
])
def test_a_long_chain_of_glued_items_takes_linear_time(monkeypatch, unit, kinds):
    # Every round freed one more item and read the whole text: 3000 phones (36 KB) took
    # about 12 s of CPU, 100 KB over a minute. Now a round reads a window around what
    # changed, so the text the passes read in all stays a small multiple of its length.
    read = []
    whole_round = pii._redact_round
    monkeypatch.setattr(pii, "_redact_round", lambda text, *a: (read.append(len(text)), whole_round(text, *a))[1])
    n = 3000
    text = unit * n
    out, counts = redact(text)
    assert {k: v for k, v in counts.items() if v} == {k: v * n for k, v in kinds.items()}
    assert set(out) <= set("<PHONE> CARD_NUMBER")
    assert len(read) > n  # a round an item: the chain was freed one by one
    assert sum(read) < 300 * len(text) / len(unit) * 2  # windows of a few hundred characters, not the text


def _whole_text_rounds(text):
    """The reference: rounds over the whole text until one finds nothing."""
    passes = pii._passes_for(PII_TYPES)
    counts = dict.fromkeys(PII_TYPES, 0)
    changed = True
    while changed is not None:
        text, changed = pii._redact_round(text, passes, counts)
    return text, counts


@pytest.mark.parametrize("reach,margin", [(256, 64), (24, 8)])
def test_rounds_in_windows_give_what_whole_text_rounds_give(monkeypatch, reach, margin):
    # Small windows cut items often, which the margin must catch.
    monkeypatch.setattr(pii, "_WINDOW_REACH", reach)
    monkeypatch.setattr(pii, "_WINDOW_MARGIN", margin)
    items = ["bob@example.com", "+1 415 555 0132", "+14155550199", "(415) 555-0132", "415-555-0132",
             "4111 1111 1111 1111", "4111111111111111", "192.168.0.1", "2001:db8::8a2e:370:7334", "fe80::1",
             "x123", "ext. 12", "4111111111111112", "1234", "7", "a" * 70, "1" * 30, "+44 (0)20 7946 0958",
             "x@" + "a." * 40 + "com", "2024-01-15", "12:30:45", "(", "+", "'"]
    glue = ["", "", " ", ".", ":", "-", "@", "+", "\n"]
    rng = random.Random(0)
    for _ in range(300):
        doc = "".join(rng.choice(items) + rng.choice(glue) for _ in range(rng.choice([5, 40, 300])))
        assert redact(doc) == _whole_text_rounds(doc), doc
