"""`raylm.tune_state.CheckedStateFileSystem`, the filesystem Tune is given for every search
(new: `checked` empty; resumed: the checked state), has no pickle below the experiment's top
level for Ray to read: Ray unpickles a failed trial's `error.pkl` from the search's storage
as `tuner.fit()` returns (`Trial.get_pickled_error`, `Result.from_path`), so a file planted
there ran code in the driver. The whole search, with error.pkl planted while it runs:
tests/integration/test_tune_trial_pickles.py.
"""

from __future__ import annotations

import pickle

import pyarrow.fs as pafs
import pytest
from ray.air.result import Result
from ray.train._internal.storage import _exists_at_fs_path

from raylm import storage
from raylm.tune_state import CheckedStateFileSystem, check_search_state
from tests.integration.test_tune_checked_bytes_resume import Planted
from tests.unit.test_tune_checked_bytes import _put, search  # noqa: F401 - its fixture: a search's directory, local and S3


@pytest.mark.parametrize("run", ["new", "resumed"])
def test_no_trial_pickle_is_read(search, run, tmp_path):
    uri, real, path = search
    marker = tmp_path / "marker"
    planted = pickle.dumps(Planted(str(marker)))
    _put(uri, "tuner.pkl", pickle.dumps({"checked": 1}))
    _put(uri, "trial_1/result.json", b'{"step": 4}\n')
    _put(uri, "trial_1/error.txt", b"Failure # 1\nTrainingTimeout: step 1\n")
    _put(uri, "trial_1/error.pkl", planted)
    _put(uri, "trial_1/params.pkl", planted)
    _put(uri, "trial_1/artifacts/deeper.pkl", planted)
    fs = CheckedStateFileSystem(real, path, check_search_state(uri) if run == "resumed" else {})

    for name in ("trial_1/error.pkl", "trial_1/params.pkl", "trial_1/artifacts/deeper.pkl"):
        assert not _exists_at_fs_path(fs, f"{path}/{name}"), name  # Trial.get_pickled_error's test
        with pytest.raises(FileNotFoundError):
            fs.open_input_stream(f"{path}/{name}")
        with pytest.raises(FileNotFoundError):
            fs.open_input_file(f"{path}/{name}")
    listed = {i.path.rsplit("/", 1)[1] for i in fs.get_file_info(pafs.FileSelector(f"{path}/trial_1"))}
    assert listed == {"result.json", "error.txt", "artifacts"}, listed
    everything = {i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))}
    assert not [p for p in everything if p.endswith(".pkl") and "/trial_1/" in p], everything

    # Ray's own reader of a trial folder unpickles its error.pkl whenever it exists.
    result = Result.from_path(f"{path}/trial_1", storage_filesystem=fs)
    assert not marker.exists(), "error.pkl was unpickled"
    assert result.error is None and result.metrics == {"step": 4}
    # The rest of the trial folder, and the top level, are as before.
    assert fs.open_input_stream(f"{path}/trial_1/error.txt").readall().startswith(b"Failure # 1")
    tuner = fs.get_file_info([f"{path}/tuner.pkl"])[0]
    assert tuner.type == (pafs.FileType.File if run == "resumed" else pafs.FileType.NotFound)

    # Tune's own writes of them reach the storage.
    with fs.open_output_stream(f"{path}/trial_1/error.pkl") as f:
        f.write(b"tune's")
    assert storage.read_bytes(storage.join(uri, "trial_1/error.pkl")) == b"tune's"
