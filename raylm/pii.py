"""PII redaction for pre-training text: e-mail addresses, phone numbers, IP addresses and
payment-card numbers are replaced by typed placeholders, and counted.

    >>> redact("mail bob@example.com or call (415) 555-0132")
    ('mail <EMAIL> or call <PHONE>', {'email': 1, 'phone': 1, 'ip': 0, 'card': 0})

Standard library only (`re`); every pattern is compiled once. Most documents pay for two
cheap scans: `'@' in text` (or its full-width form) gates the e-mail pattern, and one search
for an ASCII digit gates the other three (no digit, no phone, IP or card number). A
replacement can free a neighbour glued to it, so passes repeat; after the first, each round
reads only a window around what the previous one changed, so time stays linear in the text.

What is found
  email  local@domain.tld: the domain has at least one dot and ends in an alphabetic TLD of
         2+ letters; the local part may hold an apostrophe between two letters or digits
         (`o'brien@example.com`), never at its ends (`'bob@example.com'` keeps its quotes).
         `user@localhost`, `a@b` and `admin@192.168.0.1` are not e-mails (the IP in the
         last one is still redacted as an IP). The full-width `＠` (`info＠example.co.jp`,
         written so in CJK text to dodge address harvesters) counts as '@'. File names are
         not addresses: a domain ending in an image, web, archive or document file
         extension that is no top-level domain (`logo@2x.png`, `jquery@3.6.0.min.js`), and
         neither is `git@host`, the SSH account of Git hosts (`git@github.com:org/repo.git`).
  card   13-19 digits that pass the Luhn check, written together or in groups of 3-6
         digits joined by single spaces or by single hyphens (one kind per number). Numbers
         that fail Luhn are left alone. The first digit must be 2-6, where the card schemes
         are (Mastercard, Amex, JCB, Diners, Visa, Maestro, Discover, UnionPay); a 13-digit
         number must start with 4 (legacy Visa, the only 13-digit cards). That keeps out
         runs of zeros, ISBN-13s (978...), millisecond timestamps and tweet ids (1...).
  ip     IPv4 with every octet 0-255 and no leading zeros; IPv6 in the full 8-group form
         and the `::`-compressed forms (`2001:db8::8a2e:370:7334`, `fe80::1`).
  phone  '+' country code followed by digit groups of any length (`+1 415 555 0132`,
         `+44 20 7946 0958`, `+49 30 901820`, `+31 6 12345678`, `+1 (415) 555-0132`,
         `+14155550132`), the code also in parentheses (`(+44) 20 7946 0958`), 8-15 digits
         in all; and North American numbers `(415) 555-0132`, `415-555-0132`,
         `415.555.0132`, `415 555 0132`, optionally after `1-`. An extension is taken with
         either kind: `x123` glued or after a space, `ext. 123`, `ext 123` (1-6 digits).

What is left alone on purpose: years and year ranges (1999-2004), dates (2024-01-15),
times (12:30:45), version strings (3.11.4, v1.2.3.4), dotted numbers with a fifth part
(1.2.3.4.5), C++/Rust paths (std::vector), ISBNs with hyphens (978-3-16-148410-0), line
numbers, and digit runs without a '+' or phone punctuation (x = 12345678).

Known limits (what it misses, and what it takes by mistake)
  - Names, postal addresses, national ID numbers, IBANs, MAC addresses, and anything
    spelled out ("four one five ...") or obfuscated ("bob at example dot com") are missed.
  - National phone formats other than North American are missed unless written with a
    '+' country code: `020 7946 0958` (UK) or `030 901820` (Germany) survive.
  - A number glued to another number by a space or hyphen is read as one longer number:
    `4111 1111 1111 1111 2025` (card then year) and `2025 415 555 0132` are missed; a card
    followed by `12/25` is found.
  - A Luhn-valid 14-19 digit number starting with 2-6 is a "card": IMEIs (15 digits, Luhn
    by design, starting 35) and about one random long id, seed or big integer in twenty
    are redacted. UATP cards (first digit 1) are missed.
  - A four-part dotted number with parts <= 255 is an IPv4 address, so section numbers or
    versions written as `1.2.3.4` (without a `v`) are redacted.
  - '+' then 8-15 digits in groups is a phone, so `+100 000 000` in a table is redacted
    (a signed decimal, `+40.712776`, is not). A number after a phone and a space is taken
    with it while the whole stays within 15 digits: `+1 800 555 0199 24/7` loses its `24`
    (past 15 digits, as in `+44 20 7946 0958 2024`, the trailing number is given back).
  - IPv6 needs a decimal digit and, when compressed, one group of 3-4 hex digits: this keeps
    Python slices (`a[1::2]`) and hex-only C++ names (`cafe::babe`) out but misses `::1`,
    and still takes C++ names made of hex letters and digits (`Abc::Def1`) for addresses.
    `::ffff:192.0.2.1` becomes `::ffff:<IP_ADDRESS>`.
  - E-mail local parts are ASCII: `josé@example.com` is missed and `müller.b@example.com`
    keeps its `mü` (and `o’brien@example.com`, a typographic apostrophe, its `o’`);
    internationalised (non-ASCII) domains are missed.
  - `415 555-0132` (mixed separators) and other North American variants not listed above
    are missed, and so are numbers whose exchange (middle group) starts with 0 or 1, which
    no real North American number does: textbook fakes like `(555) 123-4567` survive.
  - A matrix product in code written without spaces, `h = x@self.proj`, is an e-mail.
  - Only ASCII digits count; full-width or other scripts' digits are not looked at.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from raylm.errors import ConfigError

PII_TYPES = ("email", "phone", "ip", "card")  # the order used in reports and count dicts
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "card": "<CARD_NUMBER>"}

# The order the passes run in, which is not the report order. E-mail first, because a local
# part may hold digits that the other patterns would take (4155550132@example.com). Then
# the strictest claims before the loosest: card (a checksum), IP, phone. The boundaries
# below already stop any pattern from taking part of another type's item, so this order is
# the second line of defence. No placeholder holds a digit, '@' or ':', so none can be
# matched by a later pass or a later call.
_PASS_ORDER = ("email", "card", "ip", "phone")

# Speed. Python's re scans fast (a C loop over the text) only when a pattern starts with a
# literal or a character class; a leading look-behind makes it try the whole pattern at every
# position, 4-10x slower. So each pattern below starts with its first character and checks
# what comes before it with a look-behind placed after that character. IP addresses also get
# a hint that starts with a literal (".digit", ":hex:" or "::"), and their full patterns only
# run where it occurs; IPv6 has no usable first character at all.
#
# re.ASCII everywhere: \d and \w would otherwise match digits and letters of every script,
# which neither the Luhn check nor the octet ranges are meant for.
_A = re.ASCII | re.VERBOSE

# E-mail is found from its '@' (rare in text, so the scan is cheap) with the domain on the
# right; the local part on the left is collected by walking back over its characters.
_EMAIL_DOMAIN = re.compile(r"""
    [@\uFF20] (?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+   # labels, each followed by a dot
    [A-Za-z]{2,63}                                         # alphabetic TLD
    (?![A-Za-z0-9_-]|\.[A-Za-z0-9_-])                      # a sentence's final '.' may follow
""", _A)
_EMAIL_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
# An apostrophe is part of the local part only between two letters or digits (o'brien,
# john.o'reilly): that way a quote around an address ('bob@example.com') or between two
# quoted strings ('x'+'bob@example.com') stays outside it.
_EMAIL_LOCAL_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_EMAIL_LOCAL_MAX = 64  # RFC 5321; a longer run before '@' is a blob, not an address
# File names that look like addresses: high-resolution image variants (`logo@2x.png`,
# `icon@3x.webp`) and versioned assets (`jquery@3.6.0.min.js`), common in HTML, CSS and
# Markdown. None of these endings is a top-level domain (checked against IANA's list; `map`,
# `zip`, `mov`, `py`, `sh`, `md` and `rs` are, so they are not here), so no address is lost.
_FILE_EXTENSIONS = frozenset("""
    png jpg jpeg gif svg webp bmp ico tif tiff avif heic psd eps
    js mjs cjs ts tsx jsx css scss sass less html htm json xml yaml yml toml ini cfg conf
    txt csv tsv pdf log lock doc docx xls xlsx ppt pptx rtf
    gz tgz xz zst tar rar whl jar war apk dmg iso exe dll bin
    wav webm ogg flac mkv avi woff ttf otf eot
""".split())
# `git@github.com:org/repo.git`: the SSH account every Git host uses, not anyone's mailbox.
_EMAIL_SERVICE_ACCOUNTS = frozenset({"git"})

# A run of digit groups, taken whole: the look-arounds stop a match from starting or ending
# inside a longer run, so a table of numbers never yields a 16-digit window. Groups of 3+
# digits keep `12/25` (an expiry) and ISBN parts outside the run.
_CARD = re.compile(r"""
    \d (?<![\w.+-]\d) (?<!\d\d\d[ -]\d)
    \d{2,} (?:[ -]\d{3,})*
    (?!\w|[.-]\d|[ -]\d{3})
""", _A)

# Four dotted groups of 1-3 digits with no letter, digit or dot on either side, so
# `1.2.3.4.5`, `v1.2.3.4` and `999.1.1.1` (which contains 99.1.1.1) are not addresses; the
# 0-255 range is checked on the match. A trailing '.' not followed by a digit ends a sentence.
_IPV4 = re.compile(r"\d (?<![\w.]\d) \d{0,2} (?:\.\d{1,3}){3} (?!\w|\.\d)", _A)
_IPV4_HINT = re.compile(r"\.\d", re.ASCII).search  # a literal first: scans faster than \d

_H = r"[0-9A-Fa-f]{1,4}"
# The compressed branch allows up to 14 groups; _ipv6_plausible enforces the real limit of 7.
_IPV6 = re.compile(rf"""
    (?<![\w:.])
    (?: (?:{_H}:){{7}}{_H}
      | (?:{_H}(?::{_H}){{0,6}})? :: (?:{_H}(?::{_H}){{0,6}})? )
    (?!\w|:[\w:]|\.\d)                  # a ':' before a space or the end is the sentence's
""", _A)
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{1,4}:|::", _A)

# Phones need a '+' country code or the North American 3-3-4 shape with phone punctuation;
# that is what separates them from years, dates, times, versions and plain integers, none of
# which have either. Neither may be glued to a word, a number, a '.', '+', '-' or ')'.
# International groups may be of any length (`+31 6 12345678`, `+1 4155550132`); the digit
# count is checked on the match, and a number after a space that pushes it past 15 digits is
# given back (`_intl_phone`). The country code may stand in parentheses: `(+44) 20 7946 0958`.
# An extension belongs to the number: `x123` glued or after a space, `ext. 123`, `ext123`.
# Only after a whole phone, so it cannot make a phone of anything else; with it the number
# is taken whole where the 'x' had left it unmatched (`415-555-0132x89`) or left behind.
_EXTENSION = r"(?: [ ]?[xX] | [ ]?(?:ext|Ext|EXT)\.?[ ]? ) \d{1,6}"

_PHONE_INTL = re.compile(r"""
    [(+] (?<![\w.+)-][(+])
    (?: (?<=\() \+ [1-9]\d{0,2} \) [ .-]?                 # (+44) 20 7946 0958
        \d{1,14} (?:[ .-]\d{1,14}){0,5}
      | (?<=\+) [1-9]\d{7,14}                             # +14155550132
      | (?<=\+) [1-9]\d{0,2}                              # country code, then a separator or an (area)
        (?: [ .-] | [ .-]?\(\d{1,4}\)[ .-]? )
        \d{1,14} (?:[ .-]\d{1,14}){0,5} )                 # groups; 8-15 digits in all, checked on the match
    (?P<ext> {_EXTENSION} )?
    (?!\w|[.-]\d)
""".replace("{_EXTENSION}", _EXTENSION), _A)
# North American: the separators must agree, an optional trunk "1" may lead, and the
# space-separated form may not touch another number (a row of integers in a table).
# The first character decides the branch: the (?<=...) after it re-reads that character.
_PHONE_NANP = re.compile(r"""
    [(1-9] (?<![\w.+)-][(1-9])
    (?: (?<=\() [2-9]\d\d\)[ ]?[2-9]\d\d[ .-]\d{4}                  # (415) 555-0132
      | (?<=1) [ .-]?\([2-9]\d\d\)[ ]?[2-9]\d\d[ .-]\d{4}           # 1 (415) 555-0132
      | (?<=1) (?: -[2-9]\d\d-[2-9]\d\d-\d{4}                       # 1-415-555-0132
                 | \.[2-9]\d\d\.[2-9]\d\d\.\d{4}
                 | (?<!\d[ ]1)[ ][2-9]\d\d[ ][2-9]\d\d[ ]\d{4}(?![ ]\d) )
      | (?<=[2-9]) \d\d (?: -[2-9]\d\d-\d{4}                        # 415-555-0132
                          | \.[2-9]\d\d\.\d{4}
                          | (?<!\d[ ]\d\d\d)[ ][2-9]\d\d[ ]\d{4}(?![ ]\d) )
    )
    (?: {_EXTENSION} )?
    (?!\w|[.-]\d)
""".replace("{_EXTENSION}", _EXTENSION), _A)

_HAS_DIGIT = re.compile(r"\d", re.ASCII).search
_NOT_DIGIT = re.compile(r"\D", re.ASCII)

# Doubling a digit and summing the result's digits, looked up instead of computed.
_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def luhn_ok(digits: str) -> bool:
    """True when `digits` (ASCII digits only, no separators) passes the Luhn checksum.
    Anything else, including the empty string, is False."""
    if not digits or not digits.isascii() or not digits.isdigit():
        return False
    values = [ord(c) - 48 for c in reversed(digits)]
    return (sum(values[0::2]) + sum(_LUHN_DOUBLED[d] for d in values[1::2])) % 10 == 0


def _card_ok(found: str) -> bool:
    digits = _NOT_DIGIT.sub("", found)
    if not 13 <= len(digits) <= 19 or digits[0] not in "23456":
        return False
    if len(digits) == 13 and digits[0] != "4":
        return False
    if len(digits) != len(found):
        if " " in found and "-" in found:  # 4111 1111-1111 1111 is two numbers, not one
            return False
        if any(len(group) > 6 for group in re.split(r"[ -]", found)):  # cards group by 4-6
            return False
    return luhn_ok(digits)


def _ipv4_ok(found: str) -> bool:
    # "01" is refused: addresses are not written with leading zeros, dates and codes are.
    return all(int(part) <= 255 and (part == "0" or part[0] != "0") for part in found.split("."))


def _ipv6_plausible(found: str) -> bool:
    if not _HAS_DIGIT(found):
        return False
    if "::" not in found:
        return True
    groups = [g for g in found.split(":") if g]
    return len(groups) <= 7 and any(len(g) >= 3 for g in groups)


def _intl_phone(found: str) -> str | None:
    """The international phone number a `_PHONE_INTL` match starts with, or None.

    8-15 digits (E.164 allows at most 15). Groups take any number of digits, so a number that
    follows the phone after a space (`+44 20 7946 0958 2024`, `... 0958 12345678`) is taken
    as one more group: past 15 digits, trailing groups after a space are given back. A single
    '.' and no other separator is a signed decimal (`+40.712776`, `+3.14159265`), not a phone."""
    while len(_NOT_DIGIT.sub("", found)) > 15 and " " in found:
        found = found[:found.rindex(" ")]
    if not 8 <= len(_NOT_DIGIT.sub("", found)) <= 15 or not found[-1].isdigit():
        return None
    if found.count(".") == 1 and not any(c in found for c in " -()"):
        return None
    return found


def _substitute(pattern: re.Pattern, accept: Callable[[str], bool] | None, placeholder: str,
                text: str) -> tuple[str, int]:
    """`pattern.sub` that keeps a match when `accept` rejects it, and counts replacements."""
    count = 0

    def replace(m: re.Match) -> str:
        nonlocal count
        found = m.group()
        if accept is not None and not accept(found):
            return found
        count += 1
        return placeholder

    return pattern.sub(replace, text), count


def _redact_email(text: str) -> tuple[str, int]:
    pieces, done, count = [], 0, 0
    for m in _EMAIL_DOMAIN.finditer(text):
        at = m.start()
        start, lowest = at, max(done, at - _EMAIL_LOCAL_MAX - 1)
        while start > lowest:
            c = text[start - 1]
            if not (c in _EMAIL_LOCAL_CHARS or (c == "'" and start - 1 > lowest and start < at
                                                and text[start - 2] in _EMAIL_LOCAL_ALNUM
                                                and text[start] in _EMAIL_LOCAL_ALNUM)):
                break
            start -= 1
        if at - start > _EMAIL_LOCAL_MAX:
            continue
        while start < at and text[start] == ".":  # a local part neither starts nor ends with '.'
            start += 1
        if start == at or text[at - 1] == ".":
            continue
        if (m.group().rpartition(".")[2].lower() in _FILE_EXTENSIONS
                or text[start:at] in _EMAIL_SERVICE_ACCOUNTS):
            continue
        pieces += (text[done:start], PLACEHOLDERS["email"])
        done = m.end()
        count += 1
    if not count:
        return text, 0
    pieces.append(text[done:])
    return "".join(pieces), count


def _redact_card(text: str) -> tuple[str, int]:
    return _substitute(_CARD, _card_ok, PLACEHOLDERS["card"], text)


def _redact_ip(text: str) -> tuple[str, int]:
    n6 = n4 = 0
    if _IPV6_HINT.search(text):
        text, n6 = _substitute(_IPV6, _ipv6_plausible, PLACEHOLDERS["ip"], text)
    if _IPV4_HINT(text):
        text, n4 = _substitute(_IPV4, _ipv4_ok, PLACEHOLDERS["ip"], text)
    return text, n6 + n4


def _redact_intl_phone(text: str) -> tuple[str, int]:
    count = 0

    def replace(m: re.Match) -> str:
        nonlocal count
        found, ext = m.group(), m.group("ext") or ""
        number = found[:len(found) - len(ext)]
        phone = _intl_phone(number)
        if phone is None:
            return found
        count += 1
        if phone != number:  # a number glued on was given back, and the extension is its
            return PLACEHOLDERS["phone"] + found[len(phone):]
        return PLACEHOLDERS["phone"]

    return _PHONE_INTL.sub(replace, text), count


def _redact_phone(text: str) -> tuple[str, int]:
    n_intl = 0
    if "+" in text:  # international first: its national part would pass as North American
        text, n_intl = _redact_intl_phone(text)
    text, n_nanp = _substitute(_PHONE_NANP, None, PLACEHOLDERS["phone"], text)
    return text, n_intl + n_nanp


_PASSES = {"email": _redact_email, "card": _redact_card, "ip": _redact_ip, "phone": _redact_phone}


_PASSES_FOR: dict[tuple, tuple[str, ...]] = {}  # a `types` argument -> its checked passes


def _passes_for(types) -> tuple[str, ...]:
    """The passes to run, in _PASS_ORDER, for a `types` argument; cached, because redact is
    called once per document, often on documents of a few hundred bytes."""
    if isinstance(types, str):  # ("email") is a str, not a tuple: take it as meant
        types = (types,)
    key = tuple(types)
    passes = _PASSES_FOR.get(key)
    if passes is None:
        for t in key:
            if t not in PLACEHOLDERS:
                raise ConfigError(f"unknown PII type {t!r} in types={key!r}; "
                                 f"valid types are {', '.join(PII_TYPES)}")
        passes = _PASSES_FOR[key] = tuple(kind for kind in _PASS_ORDER if kind in key)
    return passes


def redact(text: str, types: tuple[str, ...] = PII_TYPES) -> tuple[str, dict[str, int]]:
    """Replace each e-mail, phone number, IP address and card number in `text` by its
    placeholder (PLACEHOLDERS) and count them.

    `types` picks which kinds to redact; the others are left in the text. The counts hold
    every requested type, in PII_TYPES order, 0 when none was found. The passes always run in
    a fixed order (email, card, ip, phone) whatever the order of `types`. Redacting an
    already redacted text changes nothing. Unknown type names raise ValueError."""
    passes = _passes_for(types)
    counts = {t: 0 for t in PII_TYPES if t in passes}
    # A replacement changes what its neighbours see: in `415-555-0132+14155550199` the
    # second number is glued to a digit until the first becomes <PHONE>. So the passes are
    # repeated until one round finds nothing, which is also what makes a second call a no-op.
    # Every match removes a digit or an '@' (or '＠') and no placeholder has one, so this
    # ends; text without PII takes one round, text with PII usually two.
    #
    # Only the first round reads the whole text. What a round leaves unchanged away from its
    # replacements is settled, so the next round reads a window around the part it changed:
    # a chain of glued items (`+14155550199+14155550199...`, one more freed each round) took
    # a whole-text round per item, minutes for 100 KB.
    text, changed = _redact_round(text, passes, counts)
    if changed is not None:
        text = _redact_near_changes(text, changed, passes, counts)
    return text, counts


# A round after the first reads _WINDOW_REACH characters either side of the part the previous
# one changed: an item freed by a change touches it, and the longest phone with its
# extension and context is about 130 characters. The window's own ends are not the text's,
# and an item they cut would be misread, so its round counts only when everything it
# replaced lies at least _WINDOW_MARGIN characters inside a cut end; otherwise it runs again
# in a window twice as wide, up to the whole text.
_WINDOW_REACH = 256
_WINDOW_MARGIN = 64


def _redact_round(text: str, passes: tuple[str, ...],
                  counts: dict[str, int]) -> tuple[str, tuple[int, int] | None]:
    """One round of `passes` over `text`, adding to `counts`: the new text and the part
    that changed, as (characters kept at the start, characters kept at the end), or None."""
    before = text
    # Every type but e-mail needs a digit: most prose skips all but two cheap scans.
    has_digit = _HAS_DIGIT(text) is not None
    found = 0
    for kind in passes:
        worth_a_look = ("@" in text or "\uff20" in text) if kind == "email" else has_digit
        if worth_a_look:
            text, n = _PASSES[kind](text)
            counts[kind] += n
            found += n
    return text, (_changed(before, text) if found else None)


def _changed(before: str, after: str) -> tuple[int, int]:
    """How many characters `before` and `after` share at the start, and then at the end
    (not overlapping that start). Found by halving with slice comparisons (memcmp), not a
    character loop."""
    limit = min(len(before), len(after))
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if before[:mid] == after[:mid]:
            lo = mid
        else:
            hi = mid - 1
    head = lo
    lo, hi = 0, limit - head
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if before[len(before) - mid:] == after[len(after) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return head, lo


def _redact_near_changes(text: str, changed: tuple[int, int], passes: tuple[str, ...],
                         counts: dict[str, int]) -> str:
    """The rounds after the first, until one finds nothing, each in a window around the part
    the previous one changed (`changed`: characters kept at the start, and at the end). A
    round splices its window back in: one copy of the text, at memory speed, where reading
    the whole text again costs each pattern's scan."""
    while True:
        head, tail = changed
        reach = _WINDOW_REACH
        while True:
            start, end = max(0, head - reach), min(len(text), len(text) - tail + reach)
            window_counts = dict.fromkeys(counts, 0)
            new, found = _redact_round(text[start:end], passes, window_counts)
            if found is None or ((start == 0 or found[0] >= _WINDOW_MARGIN)
                                 and (end == len(text) or found[1] >= _WINDOW_MARGIN)):
                break
            reach *= 2  # a replacement too near a cut end to trust
        if found is None:
            return text
        for kind, n in window_counts.items():
            counts[kind] += n
        text = text[:start] + new + text[end:]
        changed = (start + found[0], len(text) - (start + len(new)) + found[1])
