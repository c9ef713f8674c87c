"""`raylm.tune_state.CheckedStateFileSystem`: what `Tuner.restore` reads of a search's Tune
state is the bytes raylm checked, whatever the storage holds by then; everything else is the
storage itself, and the filesystem pickles as the storage's own (into trials and Tune's state).
The whole resume, with state swapped after the check: tests/integration/test_tune_checked_bytes_resume.py.
"""

from __future__ import annotations

import copy
import pickle

import pyarrow.fs as pafs
import pytest
from ray import cloudpickle

from raylm import storage
from raylm.tune_state import CheckedStateFileSystem, check_search_state


@pytest.fixture(params=["local", "s3"])
def search(request, tmp_path):
    """(uri of a search's Tune directory, its filesystem, the directory's path in it)."""
    uri = str(tmp_path / "search") if request.param == "local" else f"{request.getfixturevalue('s3_prefix')}/search"
    fs, path = storage.filesystem(uri)
    return uri, fs, path


def _put(uri: str, name: str, data: bytes) -> None:
    storage.write_bytes(storage.join(uri, name), data)


def test_reads_get_the_checked_bytes_and_nothing_added(search):
    uri, real, path = search
    _put(uri, "tuner.pkl", pickle.dumps({"checked": 1}))
    _put(uri, "experiment_state-2026-01-01_00-00-00.json", b'{"trial_data": []}')
    _put(uri, "trial_1/result.json", b"{}")
    checked = check_search_state(uri)
    assert sorted(checked) == ["experiment_state-2026-01-01_00-00-00.json", "tuner.pkl"]
    fs = CheckedStateFileSystem(real, path, checked)

    _put(uri, "tuner.pkl", b"swapped")  # after the check
    _put(uri, "experiment_state-9999-01-01_00-00-00.json", b"added")
    _put(uri, "trial_1/result.json", b"[]")
    assert fs.open_input_file(f"{path}/tuner.pkl").readall() == checked["tuner.pkl"]
    assert fs.open_input_stream(f"{path}/tuner.pkl").readall() == checked["tuner.pkl"]
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream(f"{path}/experiment_state-9999-01-01_00-00-00.json")
    [info] = fs.get_file_info([f"{path}/experiment_state-9999-01-01_00-00-00.json"])
    assert info.type == pafs.FileType.NotFound
    listed = {i.path.rsplit("/", 1)[1]: i.size for i in fs.get_file_info(pafs.FileSelector(path))}
    assert listed == {"tuner.pkl": len(checked["tuner.pkl"]), "trial_1": None,
                      "experiment_state-2026-01-01_00-00-00.json": len(b'{"trial_data": []}')}
    # Files outside Tune's state, and in trial folders, are the storage's.
    assert fs.open_input_stream(f"{path}/trial_1/result.json").readall() == b"[]"

    # What this process writes is the storage's from then on.
    with fs.open_output_stream(f"{path}/tuner.pkl") as f:
        f.write(b"mine")
    assert storage.read_bytes(storage.join(uri, "tuner.pkl")) == b"mine"
    assert fs.open_input_stream(f"{path}/tuner.pkl").readall() == b"mine"


def test_pickles_and_copies_as_the_storage_filesystem(search, tmp_path):
    """Trials and Tune's saved state get the storage's own filesystem (the next resume's check
    allows exactly its globals); copies made in this process keep the checked bytes."""
    uri, real, path = search
    fs = CheckedStateFileSystem(real, path, {"tuner.pkl": b"checked"})
    assert pickle.dumps(fs) == pickle.dumps(real)
    assert cloudpickle.dumps(fs) == cloudpickle.dumps(real)
    assert copy.copy(fs) is fs and copy.deepcopy({"fs": fs})["fs"] is fs
    # Ray's download of the state to its staging directory (pyarrow's copy_files) gets them too.
    _put(uri, "tuner.pkl", b"swapped")
    (tmp_path / "staging").mkdir()
    pafs.copy_files(path, str(tmp_path / "staging"), source_filesystem=fs)
    assert (tmp_path / "staging" / "tuner.pkl").read_bytes() == b"checked"
