"""`raylm tune --resume` checks the data of a search's Tune state, not only its pickles.

Tune's restore takes an experiment state's data as it is: the controller's and each trial's
attributes (updated from whatever keys the JSON holds), each trial's config (the trial's
overrides of the base config: any key, data.path and s3.endpoint_url included), its storage's
trial folder (joined to the experiment's: an absolute or `..` name puts Tune's files
anywhere), its log files (appended to, at any path). One tiny finished search (the
session's, tests.tune_search) ran on this session's cluster; each test changes a copy of its
state as someone who can write the search's directory could, with pickles that pass the opcode
check, and resumes it: refused in one line naming the file and field, and nothing is written
outside the search.
"""

from __future__ import annotations

import binascii
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.tune_search import SPACE

pytestmark = pytest.mark.integration


@pytest.fixture
def search(finished_search):
    """The session's finished 2-trial search (tests.tune_search): its config."""
    return finished_search[0]


class Copy:
    """A copy of the search under tmp_path, its experiment state's data open for change."""

    def __init__(self, cfg, tmp_path):
        from raylm.config import load_config

        shutil.copytree(cfg.run_dir, tmp_path / "searches" / cfg.name)
        self.cfg = load_config(overrides=[f"storage={tmp_path / 'searches'}", f"name={cfg.name}"])
        [self.path] = glob.glob(os.path.join(self.cfg.run_dir, "experiment_state-*.json"))
        self.doc = json.load(open(self.path))
        self.trials = [json.loads(t) for t, _ in self.doc["trial_data"]]
        trial = self.trials[1]
        self.trial_id = trial["trial_id"]
        self.record = os.path.join(self.cfg.run_dir, "runs", self.trial_id, "record.json")
        self.created = json.load(open(self.record))["created"]
        trial["status"] = "PENDING"  # to be run again by the resume

    def storage(self, **changes) -> None:
        """Trial 1's StorageContext with `changes`, pickled again (as cloudpickle writes it)."""
        from ray import cloudpickle

        blob = self.trials[1]["storage"]
        ctx = cloudpickle.loads(binascii.unhexlify(blob["value"]))
        for k, v in changes.items():
            setattr(ctx, k, v)
        blob["value"] = binascii.hexlify(cloudpickle.dumps(ctx)).decode()

    def save(self) -> None:
        for i, trial in enumerate(self.trials):
            self.doc["trial_data"][i][0] = json.dumps(trial, indent=2)
        with open(self.path, "w") as f:
            json.dump(self.doc, f)

    def resume(self, error, match: str):
        from raylm import tune

        self.save()
        with pytest.raises(error) as e:
            tune.resume(self.cfg, log=lambda *_: None)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(self.path) and match in msg, msg
        assert json.load(open(self.record))["created"] == self.created, "the trial ran again"
        return msg


@pytest.mark.parametrize("config, match", [
    ({"train.lr": 0.002, "data.path": "/elsewhere"},
     "trial_data[1] config: data.path is not a key of the search space"),
    ({"train.lr": 0.002, "s3.endpoint_url": "http://127.0.0.1:9"}, "s3.endpoint_url is not a key of the search space"),
    ({"train.lr": 0.5}, "trial_data[1] config: train.lr=0.5 is not a value of loguniform(0.001, 0.01)"),
    ({"train.lr": "0.002"}, "train.lr='0.002' is not a value of"),
    ({}, "trial_data[1] config: train.lr is missing; a key of the search space"),
])
def test_a_trial_config_the_space_does_not_draw_is_refused(search, tmp_path, config, match):
    """The trial ran on its restored config, keys the space cannot search included: the
    finished trial's record was rewritten with them, on another endpoint's S3."""
    from raylm.config import ConfigError

    c = Copy(search, tmp_path)
    c.trials[1]["config"] = config
    c.resume(ConfigError, match)


@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_a_trial_folder_outside_the_experiment_is_refused(search, tmp_path, where):
    """Tune joins the trial's folder name to the experiment's (and its driver staging
    directory): it made that folder and wrote params.json, params.pkl and result.json there."""
    from raylm.tune_state import UnsafeTuneStateError

    c = Copy(search, tmp_path)
    outside = tmp_path / "outside"
    name = str(outside) if where == "absolute" else "../../outside"
    c.storage(trial_dir_name=name)
    c.resume(UnsafeTuneStateError, f"trial_data[1] storage: trial_dir_name={name!r} (not one folder")
    assert not outside.exists()


def test_a_trial_log_file_anywhere_is_refused(search, tmp_path):
    """Tune appends a trial's output to log_to_file, joined to its folder (so any absolute path)."""
    from raylm.tune_state import UnsafeTuneStateError

    c = Copy(search, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    c.trials[1]["log_to_file"] = [str(victim), None]
    c.resume(UnsafeTuneStateError, f"trial_data[1]: log_to_file=[{str(victim)!r}, None]")
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("trial_id", ["..", "a/b", "x" * 65, "another's"])
def test_a_trial_id_that_is_not_a_plain_name_is_refused(search, tmp_path, trial_id):
    """The trial's id is its run's name under runs/; trial 0's made trial 1 train on in its run."""
    from raylm.tune_state import UnsafeTuneStateError

    c = Copy(search, tmp_path)
    if trial_id == "another's":
        trial_id = c.trials[0]["trial_id"]
        what = "a second time"
    else:
        what = "(not one plain name)"
    c.trials[1]["trial_id"] = trial_id
    c.resume(UnsafeTuneStateError, f"trial_data[1]: trial_id={trial_id!r} {what}")


def test_a_controller_attribute_the_search_never_saves_is_refused_by_the_cli(search, tmp_path):
    """The controller's saved data updates its __dict__: a `_storage` there (a StorageContext,
    whose pickle passes) had Tune write the search's state and trial folders under another
    storage path (or filesystem)."""
    import ray
    from ray import cloudpickle

    c = Copy(search, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    ctx = cloudpickle.loads(binascii.unhexlify(c.trials[1]["storage"]["value"]))
    ctx.storage_fs_path = str(elsewhere)
    c.doc["runner_data"]["_storage"] = {"_type": "CLOUDPICKLE_FALLBACK",
                                        "value": binascii.hexlify(cloudpickle.dumps(ctx)).decode()}
    c.save()
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    out = subprocess.run([sys.executable, "-m", "raylm.cli", "tune", "--resume", f"name={c.cfg.name}",
                          f"storage={c.cfg.storage}"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-4000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("raylm: error:")]
    assert errors and "Traceback" not in out.stderr, out.stderr[-4000:]
    assert f"{c.path}: runner_data '_storage' (sets the controller's own attribute)" in errors[0], errors
    assert not elsewhere.exists()
    assert json.load(open(c.record))["created"] == c.created


def test_a_saved_space_with_a_key_no_search_may_vary_is_refused(search, tmp_path):
    """search.json's space is what the trials' configs are checked against: checked on
    resume as a new search's space is (here a search whose Tune state is gone, which a resume
    starts from the saved space)."""
    from raylm import tune
    from raylm.config import ConfigError

    c = Copy(search, tmp_path)
    for f in glob.glob(os.path.join(c.cfg.run_dir, "*.pkl")) + glob.glob(os.path.join(c.cfg.run_dir, "*-state-*.json")):
        os.remove(f)
    uri = os.path.join(c.cfg.run_dir, "search.json")
    state = json.load(open(uri))
    state["space_text"] = SPACE.replace("train.lr: loguniform(1.0e-3, 1.0e-2)", "data.path: choice(['/elsewhere'])")
    with open(uri, "w") as f:
        json.dump(state, f)
    with pytest.raises(ConfigError, match=rf"^--resume: {uri}: space_text: data.path cannot be searched"):
        tune.resume(c.cfg, log=lambda *_: None)
    assert json.load(open(c.record))["created"] == c.created


def test_a_real_state_with_an_unstarted_trial_passes_and_resumes(search, tmp_path):
    """A trial Tune added but had not started is saved without a folder: the check lets it
    through, and the resume runs it, its config checked again as it starts."""
    from raylm import tune
    from raylm.tune_state import check_search_state

    c = Copy(search, tmp_path)
    c.trials[1]["relative_logdir"] = None
    c.storage(trial_dir_name=None)
    c.save()
    check_search_state(c.cfg.run_dir)
    lines = []
    summary = tune.resume(c.cfg, log=lines.append)
    assert summary["trials"] == 2 and not summary["errors"], (summary, lines)
    assert json.load(open(c.record))["created"] != c.created, "the unfinished trial was not run"
