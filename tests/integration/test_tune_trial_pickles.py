"""A failed trial's `error.pkl` in the search's storage is never unpickled by the driver.

When a trial fails, Tune writes the exception, pickled, to `error.pkl` in the trial's folder
and uploads it to the search's storage; as `tuner.fit()` returns, its ResultGrid reads the
error of every trial that did not finish back from the storage and unpickles it
(`Trial.get_pickled_error`). A file written there after Tune's last upload (anyone who can
write the search's storage) was unpickled in the driver, on a new search and on `--resume`
alike. Here a trial fails (train.timeout_s of a microsecond) and, from the moment its error
reaches the storage, its `error.pkl` is replaced again and again by a pickle that writes a
marker file when loaded: no marker may appear, and the trial is still reported as failed.
"""

from __future__ import annotations

import csv
import pickle
import subprocess
import sys

import pytest

from raylm import storage
from tests.integration.test_tune import prepared  # noqa: F401 - the search's data, as test_tune's
from tests.integration.test_tune_checked_bytes_resume import Planted
from tests.small import SMALL

pytestmark = pytest.mark.integration

# One trial, which fails at its first step (every step takes longer than a microsecond).
SPACE = """\
train.timeout_s: 1.0e-6
tune: {scheduler: fifo, search: random, max_concurrent_trials: 1, num_samples: 1}
"""
SCHEDULE = ["train.num_workers=1", "train.max_steps=4", "train.eval_every=2", "train.log_every=1",
            "train.ckpt_every=100", "train.timeout_s=300"]


# Another process (the driver's own threads wait for its GIL): once a trial's error reaches
# the search's storage (its error.txt), it keeps replacing that trial folder's error.pkl, whole.
PLANTER = """\
import os, sys, time
search_dir, blob, planted = sys.argv[1], bytes.fromhex(sys.argv[2]), set()
while True:
    for entry in os.scandir(search_dir) if os.path.isdir(search_dir) else []:
        if entry.is_dir() and os.path.exists(os.path.join(entry.path, "error.txt")):
            with open(os.path.join(entry.path, ".planted"), "wb") as f:
                f.write(blob)
            os.replace(os.path.join(entry.path, ".planted"), os.path.join(entry.path, "error.pkl"))
            if entry.name not in planted:
                planted.add(entry.name)
                print(entry.name, flush=True)
    time.sleep(0.0005)
"""


class Planter:
    def __init__(self, search_dir: str, marker: str, out):
        self.args = [sys.executable, "-c", PLANTER, search_dir, pickle.dumps(Planted(marker)).hex()]
        self.out = out

    def __enter__(self):
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(self.args, stdout=out)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        self.planted = open(self.out).read().split()


def test_a_failed_trials_error_pickle_is_not_unpickled(prepared, tmp_path):
    from raylm import tune
    from raylm.config import load_config

    base, data_dir, _ = prepared
    (tmp_path / "space.yaml").write_text(SPACE)
    cfg = load_config(overrides=[f"storage={tmp_path / 'runs'}", "name=failing", *SMALL, *SCHEDULE,
                                 f"tokenizer.path={base.tokenizer.path}", ("data.path", data_dir)])
    unpickled = []
    for run in ("new", "resumed"):  # --resume restarts the failed trial, which fails again
        marker = tmp_path / f"marker-{run}"
        with Planter(cfg.run_dir, str(marker), tmp_path / f"planted-{run}") as planter:
            if run == "new":
                summary = tune.tune(cfg, str(tmp_path / "space.yaml"), log=lambda *_: None)
            else:
                summary = tune.resume(cfg, log=lambda *_: None)
        assert planter.planted, f"{run}: no trial's error reached the storage"
        if marker.exists():
            unpickled.append(run)
        assert summary["trials"] == 1 and len(summary["errors"]) == 1, (run, summary)
        rows = list(csv.DictReader(open(storage.join(cfg.run_dir, "results.csv"))))
        assert [r["status"] for r in rows] == ["error"], rows
    assert not unpickled, f"the driver unpickled a trial's error.pkl from the storage: {unpickled} search"
