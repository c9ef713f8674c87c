"""Near-dedup's words keep their combining marks: scripts whose vowels are marks (Devanagari,
Thai, Tamil, ...) are not cut into consonants, and texts that differ only in those marks are
different texts."""

from __future__ import annotations

import itertools
import re
import zlib

import numpy as np

from raylm.dedup import MinHasher, estimated_jaccard, shingles, true_jaccard

CONSONANTS = "कखगघचछजझटठडढतथदधनपफबभमयरलवसह"


def _words(marks: str, n: int = 60) -> list[str]:
    """n distinct two-syllable Devanagari words, each consonant carrying a vowel sign from `marks`."""
    pairs = itertools.islice(itertools.permutations(CONSONANTS, 2), n)
    return [a + marks[0] + b + marks[1] for a, b in pairs]


def test_devanagari_words_are_whole():
    assert shingles("हिन्दी भाषा", ngram=1).shape == (2,)  # two words, not the five consonant runs
    # A mark inside a word is part of it: the word with and without its sign differ.
    assert shingles("किताब", ngram=1)[0] != shingles("कताब", ngram=1)[0]


def test_texts_that_differ_only_in_vowel_signs_are_not_near_duplicates():
    a = " ".join(_words("ाी"))  # -aa ... -ii
    b = " ".join(_words("ुे"))  # -u ... -e: the same consonants, every word another word
    assert a != b
    assert true_jaccard(a, b) == 0.0
    mh = MinHasher()
    assert estimated_jaccard(mh.signature(a), mh.signature(b)) < 0.1
    # A true near-duplicate in the same script still is one: one word in twenty changed.
    words = _words("ाी")
    c = " ".join(w if i % 20 else "नया" for i, w in enumerate(words))
    assert true_jaccard(a, c) > 0.5


def test_marks_do_not_change_other_scripts_words():
    text = "École normale — Straße, naïve café; x_1 y2 привет мир 你好"
    plain = [zlib.crc32(w.encode()) for w in re.findall(r"\w+", text.lower())]  # text without marks: \w runs
    assert len(plain) == 10
    np.testing.assert_array_equal(shingles(text, ngram=1), np.array(plain, dtype=np.uint32))
