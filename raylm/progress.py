"""Progress of a long stage: a bar redrawn in place on a terminal, a plain line every few
seconds anywhere else (a log file, `ray job logs`, a test's captured output).

    p = Progress("data", total=28.6e6, unit="MB", scale=1e6, log=log)
    for ...:
        p.update(done_bytes, note="1,204 docs")
    p.close()

On a terminal the bar is one line, cut to the terminal's width, redrawn at most every 0.2 s
and cleared by `close`, so the stage's summary line takes its place. A total of None (unknown)
shows counts and a rate without a percentage. `update` costs a clock read when nothing is drawn."""

from __future__ import annotations

import os
import sys
import time

WIDTH = 24  # bar cells: fits an 80-column terminal with the figures beside it


class Progress:
    def __init__(self, label: str, total: float | None = None, *, unit: str = "", scale: float = 1.0,
                 log=print, stream=None, tty: bool | None = None, every_s: float | None = None):
        self.label, self.total, self.unit, self.scale, self.log = label, total, unit, scale, log
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)  # a bare writer (no isatty) is not a terminal
        self.tty = bool(isatty and isatty()) if tty is None else tty
        # A terminal redraws often; a log gets a line every 5 s, as long stages always logged.
        self.every_s = every_s if every_s is not None else (0.2 if self.tty else 5.0)
        self.t0 = self.last = time.time()
        self.done, self.note, self.drawn = 0.0, "", False

    def update(self, done: float, note: str = "") -> None:
        self.done, self.note = done, note
        now = time.time()
        if now - self.last < self.every_s:
            return
        self.last = now
        if self.tty:
            # One screen row at most: "\r" returns to the start of the row the cursor is on, so
            # a line that wrapped would leave its first rows behind at every redraw.
            text, columns = self.line(now, bar=True), self._columns()
            self.stream.write("\r\x1b[K" + (text[:max(1, columns - 1)] if columns else text))
            self.stream.flush()
            self.drawn = True
        else:
            self.log(self.line(now, bar=False))

    def line(self, now: float | None = None, bar: bool = True) -> str:
        now = time.time() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        parts = []
        if self.total:
            frac = min(1.0, self.done / self.total)
            cells = int(frac * WIDTH)
            head = f"{self.label} " + (f"|{'#' * cells}{'.' * (WIDTH - cells)}| " if bar else "")
            parts.append(f"{head}{frac:4.0%} {self._n(self.done)}/{self._n(self.total)} {self.unit}".rstrip())
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            if 0 < frac < 1 and left >= 0.5:  # nothing to say of the last moment
                parts.append(f"{_duration(left)} left")
        else:
            parts.append(f"{self.label} {self._n(self.done)} {self.unit}".rstrip())
        parts.append(f"{self._n(rate)} {self.unit}/s".strip())
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)

    def close(self) -> None:
        """Clear the bar (the caller's summary line follows); off a terminal, nothing to undo."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def _columns(self) -> int | None:
        """The terminal's width: the stream's own, else $COLUMNS; None (no cut) when neither
        says (a stand-in stream with no terminal behind it)."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
            columns = 0
        if columns <= 0:
            env = os.environ.get("COLUMNS", "")
            columns = int(env) if env.isdigit() else 0
        return columns or None

    def _n(self, x: float) -> str:
        v = x / self.scale
        return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def to_stderr(line: str) -> None:
    """A `log` for progress: stderr, flushed (a command's stdout may be its results)."""
    print(line, file=sys.stderr, flush=True)


def _duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


duration = _duration  # "45s", "12m30s", "2h05m": a time left, as the progress lines write it
