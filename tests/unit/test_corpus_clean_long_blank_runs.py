"""Cleaning a document with a long run of spaces inside a line stays linear in its length."""

from __future__ import annotations

from raylm.documents import _TRAILING, clean_text


def test_trailing_blank_pattern_never_starts_inside_a_run():
    """The defect: the trailing-whitespace pattern was tried at every position of a run of
    spaces; where the run ended in a word, each try read the rest of the run and failed, so a
    document with 160,000 spaces in a row and one trailing space somewhere took 5 minutes to
    clean (a 1 MB run, hours), stalling `data prepare`. A match may only start at a run's
    first blank: that makes the scan one pass over each run."""
    text = "a" + " " * 50 + "b  \n  \t\nc \t"
    for pos, ch in enumerate(text):
        if ch in " \t" and text[pos - 1] in " \t":
            assert _TRAILING.match(text, pos) is None, pos
    # Runs at a line's end or the text's end still match whole from their first blank.
    assert _TRAILING.match(text, text.index("b") + 1).group() == "  "
    assert _TRAILING.match(text, len(text) - 2).group() == " \t"


def test_long_inner_runs_are_kept_and_trailing_ones_removed():
    run = " " * 5000
    text = f"x{run}y \nz{run}\n{run}w\t\t"
    assert clean_text(text) == f"x{run}y\nz\n{run}w"
