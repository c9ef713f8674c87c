"""`raylm tune --resume` of a finished search reports results from the trials Tune's restored
state holds: a state changed by someone who can write the search's directory (JSON only, no
pickle touched, every check on the pickles and trial data passed) had raylm report a config
that no trial trained, and write it to best.yaml. The session's tiny finished
search (tests.tune_search) is copied by each test, which changes the copy's state and resumes it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def search(finished_search):
    """The session's finished 2-trial search (tests.tune_search): its config and summary."""
    return finished_search


class Copy:
    """A copy of the finished search under tmp_path, its experiment state's JSON open for change."""

    def __init__(self, search, tmp_path):
        from raylm.config import load_config

        cfg, self.summary = search
        shutil.copytree(cfg.run_dir, tmp_path / "searches" / cfg.name)
        self.cfg = load_config(overrides=[f"storage={tmp_path / 'searches'}", f"name={cfg.name}"])
        [self.path] = glob.glob(os.path.join(self.cfg.run_dir, "experiment_state-*.json"))
        self.doc = json.load(open(self.path))
        self.trials = [json.loads(t) for t, _ in self.doc["trial_data"]]
        self.meta = [json.loads(m) for _, m in self.doc["trial_data"]]
        self.best = next(i for i, t in enumerate(self.trials) if t["trial_id"] == self.summary["best_trial"])

    def save(self) -> None:
        self.doc["trial_data"] = [[json.dumps(t, indent=2), json.dumps(m, indent=2)]
                                  for t, m in zip(self.trials, self.meta)]
        with open(self.path, "w") as f:
            json.dump(self.doc, f)

    def resume(self):
        from raylm import tune
        from raylm.errors import UserError

        self.save()
        with pytest.raises(UserError) as e:  # ConfigError and UnsafeTuneStateError are UserErrors
            tune.resume(self.cfg, log=lambda *_: None)
        return str(e.value)


def _best_yaml(c: Copy) -> str:
    """best.yaml and results.csv as they stand."""
    return "".join(open(os.path.join(c.cfg.run_dir, n)).read() for n in ("best.yaml", "results.csv"))


def test_a_reported_config_no_trial_trained_is_refused(search, tmp_path):
    """The best trial's reported config (its last result's "config", in the state's run
    metadata, which no check read) went into results.csv and best.yaml as it stood: a key the
    space cannot search (data.path) and a learning rate that trial never trained with."""
    c = Copy(search, tmp_path)
    before = _best_yaml(c)
    forged = {"train.lr": 0.0099, "data.path": "/elsewhere"}
    c.meta[c.best]["last_result"]["config"] = forged
    msg = c.resume()
    assert "\n" not in msg and "config" in msg, msg
    assert _best_yaml(c) == before and "/elsewhere" not in _best_yaml(c)


def test_a_trial_added_to_the_state_is_refused(search, tmp_path):
    """A trial added to the state (a new id, a config the space draws, the best trial's folder
    so its reported history) was ranked with that history and its config, never trained,
    could be best.yaml."""
    c = Copy(search, tmp_path)
    before = _best_yaml(c)
    ghost = json.loads(json.dumps(c.trials[c.best]))
    ghost["trial_id"] = ghost["trial_id"][:-5] + "00099"
    ghost["config"] = {"train.lr": 0.0011}
    meta = json.loads(json.dumps(c.meta[c.best]))
    meta["last_result"].update(trial_id=ghost["trial_id"], config=ghost["config"])
    c.trials.insert(0, ghost)
    c.meta.insert(0, meta)
    msg = c.resume()
    assert "\n" not in msg and ghost["trial_id"] in msg and "own folder" in msg, msg
    assert _best_yaml(c) == before and "0.0011" not in _best_yaml(c)


def test_a_trial_added_with_a_folder_of_its_own_is_refused(search, tmp_path):
    """As above, the best trial's folder copied to one named for the added trial: every check
    of the state passes, and no run of the search trained it (no record under runs/)."""
    import binascii

    from ray import cloudpickle

    c = Copy(search, tmp_path)
    before = _best_yaml(c)
    ghost = json.loads(json.dumps(c.trials[c.best]))
    real_id, ghost["trial_id"] = ghost["trial_id"], ghost["trial_id"][:-5] + "00099"
    ghost["config"] = {"train.lr": 0.0011}
    folder = ghost["relative_logdir"].replace(real_id, ghost["trial_id"])
    shutil.copytree(os.path.join(c.cfg.run_dir, ghost["relative_logdir"]), os.path.join(c.cfg.run_dir, folder))
    ghost["relative_logdir"] = folder
    ctx = cloudpickle.loads(binascii.unhexlify(ghost["storage"]["value"]))
    ctx.trial_dir_name = folder
    ghost["storage"]["value"] = binascii.hexlify(cloudpickle.dumps(ctx)).decode()
    meta = json.loads(json.dumps(c.meta[c.best]))
    meta["last_result"].update(trial_id=ghost["trial_id"], config=ghost["config"])
    c.trials.insert(0, ghost)
    c.meta.insert(0, meta)
    msg = c.resume()
    assert "\n" not in msg and f"trial {ghost['trial_id']} reported val_loss" in msg and "record" in msg, msg
    assert _best_yaml(c) == before and "0.0011" not in _best_yaml(c)


def test_the_untouched_state_resumes_and_reports_as_before(search, tmp_path):
    """The checks pass on a search's own state and runs: the resumed report is the search's."""
    from raylm import tune

    c = Copy(search, tmp_path)
    summary = tune.resume(c.cfg, log=lambda *_: None)
    assert summary["best_trial"] == c.summary["best_trial"] and summary["best_params"] == c.summary["best_params"]
    assert summary["trials"] == 2 and not summary["errors"], summary
