"""`raylm tune --resume` has Ray Tune unpickle exactly the bytes raylm checked.

raylm checks every file of the search's Tune state (`raylm.tune_state.check_search_state`)
and then `Tuner.restore` and the resumed controller read them again themselves: a file
swapped in the search's storage between the two reads, or a newer one added, was unpickled
unchecked (a planted pickle runs code). Here every state file is swapped for one whose pickle
writes a marker file when loaded, and newer state files are added, right after the check
returns and before Ray reads anything: no marker may appear, and the resume runs on the
checked state, its trial and Tune's new state landing in the search's own storage.
"""

from __future__ import annotations

import json
import pickle
import uuid

import pytest

from raylm import storage
from tests.integration.test_tune import prepared  # noqa: F401 - the search's data, as test_tune's
from tests.tune_search import SCHEDULE, SPACE  # the 2-trial search of the other Tune tests
from tests.small import SMALL

pytestmark = pytest.mark.integration

# Newer than any a search saves (Ray loads the newest by name): the check never saw them.
ADDED = ["experiment_state-9999-12-31_23-59-59.json", "basic-variant-state-9999-12-31_23-59-59.json",
         "callback-states-9999-12-31_23-59-59.pkl", "searcher-state-9999-12-31_23-59-59.pkl"]


class Planted:
    """Unpickled, it opens its path for writing: a marker file appears (any code could run)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _planted(kind: str, marker: str) -> bytes:
    blob = pickle.dumps(Planted(marker))
    if kind == "pickle":
        return blob
    return json.dumps({"runner_data": {"_iteration": {"_type": "CLOUDPICKLE_FALLBACK", "value": blob.hex()}},
                       "trial_data": []}).encode()


@pytest.fixture
def where(request):
    """On S3 only, where a search's storage is most often shared (a local resume goes through
    the same filesystem in test_tune.py, and tests/unit/test_tune_checked_bytes.py reads it on
    both): each run of this test is a whole search and its resume."""
    server = request.getfixturevalue("s3_server")
    prefix = f"checked-bytes-{uuid.uuid4().hex[:8]}"
    yield f"s3://{server.bucket}/{prefix}"
    server.delete_prefix(prefix + "/")


def test_state_swapped_after_the_check_is_not_unpickled(prepared, where, tmp_path, monkeypatch):
    from raylm import tune, tune_state
    from raylm.config import load_config

    base, data_dir, _ = prepared
    (tmp_path / "space.yaml").write_text(SPACE)
    cfg = load_config(overrides=[f"storage={where}", "name=swapped", f"tokenizer.path={base.tokenizer.path}",
                                 *SMALL, *SCHEDULE, ("data.path", data_dir)])
    summary = tune.tune(cfg, str(tmp_path / "space.yaml"), log=lambda *_: None)
    assert summary["trials"] == 2 and not summary["errors"], summary

    # Trial 1 left unfinished, so that the resume runs it.
    [(state_uri, _)] = [f for f in tune_state.state_files(cfg.run_dir, cfg.s3) if f[1] == "experiment"]
    doc = json.loads(storage.read_text(state_uri, cfg.s3))
    trial = json.loads(doc["trial_data"][1][0])
    trial["status"] = "PENDING"
    doc["trial_data"][1][0] = json.dumps(trial)
    storage.write_text(state_uri, json.dumps(doc), cfg.s3)
    record = storage.join(cfg.run_dir, "runs", trial["trial_id"], "record.json")
    created = json.loads(storage.read_text(record, cfg.s3))["created"]

    markers = tmp_path / "markers"
    markers.mkdir()
    original, planted = {}, {}
    check = tune_state.check_search_state

    def check_then_swap(*args, **kwargs):
        out = check(*args, **kwargs)
        files = tune_state.state_files(cfg.run_dir, cfg.s3)
        assert len(files) >= 3, files  # tuner.pkl, the experiment state, the searcher's and callbacks' state
        for uri, kind in files + [(storage.join(cfg.run_dir, n), "experiment" if n.endswith(".json") else "pickle")
                                  for n in ADDED]:
            name = storage.relative(uri, cfg.run_dir)
            if storage.exists(uri, cfg.s3):
                original[uri] = storage.read_bytes(uri, cfg.s3)
            planted[uri] = _planted(kind, str(markers / name))
            storage.write_bytes(uri, planted[uri], cfg.s3)
        return out

    monkeypatch.setattr(tune_state, "check_search_state", check_then_swap)
    try:
        summary = tune.resume(cfg, log=lambda *_: None)
    except Exception as e:  # the old code: Ray failed on what the planted pickle returned
        summary = e
    assert planted, "the check was not called"
    assert not list(markers.iterdir()), f"unpickled unchecked: {sorted(p.name for p in markers.iterdir())}"
    assert isinstance(summary, dict) and summary["trials"] == 2 and not summary["errors"], summary
    assert json.loads(storage.read_text(record, cfg.s3))["created"] != created, "the unfinished trial did not run"

    # Tune's state of the resumed search is in the storage (not only served from the checked
    # bytes): put back what was planted and not rewritten since, drop what was added, and the
    # next resume's check passes it, the filesystem the trials and Tune's state pickle included.
    for uri, data in planted.items():
        if storage.exists(uri, cfg.s3) and storage.read_bytes(uri, cfg.s3) == data:
            if uri in original:
                storage.write_bytes(uri, original[uri], cfg.s3)
            else:
                storage.delete(uri, cfg.s3)
    check(cfg.run_dir, cfg.s3)
    states = [json.loads(storage.read_text(u, cfg.s3)) for u, k in tune_state.state_files(cfg.run_dir, cfg.s3)
              if k == "experiment"]
    statuses = [[json.loads(t)["status"] for t, _ in s["trial_data"]] for s in states]
    assert ["TERMINATED", "TERMINATED"] in statuses, statuses
