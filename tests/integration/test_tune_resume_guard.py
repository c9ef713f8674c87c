"""`raylm tune --resume` checks a search's Tune state before Tune unpickles it.

A copy of the session's tiny finished 2-trial search (tests.tune_search): its real Tune
state passes the check and the search resumes; the same search with a planted `tuner.pkl` is refused by
the real `raylm tune --resume` entry in one line naming the file, and its payload, which
would create a marker file, never runs.
"""

from __future__ import annotations

import os
import pickle
import shlex
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def search(finished_search, tmp_path):
    """A copy of the session's finished 2-trial search (tests.tune_search): (its config, the
    storage directory it is in)."""
    from raylm.config import load_config

    cfg = finished_search[0]
    shutil.copytree(cfg.run_dir, tmp_path / "copy" / cfg.name)
    return load_config(overrides=[f"storage={tmp_path / 'copy'}", f"name={cfg.name}"]), tmp_path / "copy"


def test_a_real_search_state_passes_the_check_and_resumes(search):
    from raylm import tune
    from raylm.tune_state import check_search_state, state_files

    cfg, _ = search
    kinds = sorted({os.path.basename(u).split("-")[0] for u, _ in state_files(cfg.run_dir)})
    assert kinds == ["basic", "experiment_state", "tuner.pkl"], kinds  # what Tune saved, every file checked
    check_search_state(cfg.run_dir)
    summary = tune.resume(cfg, log=lambda *_: None)
    assert summary["trials"] == 2 and not summary["errors"], summary


class Touch:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_a_planted_tuner_pkl_is_refused_by_raylm_tune_resume(search, tmp_path):
    import ray

    cfg, root = search
    storage_dir = tmp_path / "searches"
    shutil.copytree(cfg.run_dir, storage_dir / cfg.name)
    marker = tmp_path / "pwned"
    planted = storage_dir / cfg.name / "tuner.pkl"
    planted.write_bytes(pickle.dumps(Touch(marker), protocol=4))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-m", "raylm.cli", "tune", "--resume", f"name={cfg.name}",
                          f"storage={storage_dir}"], env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), "the planted tuner.pkl ran its payload"
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-4000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("raylm: error:")]
    assert errors and "Traceback" not in out.stderr, out.stderr[-4000:]
    assert f"{planted}: refuses to unpickle posix.system" in errors[0], errors
