"""A damaged spike-rollback marker (`rollback.json`, which raylm writes whole: hand edits or a
bad disk) stops a resume with one line naming it, not a traceback from inside the loop."""

import pytest

from raylm.config import load_config
from raylm.errors import CheckpointError
from raylm.train import ROLLBACK, train_local
from tests.unit.test_train_local import OVERRIDES, blocks


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"checkpoint": "ckpt-00000003"}', b"\xff\xfe"],
                         ids=["not-json", "not-an-object", "no-consumed-blocks", "not-utf8"])
def test_a_damaged_rollback_marker_is_one_line_naming_it(tmp_path, text):
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=r", "train.max_steps=3", "train.async_checkpoint=false",
                                 *OVERRIDES])
    train, val = blocks(40, 0), blocks(8, 1)
    train_local(cfg, train, val, log=lambda *_: None)
    marker = tmp_path / "r" / ROLLBACK
    marker.write_bytes(text if isinstance(text, bytes) else text.encode())
    more = load_config(overrides=[f"storage={tmp_path}", "name=r", "train.max_steps=4", "train.async_checkpoint=false",
                                  *OVERRIDES])
    with pytest.raises(CheckpointError, match=f"^{marker}: damaged .*remove it to resume") as e:
        train_local(more, train, val, resume="must", log=lambda *_: None)
    assert "\n" not in str(e.value)
