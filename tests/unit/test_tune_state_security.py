"""A search's Tune state is checked before `Tuner.restore` unpickles it, and nothing in it runs.

Each hostile file here is built in the test and planted in a real search directory under
the name Ray's restore loads it by; every payload would create a marker file, and each test
checks that the check refuses it, in one line naming the file, and that the marker does not
exist afterwards. The payloads are shown to run under plain pickle too.
"""

from __future__ import annotations

import binascii
import json
import os
import pickle
import shlex
import subprocess
import sys

import pytest

from raylm import tune_state
from raylm.errors import UserError
from raylm.tune_state import UnsafeTuneStateError, check_pickle, check_search_state


def _touch(marker) -> str:
    return f"touch {shlex.quote(str(marker))}"


class System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (_touch(self.marker),)


class Subprocess:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return subprocess.call, (["touch", self.marker],)


class Eval:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"__import__('os').system({_touch(self.marker)!r})",)


def _u(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def getattr_chain(marker) -> bytes:
    """getattr(__import__('os'), 'system')(cmd), protocol 4, with STACK_GLOBAL."""
    return (b"\x80\x04" + _u("builtins") + _u("getattr") + b"\x93"
            + _u("builtins") + _u("__import__") + b"\x93" + _u("os") + b"\x85R"
            + _u("system") + b"\x86R" + _u(_touch(marker)) + b"\x85R.")


def memoised_names(marker) -> bytes:
    """STACK_GLOBAL whose module and name come back from the memo (BINGET), not pushes."""
    return (b"\x80\x04" + _u("posix") + b"\x94" + _u("system") + b"\x94" + b"00"  # MEMOIZE x2, POP x2
            + b"h\x00h\x01\x93" + _u(_touch(marker)) + b"\x85R.")


def dotted_name(marker) -> bytes:
    """An allowed module's own `import os`, reached by a dotted name (protocol 4)."""
    return (b"\x80\x04" + _u("ray.train._internal.storage") + _u("os.system") + b"\x93"
            + _u(_touch(marker)) + b"\x85R.")


def computed_names(marker) -> bytes:
    """STACK_GLOBAL of strings made by a call (str('posix')): not resolvable without running."""
    return (b"\x80\x04" + _u("builtins") + _u("str") + b"\x93" + _u("posix") + b"\x85R"
            + _u("system") + b"\x93" + _u(_touch(marker)) + b"\x85R.")


def text_global(marker, proto: int) -> bytes:
    """GLOBAL 'os\\nsystem' (protocols 0-3) followed by REDUCE."""
    head = b"" if proto == 0 else b"\x80" + bytes([proto])
    return head + b"cos\nsystem\n" + b"(V" + _touch(marker).encode() + b"\ntR."


def upload_called(marker) -> bytes:
    """A call of Ray's upload helper (allowed only as a value): it would copy any local file
    to any filesystem (exfiltration) while unpickling."""
    return (b"\x80\x04" + _u("ray.train._internal.storage") + _u("_upload_to_fs_path") + b"\x93"
            + _u(str(marker)) + b"N" + _u("x") + b"\x87R.")


def build_on_global(marker) -> bytes:
    """BUILD on a class itself: setattr on a module's own class (slot state)."""
    return (b"\x80\x04" + _u("collections") + _u("deque") + b"\x93" + b"N}" + _u("x") + b"K\x01s\x86b.")


def cloudpickled_function(marker) -> bytes:
    """A function pickled by value (cloudpickle: code), called by REDUCE as it loads."""
    from ray import cloudpickle

    cmd = _touch(marker)

    class Run:
        def __reduce__(self):
            return (lambda: __import__("os").system(cmd)), ()

    return cloudpickle.dumps(Run())


PAYLOADS = {
    **{f"os.system-protocol-{p}": (lambda m, p=p: pickle.dumps(System(m), protocol=p)) for p in range(6)},
    **{f"subprocess-protocol-{p}": (lambda m, p=p: pickle.dumps(Subprocess(m), protocol=p)) for p in range(6)},
    **{f"eval-protocol-{p}": (lambda m, p=p: pickle.dumps(Eval(m), protocol=p)) for p in range(6)},
    **{f"GLOBAL-protocol-{p}": (lambda m, p=p: text_global(m, p)) for p in range(4)},
    "getattr-chain": getattr_chain,
    "memoised-names": memoised_names,
    "dotted-name": dotted_name,
    "computed-names": computed_names,
    "upload-called": upload_called,
    "cloudpickled-function": cloudpickled_function,
}
# Every name the restore loads a pickle by.
PICKLE_FILES = ["tuner.pkl", "basic-variant-state-2026-01-01_00-00-00.json", "search_gen_state-2026-01-01_00-00-00.json",
                "searcher-state-2026-01-01_00-00-00.pkl", "callback-states-2026-01-01_00-00-00.pkl", "other.pkl"]


def _refused(tmp_path, name: str, data: bytes, marker) -> str:
    search = tmp_path / "search"
    search.mkdir(exist_ok=True)
    (search / name).write_bytes(data)
    with pytest.raises(UnsafeTuneStateError) as e:
        check_search_state(str(search))
    assert not os.path.exists(marker), f"the payload ran: {marker}"
    msg = str(e.value)
    assert "\n" not in msg and str(search / name) in msg, msg
    assert isinstance(e.value, UserError)  # the CLI prints it as one line
    return msg


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_every_hostile_tuner_pkl_is_refused_without_effect(payload, tmp_path):
    marker = tmp_path / "pwned"
    _refused(tmp_path, "tuner.pkl", PAYLOADS[payload](marker), marker)


@pytest.mark.parametrize("name", PICKLE_FILES)
def test_every_state_pickle_the_restore_loads_is_checked(name, tmp_path):
    marker = tmp_path / "pwned"
    _refused(tmp_path, name, pickle.dumps(System(marker), protocol=5), marker)


@pytest.mark.parametrize("payload", ["os.system-protocol-2", "os.system-protocol-5", "cloudpickled-function"])
def test_the_payloads_do_run_under_plain_pickle(payload, tmp_path):
    """What Tune's restore would have done: the check above is what stops them."""
    marker = tmp_path / "pwned"
    data = PAYLOADS[payload](marker)
    code = f"import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    (tmp_path / "p").write_bytes(data)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], check=False, capture_output=True)
    assert marker.exists()


def test_unresolvable_and_out_of_band_opcodes_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "persistent id": b"\x80\x04" + _u("x") + b"Q.",
        "an extension code": b"\x80\x02\x82\x01)R.",
        "an out-of-band buffer": b"\x80\x05\x97.",
        "BUILD on collections.deque itself": build_on_global(marker),
    }
    for what, data in cases.items():
        msg = _refused(tmp_path, "tuner.pkl", data, marker)
        assert what.split(" itself")[0] in msg, (what, msg)
    # Even were every global allowed, a name made at load time cannot be checked.
    with pytest.raises(UnsafeTuneStateError, match="x: refuses to unpickle a global whose name is computed"):
        tune_state.pickle_globals(computed_names(marker), "x")
    assert not marker.exists()


def test_damaged_state_is_a_one_line_error(tmp_path):
    good = pickle.dumps({"a": [1, 2.0, "x"]}, protocol=5)
    for data in (good[:-3], b"", b"not a pickle"):
        _refused(tmp_path, "tuner.pkl", data, tmp_path / "none")
    check_pickle(good, "x")  # plain data passes


def _experiment_state(trial_state: dict, runner: dict | None = None) -> str:
    return json.dumps({"runner_data": runner or {}, "trial_data": [[json.dumps(trial_state), json.dumps({})]]})


def _fallback(data: bytes) -> dict:
    return {"_type": "CLOUDPICKLE_FALLBACK", "value": binascii.hexlify(data).decode()}


def test_pickles_inside_experiment_state_are_checked(tmp_path):
    """experiment_state-*.json: fallback objects at any depth, in the runner's data and in
    each trial's JSON texts, and the trial's hex-pickled fields."""
    marker = tmp_path / "pwned"
    bad = pickle.dumps(System(marker), protocol=5)
    name = "experiment_state-2026-01-01_00-00-00.json"
    docs = [
        json.dumps({"runner_data": {"x": [_fallback(bad)]}, "trial_data": []}),
        _experiment_state({"trainable_name": "t", "storage": _fallback(bad)}),
        _experiment_state({"trainable_name": "t", "results": binascii.hexlify(bad).decode()}),
        _experiment_state({"trainable_name": "t", "placement_group_factory": binascii.hexlify(bad).decode()}),
        # A fallback whose value is itself a fallback: Ray would unhex what the inner one unpickled.
        _experiment_state({"trainable_name": "t", "storage": {"_type": "CLOUDPICKLE_FALLBACK",
                                                               "value": _fallback(pickle.dumps("80"))}}),
        # trial_data as a pickle (whose strings Ray would then decode unchecked).
        json.dumps({"runner_data": {}, "trial_data": _fallback(pickle.dumps([["{}", "{}"]]))}),
        json.dumps({"runner_data": {}, "trial_data": [_fallback(pickle.dumps(["{}", "{}"]))]}),
        # A pickled field held as anything but a hex string.
        _experiment_state({"trainable_name": "t", "results": _fallback(pickle.dumps(b"\x80\x04N."))}),
    ]
    for doc in docs:
        msg = _refused(tmp_path, name, doc.encode(), marker)
        assert name in msg
    run_meta = json.dumps({"runner_data": {}, "trial_data": [["{}", json.dumps({"x": _fallback(bad)})]]})
    assert "run metadata" in _refused(tmp_path, name, run_meta.encode(), marker)
    plain = _experiment_state({"trainable_name": "t", "results": binascii.hexlify(pickle.dumps([1, 2])).decode()})
    (tmp_path / "search" / name).write_text(plain)
    check_search_state(str(tmp_path / "search"))


def test_files_the_restore_never_unpickles_are_left_alone(tmp_path):
    """raylm's own search.json, results, trial folders: not Tune state the restore loads."""
    search = tmp_path / "search"
    (search / "runs" / "t1").mkdir(parents=True)
    bad = pickle.dumps(System(tmp_path / "pwned"), protocol=5)
    (search / "search.json").write_text("{}")
    (search / "runs" / "t1" / "error.pkl").write_bytes(bad)
    (search / "tuner.pkl.raylm-notes").write_bytes(bad)
    check_search_state(str(search))
    assert [os.path.basename(u) for u, _ in tune_state.state_files(str(search))] == []


def test_raylm_search_objects_pickle_by_reference_and_pass():
    """What raylm hands Tune (its searchers, schedulers, callback, configs, filesystems)
    cloudpickles to globals on the allowlist: no code."""
    import optuna
    import pyarrow.fs
    from ray import cloudpickle, tune as rt
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from raylm import storage
    from raylm.config import TrainConfig

    for search_alg, scheduler in ((tune_state.BasicVariantGenerator(random_state=3, max_concurrent=2), FIFOScheduler()),
                                  (OptunaSearch(sampler=optuna.samplers.TPESampler(seed=1)),
                                   ASHAScheduler(time_attr="step", max_t=8, grace_period=2))):
        for fs in (pyarrow.fs.LocalFileSystem(), storage._s3_filesystem("http://127.0.0.1:1", "us-east-1", 3)):
            state = {"_tune_config": rt.TuneConfig(metric="val_loss", mode="min", search_alg=search_alg,
                                                   scheduler=scheduler, num_samples=2),
                     "_run_config": rt.RunConfig(name="x", storage_path="/tmp", storage_filesystem=fs,
                                                 callbacks=[tune_state.TrialLog(lambda *_: None, TrainConfig())],
                                                 failure_config=rt.FailureConfig(max_failures=1), verbose=0)}
            check_pickle(cloudpickle.dumps(state), "tuner.pkl")


def test_a_callback_made_inside_a_function_is_code_and_refused():
    """Why raylm's callback is a module's class: one made in a function pickles by value."""
    from ray import cloudpickle, tune as rt

    def make():
        class Local(rt.Callback):
            def on_trial_start(self, *a, **k):
                pass

        return Local()

    with pytest.raises(UnsafeTuneStateError, match="tuner.pkl: refuses to unpickle ray.cloudpickle.cloudpickle._make_skeleton_class"):
        check_pickle(cloudpickle.dumps(make()), "tuner.pkl")


def test_s3_state_is_checked(s3_server, s3_prefix, tmp_path):
    from raylm import storage

    marker = tmp_path / "pwned"
    storage.write_bytes(f"{s3_prefix}/search/tuner.pkl", pickle.dumps(System(marker), protocol=5))
    with pytest.raises(UnsafeTuneStateError, match=rf"{s3_prefix}/search/tuner.pkl: refuses to unpickle posix.system"):
        check_search_state(f"{s3_prefix}/search")
    assert not marker.exists()
