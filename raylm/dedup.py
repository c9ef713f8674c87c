"""Exact and near-duplicate detection: content hashes, MinHash signatures, LSH band keys.

Pure numpy, no `ray`: `raylm/data.py` runs these inside Ray Data (map_batches computes the
hashes, signatures and band keys; a groupby on a key gathers the candidates; a `UnionFind`
on the driver merges them into groups and keeps the first document of each).

*Exact duplicates* are documents whose UTF-8 bytes are equal. `content_hash` is their key:
a 16-byte blake2b digest, so two different documents collide with probability ~N²/2^129,
nothing at any corpus size.

*Near duplicates* are documents whose sets of word 5-grams ("shingles") overlap with a
Jaccard similarity above a threshold: the same page with another header, a reflowed copy, a
licence with one name changed. Words are runs of `\\w` and combining marks in the lowercased
text, so case, punctuation and whitespace do not count. Comparing every pair is O(N²); instead

* `MinHasher.signature` maps a document to `num_perm` minima of independent hash functions
  over its shingles. Two signatures agree at a position with probability equal to the
  documents' Jaccard similarity, so `estimated_jaccard` (the fraction of equal positions)
  estimates it with standard deviation sqrt(J(1-J)/num_perm), at most 0.044 for 128.
* `band_keys` cuts the signature into `bands` bands of `rows` entries and hashes each band.
  Two documents share a band key with probability 1-(1-J^rows)^bands, an S-curve in J that
  `lsh_params` places so that a pair at the threshold is a candidate with probability at
  least 0.95. Documents that share any key are candidates; the candidates are then verified
  (their estimated Jaccard must reach the threshold), so a candidate below it costs one
  comparison, while a pair LSH misses is a duplicate kept.

A text with fewer than `ngram` words is one shingle of all its words, so "Thank you!" and
"thank you." are near-duplicates of each other. A text with no words at all (empty, only
punctuation) has no shingles and the all-0xFFFFFFFF signature, which every such text shares:
`is_empty_signature` finds them, to keep them out of LSH.

Why these defaults:

* `num_perm=128`: the estimate's error (<= 0.044) is well inside the gap between
  near-duplicates (J > 0.8) and unrelated text (J ~ 0), and at threshold 0.8 it allows a
  steep S-curve (13 bands x 7 rows: a pair is a candidate with p~0.003 at J=0.3, 0.10 at
  0.5, 0.67 at 0.7, 0.95 at 0.8, 0.993 at 0.85). 256 halves the variance at twice the cost:
  one multiply-modulo per shingle and permutation is most of the signature's time.
* `ngram=5` words: short n-grams (1-3) are shared by most English documents ("one of the"),
  which pushes the Jaccard of unrelated documents up; long ones (10+) let a single edited
  word change many shingles, so near-duplicates look unrelated. datatrove (FineWeb's
  pipeline) makes the same choice: 5-grams, 112 hashes.

All hashes are stable across processes, machines and runs: no Python `hash()` (salted per
process), crc32 for words, fixed arithmetic in numpy, little-endian bytes in keys. The
permutation coefficients come from `np.random.default_rng(seed)`, whose stream numpy does not
promise to keep across releases: compare signatures only when they were made with the same
numpy version (true of one pipeline run).
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import unicodedata
import zlib

import numpy as np

from raylm.errors import ConfigError

_U64 = np.uint64
_MASK32 = 0xFFFFFFFF
# A prime just above 2**32, so (a*x + b) mod p is a universal hash family over 32-bit
# shingles. With a < 2**32 and x < 2**32, a*x + b <= (2**32-1)**2 + p-1 < 2**64: the whole
# computation fits uint64 without overflow.
_PRIME = 4294967311
_EMPTY = np.uint32(_MASK32)  # signature entry of a document with no shingles

# Base of the polynomial that combines word hashes into a shingle hash: odd, so invertible
# mod 2**32, and with well-spread bits (the golden ratio in 64 bits).
_SHINGLE_BASE = 0x9E3779B97F4A7C15
# The temporaries of `signature` are [chunk, num_perm] uint64 arrays; this bounds each one
# to 4 MiB whatever the document's length (a 1M-word document would otherwise need 1 GiB).
_SIGNATURE_CHUNK_ELEMENTS = 1 << 19


@functools.cache
def _word_pattern() -> re.Pattern:
    """A word is a \\w character and every \\w or combining mark (Unicode categories Mn, Mc,
    Me) after it. Python's \\w leaves marks out (they are not alphanumeric), so `\\w+` cut
    Devanagari, Thai, Tamil and other scripts' words at every vowel sign and dropped the signs:
    "किताब" and "कताब" were the same words, and texts differing only in vowel signs were
    near-duplicates. Led by one \\w, the pattern is as fast as `\\w+` on such text, and twice
    its time on other non-ASCII text (a whole signature 15-25% longer for accented Latin,
    Cyrillic or Chinese; a Hindi one takes less than half, with fewer words); a mark class at
    every position was 2-3 times slower. ASCII text does not use it. Built on first use (0.1 s:
    every code point's category)."""
    cps = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Mn", "Mc", "Me")]
    spans, start = [], cps[0]
    for prev, c in zip(cps, cps[1:] + [None]):
        if c != prev + 1:
            spans.append(re.escape(chr(start)) + ("" if prev == start else "-" + re.escape(chr(prev))))
            start = c
    return re.compile(r"\w[\w" + "".join(spans) + r"]*")


# For ASCII text, one bytes.translate (lowercase; everything outside [a-z0-9_] becomes a
# space) and bytes.split find the same words as the regex, about 3x faster, and crc32 reads
# the bytes without a per-word encode. For ASCII, Python's \w is exactly [A-Za-z0-9_].
_ASCII_WORD_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789_"
_ASCII_TO_WORDS = bytes(
    c if c in _ASCII_WORD_BYTES else (c + 32 if 65 <= c <= 90 else 32) for c in range(256)
)


def content_hash(text: str) -> bytes:
    """The exact-duplicate key: 16-byte blake2b of the text's UTF-8 bytes."""
    # surrogatepass: JSON corpora can carry lone surrogates; they must hash, not raise.
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _word_hashes(text: str) -> np.ndarray:
    """crc32 of each lowercased word of `text` (`_word_pattern`), in order, as uint64."""
    if text.isascii():
        words = text.encode("ascii").translate(_ASCII_TO_WORDS).split()
    else:
        words = [w.encode("utf-8", "surrogatepass") for w in _word_pattern().findall(text.lower())]
    return np.fromiter(map(zlib.crc32, words), dtype=_U64, count=len(words))


def shingles(text: str, ngram: int = 5) -> np.ndarray:
    """uint32 hashes of the text's word `ngram`-grams, in order (repeats kept).

    Words are the lowercased text's `\\w` runs with their combining marks. A text with fewer
    than `ngram` words gives one shingle of all its words (a short document still has a
    signature); a text with no words gives an empty array."""
    if ngram < 1:
        raise ConfigError(f"ngram must be >= 1, got {ngram}")
    words = _word_hashes(text)
    n = min(ngram, len(words))
    if n == 0:
        return np.empty(0, dtype=np.uint32)
    # h = sum_k w[i+k] * B^(n-1-k) mod 2**64, vectorised over i: n passes over the words.
    # Powers are computed with Python ints: numpy scalar arithmetic warns on wrap-around.
    count = len(words) - n + 1
    h = np.zeros(count, dtype=_U64)
    for k in range(n):
        power = _U64(pow(_SHINGLE_BASE, n - 1 - k, 1 << 64))
        h += words[k : k + count] * power
    # The low 32 bits are the same polynomial mod 2**32: with B odd, n-grams whose word
    # hashes differ in one position never collide, others with probability ~2**-32. No bit
    # mixing is needed: MinHash's universal hashes only ask that distinct shingles differ.
    return h.astype(np.uint32)


class MinHasher:
    """MinHash signatures over word shingles.

    Permutation i is h_i(x) = (a_i*x + b_i) mod p, p = 4294967311, with a_i in [1, 2**32)
    and b_i in [0, p) drawn from `np.random.default_rng(seed)`. (The universal family draws a
    from [1, p); leaving out the 15 values >= 2**32 keeps a*x+b below 2**64.) Signatures are
    comparable only between hashers with equal (num_perm, ngram, seed)."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 0):
        if num_perm < 1:
            raise ConfigError(f"num_perm must be >= 1, got {num_perm}")
        if ngram < 1:
            raise ConfigError(f"ngram must be >= 1, got {ngram}")
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, 1 << 32, size=(1, num_perm), dtype=_U64)
        self._b = rng.integers(0, _PRIME, size=(1, num_perm), dtype=_U64)
        self._chunk = max(1, _SIGNATURE_CHUNK_ELEMENTS // num_perm)

    def __repr__(self) -> str:
        return f"MinHasher(num_perm={self.num_perm}, ngram={self.ngram}, seed={self.seed})"

    def signature(self, text: str) -> np.ndarray:
        """uint32 [num_perm]: the minimum of each permutation over the text's shingles.
        A text without words gets all 0xFFFFFFFF (see `is_empty_signature`)."""
        x = shingles(text, self.ngram).astype(_U64)[:, None]
        sig = np.full(self.num_perm, _MASK32, dtype=_U64)
        p = _U64(_PRIME)
        for start in range(0, len(x), self._chunk):
            y = x[start : start + self._chunk] * self._a
            y += self._b
            # y - (y // p) * p rather than y % p: numpy's floor_divide by a scalar (libdivide)
            # is ~5x faster than its remainder; these three steps take half the time of %.
            q = y // p
            q *= p
            y -= q
            np.minimum(sig, y.min(axis=0), out=sig)
        # Values in [2**32, p) (15 of them) become 0xFFFFFFFF: order is kept, a collision
        # between two of them costs nothing measurable.
        return np.minimum(sig, _MASK32).astype(np.uint32)


def is_empty_signature(signature: np.ndarray) -> bool:
    """True for the signature of a text without words. All such texts share their band keys,
    so a pipeline should leave them out of LSH (or treat them with exact dedup)."""
    return bool(np.all(signature == _EMPTY))


def _s_curve_areas(threshold: float, bands: np.ndarray, rows: np.ndarray, points: int = 1001):
    """(false-positive, false-negative) areas of 1-(1-s^r)^b for each (b, r) pair: the
    probability of becoming a candidate below the threshold, and of missing one above it,
    integrated over s with the trapezoidal rule."""

    def area(lo: float, hi: float, miss: bool) -> np.ndarray:
        s = np.linspace(lo, hi, points)
        candidate = 1.0 - (1.0 - s[None, :] ** rows[:, None]) ** bands[:, None]
        f = 1.0 - candidate if miss else candidate
        return ((f[:, 1:] + f[:, :-1]) * 0.5 * np.diff(s)).sum(axis=1)

    return area(0.0, threshold, miss=False), area(threshold, 1.0, miss=True)


# Probability, at least, that a pair whose Jaccard similarity is the threshold shares a band.
RECALL_AT_THRESHOLD = 0.95


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows), bands*rows <= num_perm, for LSH whose candidates are verified: of
    the pairs whose S-curve makes a pair at `threshold` a candidate with probability at
    least RECALL_AT_THRESHOLD, the one with the least false-positive area below the
    threshold (the fewest candidates to verify). Where num_perm is too small for any, the
    one most likely to catch a pair at the threshold. Ties go to fewer bands, then fewer
    rows: deterministic.

    datasketch's MinHashLSH minimises 0.5*false-positive + 0.5*false-negative area, right
    for unverified candidates; behind a verification it misses many pairs above the
    threshold (at 0.8 and 128 permutations, 9 bands x 13 rows: a pair is a candidate with
    probability 0.40 at J=0.8, 0.69 at 0.85)."""
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold must be in (0, 1), got {threshold}")
    if num_perm < 1:
        raise ConfigError(f"num_perm must be >= 1, got {num_perm}")
    pairs = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    bands = np.array([b for b, _ in pairs], dtype=np.float64)
    rows = np.array([r for _, r in pairs], dtype=np.float64)
    false_pos, _ = _s_curve_areas(threshold, bands, rows)
    at_threshold = 1.0 - (1.0 - threshold**rows) ** bands
    enough = at_threshold >= RECALL_AT_THRESHOLD
    if not enough.any():
        return pairs[int(np.argmax(at_threshold))]  # first maximum: ties as above
    return pairs[int(np.argmin(np.where(enough, false_pos, np.inf)))]  # first minimum


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One 12-byte key per band: blake2b of (band index, the band's rows). Documents sharing
    any key are candidate near-duplicates.

    The band index is hashed in so that equal rows in different bands give different keys
    and all keys can go into one groupby. 12 bytes: over N keys in a corpus, ~N²/2^97 random
    collisions (each a false merge); 8 bytes would give ~0.03 at N = 10^9."""
    sig = np.asarray(signature)
    if sig.ndim != 1 or bands < 1 or rows < 1 or bands * rows > len(sig):
        raise ValueError(
            f"bands x rows = {bands} x {rows} needs a 1-D signature of at least {bands * rows} "
            f"entries, got shape {sig.shape}; take (bands, rows) from lsh_params(threshold, "
            f"num_perm) with the hasher's num_perm"
        )
    # Little-endian uint32 whatever the machine, so keys are comparable across nodes.
    data = np.ascontiguousarray(sig[: bands * rows], dtype="<u4").tobytes()
    width = 4 * rows
    return [
        hashlib.blake2b(
            band.to_bytes(4, "little") + data[band * width : (band + 1) * width], digest_size=12
        ).digest()
        for band in range(bands)
    ]


def compact_signature(signature: np.ndarray) -> bytes:
    """The low 16 bits of each entry (b-bit MinHash, Li and König 2010), as bytes: what LSH
    candidates carry to be verified. Two different minima agree on their low 16 bits with
    probability 2**-16, so the Jaccard estimate rises by at most that, at half the bytes of
    the full signature (each candidate row carries one through the groupby)."""
    return np.asarray(signature, dtype=np.uint32).astype("<u2").tobytes()


def compact_jaccard(a: bytes, b: bytes) -> float:
    """`estimated_jaccard` of two `compact_signature`s."""
    return float(np.mean(np.frombuffer(a, dtype="<u2") == np.frombuffer(b, dtype="<u2")))


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of equal entries of two signatures from the same MinHasher: the Jaccard
    estimate. Two texts without words estimate 1.0, as `true_jaccard` says."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(
            f"signatures differ in shape ({a.shape} vs {b.shape}): they come from hashers with "
            f"different num_perm"
        )
    return float(np.mean(a == b))


def true_jaccard(a: str, b: str, ngram: int = 5) -> float:
    """|A ∩ B| / |A ∪ B| of the two texts' shingle sets, exactly (up to 32-bit hash
    collisions). Two texts without words have similarity 1.0."""
    sa, sb = set(shingles(a, ngram).tolist()), set(shingles(b, ngram).tolist())
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0


class UnionFind:
    """Disjoint sets over hashable, mutually comparable items.

    The root of each set is its smallest item: `union` always hangs the larger root under
    the smaller. With items like (file_index, line), "keep the first occurrence in corpus
    order" is "keep the root". Path halving keeps `find` near constant time; union by rank is
    given up for the min-root rule, which still leaves it O(log n) amortised."""

    def __init__(self):
        self._parent: dict = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __contains__(self, item) -> bool:
        return item in self._parent

    def find(self, item):
        """The smallest item of `item`'s set; an unseen item becomes a set of its own."""
        parent = self._parent
        if item not in parent:
            parent[item] = item
            return item
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, x, y):
        """Merge the sets of x and y; returns the merged set's root (its smallest item)."""
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return rx
        if ry < rx:
            rx, ry = ry, rx
        self._parent[ry] = rx
        return rx

    def groups(self) -> list[list]:
        """Every set as a sorted list (so the representative, the smallest, comes first),
        ordered by representative. Singletons included."""
        by_root: dict = {}
        for item in self._parent:
            by_root.setdefault(self.find(item), []).append(item)
        return [sorted(members) for _, members in sorted(by_root.items(), key=lambda kv: kv[0])]
