"""Long stages say how far they are: bits per byte over a corpus (`raylm eval --corpus`) was
silent until its end, which is minutes to hours for a real model and corpus. Its progress goes
to stderr, never stdout (a command's stdout may be its results). The interval is made 0 here
through the stage's own parameter, so the test does not depend on the clock."""

import io

import pytest

from raylm.config import ModelConfig
from raylm.eval.bpb import bits_per_byte, corpus_bpb
from raylm.model import build_model
from tests.unit.test_bpb_document_mask import ByteTok


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(vocab_size=260, dim=16, n_layers=1, n_heads=1, max_seq_len=16), seed=0)


def test_bpb_logs_progress_lines_as_it_scores(model):
    lines = []
    texts = ["hello world, " * 10, "another document " * 8]  # 130 + 136 bytes: 17 windows of 16
    got = bits_per_byte(model, ByteTok(), texts, seq_len=16, batch_rows=4, log=lines.append, every_s=0)
    assert len(lines) >= 4, lines  # one a batch of windows at interval 0: 5 batches
    assert all(line.startswith("eval: bpb of the corpus") and "tokens/s" in line for line in lines), lines
    assert "%" in lines[0] and "100%" in lines[-1]
    n = len(lines)
    quiet = bits_per_byte(model, ByteTok(), texts, seq_len=16, batch_rows=4, log=lines.append, every_s=3600)
    assert quiet == got and len(lines) == n  # a longer interval: no line in a short stage; results unchanged


def test_bpb_progress_goes_to_stderr_not_stdout(model, tmp_path, capsys):
    path = tmp_path / "c.txt"
    path.write_text("a small corpus to score. " * 20)
    corpus_bpb(model, ByteTok(), str(path), seq_len=16, every_s=0)
    out, err = capsys.readouterr()
    assert out == ""
    assert f"eval: bpb of {path}" in err and "100%" in err


def test_bpb_bar_on_a_terminal_is_cleared(model, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    lines = []
    bits_per_byte(model, ByteTok(), ["bar " * 40], seq_len=16, log=lines.append, every_s=0)
    assert lines == [] and term.getvalue().startswith("\r\x1b[Keval: bpb") and term.getvalue().endswith("\r\x1b[K")


def test_mup_sweep_logs_each_short_run_it_finishes():
    """A row of the muP benchmark (9 rates at width 128) took minutes with no line: the rows'
    callback comes only after all its rates."""
    from raylm.mup_sweep import SweepConfig, batches, markov_tokens, sweep

    cfg = SweepConfig(widths=(16, 32), lrs=(0.01, 0.1), vocab_size=16, n_layers=1, seq_len=8, batch_size=2,
                      steps=2, warmup_steps=0)
    tokens = markov_tokens(16, 2, 3 * 2 * 9, seed=0)
    lines = []
    sweep(cfg, batches(tokens, cfg, 2), batches(tokens, cfg, 1, offset=36), log=lines.append, every_s=0)
    assert len(lines) == 6, lines  # 3 rows trained (muP's base-width row is the standard one) x 2 rates
    assert lines[0].startswith("sweep  17% 1.0/6.0 runs") and lines[0].endswith("none width 16 lr 0.01")
    assert lines[-1].startswith("sweep 100% 6.0/6.0 runs") and lines[-1].endswith("mup width 32 lr 0.1")
