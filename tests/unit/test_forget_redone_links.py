"""A run started over (or resumed from an earlier checkpoint) removes its report and the eval
results of the checkpoints it trains again (raylm.pipeline.forget_redone), never through a
link planted in the run directory: `<run>/report` linked elsewhere had the figure where the
link pointed removed. (A linked `<run>/eval/ckpt-N` is no checkpoint's results: left alone.)"""

import os

from raylm.config import load_config
from raylm.pipeline import forget_redone


def test_links_in_the_run_go_and_what_they_name_stays(tmp_path):
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=run"])
    run, other = tmp_path / "run", tmp_path / "elsewhere"
    (run / "eval").mkdir(parents=True)
    other.mkdir()
    for name in ("report.png", "results.md", "results.json"):
        (other / name).write_bytes(b"theirs")
    os.symlink(other, run / "report")
    os.symlink(other, run / "eval" / "ckpt-00000005")
    forget_redone(cfg, 0)
    assert sorted(p.name for p in other.iterdir()) == ["report.png", "results.json", "results.md"]
    assert not os.path.lexists(run / "report")
