"""The progress bar of long stages: a line redrawn in place on a terminal, plain lines in a log,
and how far `prepare` is through its corpus."""

import functools
import io
import json
import re

import pyarrow as pa

from raylm import data
from raylm.config import load_config
from raylm.progress import Progress
from raylm.storage import FileInfo


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_bar_redraws_one_line_and_clears_it():
    out, logged = Terminal(), []
    p = Progress("data", total=10e6, unit="MB", scale=1e6, log=logged.append, stream=out, every_s=0)
    p.t0 -= 10.0  # started 10 s ago: 5 MB done by now leaves 10 s at that rate
    p.update(2.5e6, "12 docs")
    p.update(5e6, "30 docs")
    p.update(9.995e6)  # about 5 ms to go: no "0s left"
    p.close()
    text = out.getvalue()
    assert logged == []  # the bar never goes through the log
    assert "\n" not in text  # one line, redrawn in place
    frames = [f for f in text.split("\r\x1b[K") if f]
    assert frames[0].startswith("data |######.") and " 25% 2.5/10.0 MB" in frames[0] and "12 docs" in frames[0]
    assert " 50% 5.0/10.0 MB" in frames[1] and "10s left" in frames[1] and "0.5 MB/s" in frames[1]
    assert "100% 10.0/10.0 MB" in frames[2] and "left" not in frames[2]
    assert text.endswith("\r\x1b[K")  # cleared: the stage's summary line takes its place


def test_log_gets_plain_lines_at_most_every_interval():
    out, logged = io.StringIO(), []
    p = Progress("data", total=4.0, log=logged.append, stream=out)  # not a terminal: every 5 s
    p.update(1.0)
    p.update(2.0)
    assert logged == [] and out.getvalue() == ""
    p.every_s = 0
    p.update(3.0, "note")
    p.close()
    assert len(logged) == 1 and logged[0].startswith("data  75% 3.0/4.0") and logged[0].endswith("note")
    assert "|" not in logged[0] and out.getvalue() == ""


def test_unknown_total_shows_counts_and_rate_only():
    p = Progress("read", total=None, unit="docs", log=lambda s: None, stream=io.StringIO())
    p.done = 120
    line = p.line()
    assert line.startswith("read 120 docs") and "docs/s" in line and "%" not in line and "left" not in line


def batch(rows):
    """(file index, chars) rows as the document stream delivers them."""
    return pa.table({"file": [f for f, _ in rows], "chars": [c for _, c in rows]})


def test_corpus_progress_counts_finished_files_and_the_current_plain_one():
    files = [FileInfo("/c/a.jsonl", 100, "x"), FileInfo("/c/b.jsonl.gz", 50, "x"),
             FileInfo("/c/c.jsonl", 200, "x"), FileInfo("/c/d.parquet", 70, "x")]
    cp = data.CorpusProgress(files)
    assert cp.observe(batch([(0, 30), (0, 40)])) == 70  # plain: characters stand for bytes
    assert cp.observe(batch([(0, 60)])) == 100  # never past the file's size
    assert cp.observe(batch([(1, 500)])) == 100  # gzip: counts only once the stream moves past it
    assert cp.observe(batch([(1, 10), (2, 20)])) == 150 + 20
    assert cp.observe(batch([(3, 9)])) == 350
    assert cp.observe(batch([])) == 350
    assert cp.observe(batch([(2, 1)])) == 350  # a late row of an earlier file changes nothing


def test_prepare_in_process_logs_the_progress_of_both_passes_and_the_summary(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        with open(corpus / f"part{i}.jsonl", "w") as f:
            for j in range(60):
                f.write(json.dumps({"text": f"document {i}-{j}: " + "some words here " * (10 + j % 7)}) + "\n")
    from raylm.tokenizer import train_tokenizer

    cfg = load_config(overrides=[f"data.path={corpus}", "data.seq_len=32", "data.dedup=near",
                                 "data.val_fraction=0.1", "data.redact_pii=[]"]).data
    tok = train_tokenizer([(corpus / "part0.jsonl").read_text()], str(tmp_path / "tok"), vocab_size=300)
    logged = []
    monkeypatch.setattr(data, "Progress", functools.partial(Progress, every_s=0))  # a line per batch
    manifest = data.prepare(cfg, tok, str(tmp_path / "out"), seed=0, log=logged.append)
    assert manifest["train"]["blocks"] > 0
    assert any(line.startswith("data: read 180 documents") for line in logged)  # the summary, once
    assert not any("\r" in line for line in logged)  # a log gets no terminal control characters
    shown = [line for line in logged if line.startswith("data: tokenizing")]
    percents = [int(re.search(r" (\d+)% ", line).group(1)) for line in shown]
    assert len(shown) == 3 and percents == sorted(percents) and percents[-1] >= 60  # one per file, rising
    assert all("docs" in line and "M tokens" in line for line in shown)
    hashing = [line for line in logged if line.startswith("data: hashing for de-duplication")]
    assert len(hashing) == 3 and "%" in hashing[-1]  # the first pass shows its progress too
    assert logged.index(hashing[-1]) < logged.index(shown[0])
