"""A learning-rate sweep (raylm.mup_sweep, benchmarks/mup_transfer.py) refuses settings under
which it would run but not measure what it reports: a width that changes the head size, a
repeated width, no held-out batch (every rate scored a perfect 0.0), a rate with no log2."""

import os
import subprocess
import sys

import pytest

from raylm.errors import ConfigError
from raylm.mup_sweep import SweepConfig, batches, markov_tokens, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(widths=(16, 32), lrs=(0.01, 0.1), vocab_size=16, n_layers=1, seq_len=8, batch_size=2, steps=2,
            warmup_steps=0)


@pytest.mark.parametrize("change, named", [
    ({"widths": (24, 48)}, "width 24"),  # heads of 24, then 3 of 16: the head size changed silently
    ({"widths": (20, 40)}, "width 20"),  # one head of 20, then two: not head_dim=16 at all
    ({"widths": (32, 32)}, "widths=(32, 32)"),  # one row replaced the other; the benchmark then crashed
    ({"widths": (32, 16)}, "ascending"),
    ({"widths": (8, 16)}, "width 8"),  # no head at all
    ({"widths": (32,)}, "two or more"),
    ({"lrs": (0.0, 0.1)}, "> 0"),  # log2(0): a math domain error after the whole sweep
    ({"lrs": (-1.0, 0.1)}, "> 0"),
    ({"lrs": (float("nan"), 0.1)}, "> 0"),
    ({"lrs": ()}, "one or more"),
    ({"lrs": (0.1, 0.01)}, "ascending"),
    ({"steps": 0}, "steps=0"),  # every rate scored the initial model
    ({"vocab_size": 0}, "vocab_size=0"),
    ({"warmup_steps": 5}, "warmup_steps=5"),
])
def test_settings_that_cannot_measure_transfer_are_refused(change, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        SweepConfig(**{**TINY, **change})


def test_no_held_out_batch_is_refused_not_scored_zero():
    cfg = SweepConfig(**TINY)
    tokens = markov_tokens(cfg.vocab_size, 2, 4 * cfg.batch_size * (cfg.seq_len + 1), seed=0)
    with pytest.raises(ConfigError, match="0 batches"):
        batches(tokens, cfg, 0)
    train = batches(tokens, cfg, 2)
    with pytest.raises(ConfigError, match="held-out"):
        sweep(cfg, train, [])
    with pytest.raises(ConfigError, match="need 90 tokens, got 72"):  # too short a corpus: named, a ValueError still
        batches(tokens, cfg, 5)


def test_the_benchmark_refuses_a_width_that_changes_the_head_size():
    """It ran and reported a 'transfer' between models whose heads differed (24 vs 16)."""
    proc = subprocess.run([sys.executable, "benchmarks/mup_transfer.py", "--corpus", "markov", "--vocab", "16",
                           "--seq", "8", "--steps", "2", "--val-batches", "1", "--batch", "2", "--layers", "1",
                           "--widths", "24", "48", "--lrs", "0.01", "0.1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0 and proc.stdout == "", proc.stdout
    assert "head_dim=16" in proc.stderr
