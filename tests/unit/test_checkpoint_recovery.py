"""A resume reads the checkpoint's meta.json before it loads a byte of weights: a field of the
wrong type there (a damaged or hand-edited file) is one line naming the file and the field,
where `config.model: 5` failed with AttributeError from the resume check. Behind a commit marker
that records no digests (raylm's before it recorded them), a string step or a list of guards
failed inside training, and a negative data position was resumed from."""

import json

import pytest

from raylm import checkpoint
from raylm.errors import CheckpointError
from tests.unit.test_resume_checks import first, manifest, run  # noqa: F401  (first: a fixture)


@pytest.mark.parametrize("field,value,said,older_marker", [
    # was: AttributeError from check_resumable, whatever the marker (meta.json is read before the load checks it)
    ("config.model", 5, "'config.model' is 5, expected a mapping", False),
    ("config.model", 5, "'config.model' is 5, expected a mapping", True),
    # A marker written before raylm recorded digests does not vouch for meta.json:
    ("step", "3", "'step' is \"3\", expected an integer >= 0", True),  # was: TypeError in training
    ("guards", [], "'guards' is [], expected a mapping", True),  # was: AttributeError
    ("consumed_blocks", -8, "'consumed_blocks' is -8, expected an integer >= 0", True),  # was: resumed there
    # was: "written with train.global_batch_size=8, now 8"
    ("global_batch_size", "8", "'global_batch_size' is \"8\", expected an integer >= 1", True),
])
def test_a_damaged_meta_json_field_is_one_line_naming_it(tmp_path, first, field, value, said,  # noqa: F811
                                                         older_marker):
    path = f"{first}/{checkpoint.META}"
    with open(path) as f:
        meta = json.load(f)
    section, _, key = field.rpartition(".")
    (meta[section] if section else meta)[key] = value
    with open(path, "w") as f:
        json.dump(meta, f)
    if older_marker:
        with open(f"{first}/{checkpoint.COMMIT_MARKER}", "w") as f:
            json.dump({"step": 3}, f)
    with pytest.raises(CheckpointError) as info:
        run(tmp_path, "train.max_steps=4", manifest=manifest())
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(path + ": ") and said in msg, msg


def test_the_fields_raylm_writes_all_read_back(first):  # noqa: F811
    meta = checkpoint.read_meta(first)
    assert {"step", "consumed_blocks", "world_size", "global_batch_size", "train_seconds", "guards", "metrics",
            "config", "tokenizer", "tokenizer_sha256", "data_key"} <= set(meta)
    assert checkpoint.read_meta(first) == meta  # nothing is changed by the checks
