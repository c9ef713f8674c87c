"""Stop strings in the engine's streamed text (raylm.serve.engine._TextStream): at every token,
what is sent equals a brute-force reference (the text up to the first stop string, less the
longest tail that could still grow into one), over random streams and repetitive stop strings,
where the hold-back is found through KMP's failure tables."""

import random

from raylm.serve.engine import _TextStream

PIECES = ["a", "b", "ab", "ba", "aa", "bb", "aab", "c", "abc"]


def reference(text: str, sent: int, stops) -> tuple[int, bool]:
    """(end of what may be sent, stopped): every prefix of every stop string tried."""
    hits = [i for i in (text.find(s, sent) for s in stops) if i >= 0]
    if hits:
        return min(hits), True
    end = len(text)
    for s in stops:
        for n in range(min(len(s) - 1, len(text) - sent), 0, -1):
            if text.endswith(s[:n]):
                end = min(end, len(text) - n)
                break
    return end, False


def test_what_is_sent_at_every_token_matches_the_reference():
    rng = random.Random(0)
    decode = lambda ids: "".join(PIECES[i] for i in ids)  # noqa: E731
    for _ in range(3000):
        stops = tuple("".join(rng.choice("abc") for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 4)))
        stream, sent = _TextStream(decode, stops), ""
        for _ in range(rng.randint(1, 40)):
            out, stopped = stream.push(rng.randrange(len(PIECES)))
            end, ref_stopped = reference(stream.text, len(sent), stops)
            assert (sent + out, stopped) == (stream.text[:max(end, len(sent))], ref_stopped), (stops, stream.text)
            sent += out
            if stopped:
                break
        else:
            sent += stream.flush()
            assert sent == stream.text


def test_long_repetitive_stop_strings_hold_back_exactly():
    """A stop string the text keeps almost matching ("aaaa...b" against a run of a's) holds back
    only the part that could still complete it, never text already sent."""
    stops = ("a" * 500 + "b", "ab" * 300 + "c")
    stream = _TextStream(lambda ids: "".join(PIECES[i] for i in ids), stops)
    sent = ""
    for _ in range(700):
        out, stopped = stream.push(0)  # "a"
        sent += out
        assert not stopped and sent == stream.text[:max(0, len(stream.text) - 500)]
    out, stopped = stream.push(1)  # "b": the first stop string completes
    assert stopped and sent + out == "a" * 200
