"""raylm's checkpoint readers (SafeReader, RangedReader) keep non-tensor entries weights-only
whatever load planner the caller hands DCP: with DCP's default planner (what
`_load_state_dict_from_keys` uses, as tests/integration/test_recovery.py does), an optimizer
hyper-parameter entry replaced by a pickle payload ran it."""

import os
import pickle
import warnings

import pytest
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from raylm import checkpoint
from tests.unit.test_checkpoint import saved
from tests.unit.test_checkpoint_security import Exploit, _metadata, _retarget, _rewrite_metadata, _touch, recommit

READERS = {"SafeReader": checkpoint.SafeReader, "RangedReader": checkpoint.RangedReader}


def _load_all(reader):
    with warnings.catch_warnings():  # "no process group, loading in a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        return _load_state_dict_from_keys(storage_reader=reader)


@pytest.mark.parametrize("reader", list(READERS))
def test_a_hostile_bytes_entry_is_refused_under_dcps_default_planner(tmp_path, reader):
    _, _, ckpt = saved(tmp_path)
    marker = tmp_path / "pwned"
    shard = os.path.join(ckpt, "__0_0.distcp")
    payload = pickle.dumps(Exploit(_touch(marker)))
    offset = os.path.getsize(shard)
    with open(shard, "ab") as f:
        f.write(payload)
    md = _metadata(ckpt)
    _retarget(ckpt, md, "bytes", "__0_0.distcp", offset, len(payload))
    _rewrite_metadata(ckpt, md)
    recommit(ckpt)
    # DCP wraps a rank's error in CheckpointException, a BaseException.
    with pytest.raises(BaseException) as info:
        _load_all(READERS[reader](ckpt))
    assert not marker.exists(), "the payload ran"
    assert "refuses to unpickle" in str(info.value), info.value


@pytest.mark.parametrize("reader", list(READERS))
def test_every_entry_still_reads_back_under_dcps_default_planner(tmp_path, reader):
    _, opt, ckpt = saved(tmp_path)
    state = _load_all(READERS[reader](ckpt))
    groups = state["optim"]["param_groups"]
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in groups] == [
        (g["weight_decay"], g["betas"], g["eps"]) for g in opt.state_dict()["param_groups"]]
    assert set(state["model"]) and all(hasattr(v, "shape") for v in state["model"].values())
