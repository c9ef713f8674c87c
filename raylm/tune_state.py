"""A search's Tune state, checked before `Tuner.restore` unpickles it (`raylm tune --resume`).

Ray Tune keeps a search's state in its storage as pickles, and restoring runs
`cloudpickle.loads` on each: whoever could write one file there would run code on the
machine that resumes the search. Every pickle that Ray's restore loads is read here first,
opcode by opcode (`pickletools.genops`: nothing is unpickled, imported or called), following
the unpickler's stack and memo, and refused, in one line naming the file, unless every
global it names is on an exact list of (module, name) pairs, each for one use: called,
made by `__new__` only, or only held. A pickle can call only what a global names (REDUCE,
NEWOBJ, OBJ and INST call a global; BUILD and the container opcodes a made object's own
methods), so with none but these it builds data and Tune's own objects and runs nothing
else. Whatever cannot be told without running it is refused: a call of anything but a
global, a STACK_GLOBAL of anything but strings, BUILD or APPEND/SETITEM on a global itself,
persistent ids, extension codes, out-of-band buffers, a malformed stream.

The state's data is checked too (`check_experiment_data`), since Tune's restore takes it as it
is: only the controller and trial attributes Ray saves (it sets whatever keys the JSON holds),
trial ids that are plain names, each trial's folder one name inside the experiment's, trial
fields that name files left at their defaults, and (given `check_params`) each trial's config
drawn from the search space. Each file is read once for both checks, and Ray is given those
bytes, not the files again (`CheckedStateFileSystem`): a file swapped or added in the storage
after the check is never unpickled. What a search reports is checked too: each trial's last
result (run metadata) holds its own id and config, its folder is its own, and a trial ranked
on what it reported is one raylm trained (`raylm.tune.check_recorded`).

The list needs no code because raylm's searches pickle none: its callback and random/grid
searcher are classes of this module (below), its trainable and search space go by reference.

What Ray 2.60's `Tuner.restore` and its `TuneController.resume` load (searched in Ray's
source: every `pickle.load(s)`/`cloudpickle.load(s)` on that path):

- `tuner.pkl`: `cloudpickle.loads` (`TunerInternal._restore_from_path_or_uri`).
- the newest `experiment_state-*.json` (by `ExperimentAnalysis` and by the controller): JSON
  whose objects of `"_type": "CLOUDPICKLE_FALLBACK"` are hex-encoded cloudpickles, loaded as
  the JSON is decoded; its `trial_data` holds, per trial, two JSON texts decoded the same
  way, and in the trial's, the fields `Trial._nonjson_fields` are hex-encoded cloudpickles.
- copied from the search's top level into the driver's staging directory, then loaded with
  `cloudpickle.load` (`_load_newest_checkpoint`, `Searcher.restore`): the search
  algorithm's `basic-variant-state-*.json` or `search_gen_state-*.json` (pickles despite the
  name) and the searcher's `searcher-state-*.pkl` (Optuna's: `pickle.load`), and the
  callbacks' `callback-states-*.pkl`.

Every file of those names is checked, not only the newest, and every other top-level
`*.pkl` too (Ray copies them all into its staging directory). Trials' checkpoints are raylm
checkpoints, loaded by raylm's own checked loader.

A trial's folder holds pickles too: Tune writes a failed trial's exception to `error.pkl`
there and uploads it, and as `tuner.fit()` returns, its ResultGrid reads it back from the
storage and unpickles it (`Trial.get_pickled_error`; `Result.from_path` would too), for every
trial that did not finish, on a new search and a resumed one alike: a file written there
after Tune's last upload ran code. `CheckedStateFileSystem`, the filesystem Tune is given
for every search, new or resumed, answers that no pickle exists below the experiment's top
level, so Ray takes the trial's error from its `error.txt`, as text.
"""

from __future__ import annotations

import binascii
import fnmatch
import io
import json
import pickle
import pickletools
import posixpath
import re

import pyarrow as pa
import pyarrow.fs as pafs

from raylm import storage
from raylm.errors import UserError


class UnsafeTuneStateError(UserError, ValueError):
    """A search's Tune state asks to unpickle something raylm's searches never write."""


TUNER_FILE = "tuner.pkl"
EXPERIMENT_STATE = "experiment_state-*.json"
# Pickles whatever their names say (ray.tune.utils.util._atomic_save, Searcher.save).
STATE_PICKLES = ("basic-variant-state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl",
                 "callback-states-*.pkl", "*.pkl")
FALLBACK = "CLOUDPICKLE_FALLBACK"  # ray.tune.utils.serialization._CLOUDPICKLE_FALLBACK_TYPE
TRIAL_PICKLED_FIELDS = ("results", "extra_arg", "placement_group_factory", "_resources",
                        "_default_placement_group_factory")  # ray.tune.experiment.trial.Trial._nonjson_fields

# Exactly the (module, name) pairs the Tune state of raylm's searches names: Tune's own
# objects (configs, search space domains, searchers, schedulers, trials' storage and
# resources), pyarrow's filesystems, raylm's S3 filesystem factory, and the plain types
# they hold. No callable here runs code it is given: none of builtins' getattr, eval,
# exec, __import__, no os, subprocess, importlib, no cloudpickle function or code
# constructors (raylm's trainable, search space and callbacks pickle by reference).
#
# Each pair is allowed for one use: "call" (the pickle may call it, with any arguments),
# "new" (a class it may only make by `cls.__new__`, then fill by BUILD: its `__init__`,
# which the pickle never runs, may touch storage or the network; StorageContext's writes a
# marker file), or "value" (it may only hold it; Ray's upload helper, which called would
# copy any file to any filesystem).
ALLOWED: dict[tuple[str, str], str] = {
    # Python and numpy: containers, dates, arrays and random generators
    ("collections", "deque"): "call",
    ("datetime", "datetime"): "call",
    ("numpy", "dtype"): "call",
    ("numpy", "ndarray"): "value",
    ("numpy._core.multiarray", "_reconstruct"): "call",
    ("numpy._core.multiarray", "scalar"): "call",
    ("numpy._core.numeric", "_frombuffer"): "call",
    ("numpy.core.multiarray", "_reconstruct"): "call",  # the same three as numpy 1.x names them
    ("numpy.core.multiarray", "scalar"): "call",
    ("numpy.core.numeric", "_frombuffer"): "call",
    ("numpy.random._mt19937", "MT19937"): "call",
    ("numpy.random._pcg64", "PCG64"): "call",
    ("numpy.random._pickle", "__bit_generator_ctor"): "call",
    ("numpy.random._pickle", "__generator_ctor"): "call",
    ("numpy.random._pickle", "__randomstate_ctor"): "call",
    ("numpy.random.bit_generator", "SeedSequence"): "value",
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"): "call",
    # pyarrow's filesystems (LocalFileSystem pickles as FileSystem._from_uri("file:///")), raylm's S3 one
    ("pyarrow._fs", "FileSystem._from_uri"): "call",
    ("raylm.storage", "_s3_filesystem"): "call",
    # Tune's and Train's configs, storage, trials' resources and checkpoints
    ("ray.air._internal.usage", "AirEntrypoint"): "call",
    ("ray.train", "SyncConfig"): "new",
    ("ray.train._internal.checkpoint_manager", "_CheckpointManager"): "new",
    ("ray.train._internal.storage", "StorageContext"): "new",
    ("ray.train._internal.storage", "_FilesystemSyncer"): "new",
    ("ray.train._internal.storage", "_upload_to_fs_path"): "value",
    ("ray.tune", "CheckpointConfig"): "new",
    ("ray.tune", "FailureConfig"): "new",
    ("ray.tune", "RunConfig"): "new",
    ("ray.tune.execution.placement_groups", "PlacementGroupFactory"): "new",
    ("ray.tune.experiment.experiment", "Experiment"): "new",
    ("ray.tune.stopper.noop", "NoopStopper"): "new",
    ("ray.tune.stopper.timeout", "TimeoutStopper"): "new",  # tune.time_budget_s: the budget left, in seconds
    ("ray.tune.tune_config", "TuneConfig"): "new",
    # Tune's schedulers, searchers and search space (raylm's distributions)
    ("ray.tune.schedulers.async_hyperband", "AsyncHyperBandScheduler"): "new",
    ("ray.tune.schedulers.async_hyperband", "_Bracket"): "new",
    ("ray.tune.schedulers.trial_scheduler", "FIFOScheduler"): "new",
    ("ray.tune.search.basic_variant", "_TrialIterator"): "new",
    ("ray.tune.search.basic_variant", "_VariantIterator"): "new",
    ("ray.tune.search.optuna.optuna_search", "OptunaSearch"): "new",
    ("ray.tune.search.sample", "Categorical"): "new",
    ("ray.tune.search.sample", "Categorical._Uniform"): "new",
    ("ray.tune.search.sample", "Float"): "new",
    ("ray.tune.search.sample", "Float._LogUniform"): "new",
    ("ray.tune.search.sample", "Float._Uniform"): "new",
    ("ray.tune.search.sample", "Integer"): "new",
    ("ray.tune.search.sample", "Integer._Uniform"): "new",
    ("ray.tune.search.sample", "_BackwardsCompatibleNumpyRng"): "new",
    # Optuna's sampler and in-memory study (tune.search=optuna)
    ("optuna.distributions", "CategoricalDistribution"): "new",
    ("optuna.distributions", "FloatDistribution"): "new",
    ("optuna.distributions", "IntDistribution"): "new",
    ("optuna.pruners._nop", "NopPruner"): "new",
    ("optuna.samplers._lazy_random_state", "LazyRandomState"): "new",
    ("optuna.samplers._random", "RandomSampler"): "new",
    ("optuna.samplers._tpe.parzen_estimator", "_ParzenEstimator"): "value",
    ("optuna.samplers._tpe.parzen_estimator", "_ParzenEstimatorParameters"): "new",
    ("optuna.samplers._tpe.sampler", "TPESampler"): "new",
    ("optuna.samplers._tpe.sampler", "default_weights"): "value",
    ("optuna.search_space.intersection", "IntersectionSearchSpace"): "new",
    ("optuna.storages._in_memory", "InMemoryStorage"): "new",
    ("optuna.storages._in_memory", "_StudyInfo"): "new",
    ("optuna.study._study_direction", "StudyDirection"): "call",
    ("optuna.study.study", "Study"): "new",
    ("optuna.trial._frozen", "FrozenTrial"): "new",
    ("optuna.trial._state", "TrialState"): "call",
    ("optuna.trial._trial", "Trial"): "new",
    # raylm's own (below; raylm.config's TrainConfig in the callback)
    ("raylm.config", "TrainConfig"): "new",
    ("raylm.tune_state", "BasicVariantGenerator"): "new",
    ("raylm.tune_state", "TrialLog"): "call",
}
# Allowed callables that call what they are given (numpy's generator constructors take a
# bit generator's constructor; TrialLog a log function): whatever a pickle passes them counts
# as called by the pickle itself.
CALLS_ITS_ARGUMENTS = frozenset({("numpy.random._pickle", "__bit_generator_ctor"),
                                 ("numpy.random._pickle", "__generator_ctor"),
                                 ("numpy.random._pickle", "__randomstate_ctor"),
                                 ("raylm.tune_state", "TrialLog")})

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_ADDS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"}  # they call the target's own methods
_REFUSED = {"PERSID": "a persistent id", "BINPERSID": "a persistent id", "EXT1": "an extension code",
            "EXT2": "an extension code", "EXT4": "an extension code", "NEXT_BUFFER": "an out-of-band buffer",
            "READONLY_BUFFER": "an out-of-band buffer"}


def _refuse(where: str, what: str) -> UnsafeTuneStateError:
    return UnsafeTuneStateError(f"{where}: refuses to unpickle {what}, which raylm's searches never save (a "
                                f"tampered search state, or one saved by an older raylm: start the search anew)")


def _fixed(proto: int, module: str, name: str) -> tuple[str, str]:
    """What the unpickler resolves: below protocol 3 it maps Python 2 names first."""
    if proto < 3:
        import _compat_pickle

        if (module, name) in _compat_pickle.NAME_MAPPING:
            return _compat_pickle.NAME_MAPPING[(module, name)]
        return _compat_pickle.IMPORT_MAPPING.get(module, module), name
    return module, name


class _Item:
    """What the check knows of one value on the unpickler's stack: a global (module, name),
    a string, or anything else (None for both)."""

    __slots__ = ("glob", "text", "elements")

    def __init__(self, glob: tuple[str, str] | None = None, text: str | None = None, elements=()):
        self.glob, self.text = glob, text
        self.elements = elements  # a tuple's: the globals among its own elements


_OTHER = _Item()
_TUPLES = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"}


def pickle_globals(data: bytes, where: str, allowed=None) -> list[tuple[tuple[str, str], str]]:
    """Every global the pickle `data` resolves, with how the pickle uses it ("call": called
    by REDUCE, OBJ or INST; "new": a class made by NEWOBJ or NEWOBJ_EX, `cls.__new__(cls)`,
    whose `__init__` does not run; "value": only held), read from
    its opcodes without unpickling, by following the unpickler's stack and memo as pickle's
    own loader does. UnsafeTuneStateError naming `where` for whatever could call or import
    something that cannot be told without running it: a STACK_GLOBAL whose operands are
    not strings, a call of anything but a global, BUILD on a global itself (it would set
    attributes of a module's class or function), persistent ids, extension codes,
    out-of-band buffers, or a stream the unpickler would not read as this does. With
    `allowed` (see `check_pickle`), each global is checked as it is met, so that the refusal
    names the first one not allowed."""
    found = _Found(where, allowed)
    stack: list[_Item] = []
    metastack: list[list[_Item]] = []
    memo: dict[int, _Item] = {}
    proto = 0

    def pop(n: int = 1) -> list[_Item]:
        if len(stack) < n:
            raise ValueError("stack underflow")
        out = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return out

    def pop_mark() -> list[_Item]:
        nonlocal stack
        if not metastack:
            raise ValueError("no MARK")
        items, stack = stack, metastack.pop()
        return items

    def called(item: _Item, how: str, args, use: str = "call") -> None:
        """`item` called (or made, `use` "new") with the globals `args` among its arguments."""
        if item.glob is None:
            raise _refuse(where, f"a call ({how}) of something that is not a named global")
        found.append((item.glob, use))
        if item.glob in CALLS_ITS_ARGUMENTS:  # what it is given, it calls: as if the pickle did
            found.extend((g, "call") for g in args)
        stack.append(_OTHER)

    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in _REFUSED:
                raise _refuse(where, _REFUSED[name])
            if name in ("FRAME", "STOP"):
                if name == "STOP":
                    pop()
                    if stack or metastack:
                        raise ValueError("values left on the stack at STOP")
                    return found
                continue
            if name == "PROTO":
                proto = arg
            elif name in _STRINGS:
                stack.append(_Item(text=arg))
            elif name in ("GLOBAL", "INST"):
                parts = arg.split(" ")
                if len(parts) != 2 or not all(parts):
                    raise _refuse(where, f"a malformed global {arg!r}")
                glob = _fixed(proto, *parts)
                if name == "GLOBAL":
                    found.append((glob, "value"))
                    stack.append(_Item(glob=glob))
                else:
                    called(_Item(glob=glob), "INST", [i.glob for i in pop_mark() if i.glob])
            elif name == "STACK_GLOBAL":
                module, qual = pop(2)
                if module.text is None or qual.text is None:
                    raise _refuse(where, "a global whose name is computed (STACK_GLOBAL of something but strings)")
                glob = _fixed(proto, module.text, qual.text)
                found.append((glob, "value"))
                stack.append(_Item(glob=glob))
            elif name in _MEMO_PUT:
                if not stack:
                    raise ValueError("memo store of an empty stack")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in _MEMO_GET:
                if arg not in memo:
                    raise ValueError(f"memo key {arg} not found")
                stack.append(memo[arg])
            elif name == "DUP":
                stack.append(pop()[0])
                stack.append(stack[-1])
            elif name == "POP":
                if stack:
                    pop()
                else:
                    pop_mark()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "MARK":
                metastack.append(stack)
                stack = []
            elif name == "REDUCE":
                func, args = pop(2)
                called(func, "REDUCE", args.elements)
            elif name == "NEWOBJ":
                cls, args = pop(2)
                called(cls, "NEWOBJ", args.elements, "new")
            elif name == "NEWOBJ_EX":
                cls, args, kwargs = pop(3)
                called(cls, "NEWOBJ_EX", args.elements, "new")
            elif name == "OBJ":
                items = pop_mark()
                if not items:
                    raise ValueError("OBJ without a class")
                called(items[0], "OBJ", [i.glob for i in items[1:] if i.glob])
            elif name == "BUILD":
                target, state = pop(2)
                if target.glob is not None:
                    raise _refuse(where, f"BUILD on {'.'.join(target.glob)} itself (it would change a "
                                         f"module's own object)")
                stack.append(target)
            else:  # data: the stack effect pickletools documents, nothing called
                before = op.stack_before
                if pickletools.markobject in before:
                    items = pop_mark()
                    targets = pop(before.index(pickletools.markobject))
                else:
                    items = targets = pop(len(before))
                if name in _ADDS and targets[0].glob is not None:  # extend/append/add of a module's own object
                    raise _refuse(where, f"{name} into {'.'.join(targets[0].glob)} itself")
                if name in _TUPLES:
                    stack.append(_Item(elements=tuple(i.glob for i in items if i.glob)))
                else:
                    stack.extend(_OTHER for _ in op.stack_after)
    except UnsafeTuneStateError:
        raise
    except Exception as e:  # truncated or garbled: genops and the stack raise ValueError and others
        raise UnsafeTuneStateError(f"{where}: not a readable pickle ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else 'truncated'})") from None
    raise UnsafeTuneStateError(f"{where}: not a readable pickle (no STOP)")


class _Found(list):
    """The (global, use) pairs met so far, each checked against `allowed` (if given) as added."""

    def __init__(self, where: str, allowed):
        super().__init__()
        self.where, self.allowed = where, allowed

    def append(self, item) -> None:
        if self.allowed is not None:
            glob, use = item
            may = self.allowed.get(glob)
            if may is None:
                raise _refuse(self.where, ".".join(glob))
            if _USES.index(use) > _USES.index(may):
                raise _refuse(self.where, f"{'a call' if use == 'call' else 'an instance'} of {'.'.join(glob)}")
        super().append(item)

    def extend(self, items) -> None:
        for item in items:
            self.append(item)


def check_pickle(data: bytes, where: str, allowed=None) -> None:
    """Refuses `data` unless every global it names is allowed for the use it makes of it:
    `allowed` maps (module, name) to "call" (may be called), "new" (a class that may be made
    by `__new__` only: its `__init__` has effects) or "value" (may only be held)."""
    pickle_globals(data, where, ALLOWED if allowed is None else allowed)


_USES = ("value", "new", "call")  # each allows those before it


def _unhex(value, where: str) -> bytes:
    """ray._common.utils.hex_to_binary (binascii.unhexlify) of a JSON string; anything but
    a literal string (such as another fallback object, unpickled before Ray unhexes it)
    is refused."""
    if not isinstance(value, str):
        raise _refuse(where, f"a pickle held as {type(value).__name__}, not a hex string")
    try:
        return binascii.unhexlify(value)
    except (binascii.Error, ValueError) as e:
        raise UnsafeTuneStateError(f"{where}: not a readable hex-encoded pickle ({e})") from None


def _json_pickles(text, where: str) -> tuple[object, list[tuple[str, bytes]]]:
    """(the JSON document `text`, the pickles Tune's decoder would load from it) where the
    decoder is `TuneFunctionDecoder(allow_cloudpickle=True)`: every object whose `_type` is
    the fallback marker, at any depth, is `cloudpickle.loads(hex_to_binary(obj["value"]))`."""
    blobs = []

    def hook(obj: dict):
        if obj.get("_type") == FALLBACK:
            blobs.append((f"{where} (embedded pickle #{len(blobs) + 1})", _unhex(obj.get("value"), where)))
        return obj

    try:
        if isinstance(text, (bytes, bytearray)):
            text = text.decode("utf-8")
        doc = json.loads(text, object_hook=hook)
    except UnsafeTuneStateError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise UnsafeTuneStateError(f"{where}: not readable Tune state ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0]})") from None
    return doc, [(w, b) for w, b in blobs]


def experiment_state_pickles(text, where: str) -> list[tuple[str, bytes]]:
    """The pickles that `TuneController.resume` and `ExperimentAnalysis` load from one
    `experiment_state-*.json`: its fallback objects, and those of each trial's two JSON
    texts in `trial_data`, and each trial's pickled fields."""
    doc, blobs = _json_pickles(text, where)
    if not isinstance(doc, dict):
        raise UnsafeTuneStateError(f"{where}: not Tune experiment state (expected a JSON object)")
    trials = doc.get("trial_data", [])
    if not isinstance(trials, list):
        raise _refuse(where, "trial_data that is not a JSON list")
    for i, entry in enumerate(trials):
        # Literal strings: a fallback object here would be unpickled into what Ray then decodes.
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(s, str) for s in entry)):
            raise _refuse(where, f"trial_data[{i}] that is not two JSON texts")
        state, more = _json_pickles(entry[0], f"{where}: trial_data[{i}] state")
        blobs += more
        blobs += _json_pickles(entry[1], f"{where}: trial_data[{i}] run metadata")[1]
        if not isinstance(state, dict):
            raise UnsafeTuneStateError(f"{where}: trial_data[{i}]: not a trial's state (expected a JSON object)")
        for key in TRIAL_PICKLED_FIELDS:
            if key in state:
                field = f"{where}: trial_data[{i}] {key}"
                blobs.append((field, _unhex(state[key], field)))
    return blobs


def state_files(search_dir: str, s3=None) -> list[tuple[str, str]]:
    """(uri, kind) of every file at the top of the search's Tune directory that Tune's restore
    loads: kind "pickle", or "experiment" (an experiment_state JSON)."""
    out = []
    for info in storage.list_files(search_dir, s3, pattern=False):  # its name taken literally, not as a glob
        name = storage.relative(info.uri, search_dir)
        if "/" in name:  # Tune reads its state from the search's top level only
            continue
        if fnmatch.fnmatchcase(name, EXPERIMENT_STATE):
            out.append((info.uri, "experiment"))
        elif name == TUNER_FILE or any(fnmatch.fnmatchcase(name, p) for p in STATE_PICKLES):
            out.append((info.uri, "pickle"))
    return out


def state_pickles(search_dir: str, s3=None) -> list[tuple[str, bytes]]:
    """(where, bytes) of every pickle Tune's restore of the search in `search_dir` loads."""
    out = []
    for uri, kind in state_files(search_dir, s3):
        data = storage.read_bytes(uri, s3)
        out += experiment_state_pickles(data, uri) if kind == "experiment" else [(uri, data)]
    return out


def check_search_state(search_dir: str, s3=None, check_params=None) -> dict[str, bytes]:
    """Raises UnsafeTuneStateError, naming the file, unless every pickle that restoring the
    search in `search_dir` (local or s3://) would load names only allowed globals, and the
    data of each experiment state is what raylm's searches save (`check_experiment_data`;
    `check_params(params, where)` checks each trial's config). Each file is read once, and
    both checks are of those bytes. Nothing is unpickled but a trial's storage, once its
    pickle has passed. Returns the checked bytes by file name: what `CheckedStateFileSystem`
    gives Ray's restore."""
    checked = {}
    for uri, kind in state_files(search_dir, s3):
        data = storage.read_bytes(uri, s3)
        if kind == "experiment":
            for where, blob in experiment_state_pickles(data, uri):
                check_pickle(blob, where)
            check_experiment_data(data, uri, check_params)
        else:
            check_pickle(data, uri)
        checked[storage.relative(uri, search_dir)] = data
    return checked


class CheckedStateFileSystem(pafs.PyFileSystem):
    """The search's storage filesystem `fs` as `Tuner.restore` and the resumed controller see
    it: at the top of the experiment directory `experiment_path` (where Tune's state lies),
    the .json and .pkl files (all that Ray reads or copies there) are exactly `checked`
    (name: the bytes `check_search_state` checked), whatever the storage holds now; those
    this process writes are its own from then on. Below the top level (trial folders), no
    .pkl file exists for reads (`_trial_pickle`): Ray reads a trial's error.pkl back from the
    storage and unpickles it, and nothing else of Ray's or raylm's in this process reads one
    there. Everything else is `fs` itself. A new search gives it `checked` empty: its Tune
    state is only what this process writes.

    Pickled (into every trial's and Tune's saved storage) or copied, it is `fs`, as before:
    nothing in a trial reads the search's state, and the next resume's check sees the same
    globals. Deep copies keep this object."""

    def __init__(self, fs, experiment_path: str, checked: dict[str, bytes]):
        super().__init__(_CheckedState(fs, experiment_path, checked))
        self._fs = fs

    def __reduce__(self):
        return self._fs.__reduce__()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class _CheckedState(pafs.FileSystemHandler):
    def __init__(self, fs, experiment_path: str, checked: dict[str, bytes]):
        self.fs, self.dir, self.checked = fs, posixpath.normpath(experiment_path), dict(checked)
        self.written: set[str] = set()

    def _state(self, path: str) -> str | None:
        """The name of `path` when it is a state file (.json or .pkl) at the experiment's top
        level that this process has not written, else None."""
        head, name = posixpath.split(posixpath.normpath(path))
        if head == self.dir and name.endswith((".json", ".pkl")) and name not in self.written:
            return name
        return None

    def _trial_pickle(self, path: str) -> bool:
        """Whether `path` is a .pkl file in a folder of the experiment's (a trial's error.pkl)."""
        path = posixpath.normpath(path)
        return path.endswith(".pkl") and path.startswith(self.dir + "/") and "/" in path[len(self.dir) + 1:]

    def _info(self, path: str, name: str, real=None) -> pafs.FileInfo:
        if name in self.checked:
            return pafs.FileInfo(path, pafs.FileType.File, size=len(self.checked[name]),
                                 mtime=real.mtime if real is not None and real.type == pafs.FileType.File else None)
        return pafs.FileInfo(path, pafs.FileType.NotFound)

    def _wrote(self, path: str) -> None:
        name = self._state(path)
        if name is not None:
            self.checked.pop(name, None)
            self.written.add(name)

    def _read(self, path: str):
        if self._trial_pickle(path):
            raise FileNotFoundError(f"{path}: a trial's pickle, which raylm never has Ray unpickle")
        name = self._state(path)
        if name is None:
            return None
        if name not in self.checked:
            raise FileNotFoundError(f"{path}: not in the search's checked state")
        return pa.BufferReader(self.checked[name])

    # reads: the checked bytes
    def get_file_info(self, paths):
        out = []
        for path in paths:
            if self._trial_pickle(path):
                out.append(pafs.FileInfo(path, pafs.FileType.NotFound))
                continue
            name = self._state(path)
            real = self.fs.get_file_info(path)
            out.append(real if name is None else self._info(path, name, real))
        return out

    def get_file_info_selector(self, selector):
        out, listed = [], set()
        for real in self.fs.get_file_info(selector):
            if self._trial_pickle(real.path):
                continue
            name = self._state(real.path)
            if name is None:
                out.append(real)
            elif name in self.checked:
                out.append(self._info(real.path, name, real))
                listed.add(name)
        base = posixpath.normpath(selector.base_dir)
        if base == self.dir or selector.recursive and (self.dir + "/").startswith(base.rstrip("/") + "/"):
            out += [self._info(f"{self.dir}/{n}", n) for n in self.checked if n not in listed]
        return out

    def open_input_stream(self, path):
        data = self._read(path)
        return self.fs.open_input_stream(path) if data is None else data

    def open_input_file(self, path):
        data = self._read(path)
        return self.fs.open_input_file(path) if data is None else data

    # writes: to the storage, and this process's own from then on
    def open_output_stream(self, path, metadata):
        self._wrote(path)
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        self._wrote(path)
        return self.fs.open_append_stream(path, metadata=metadata)

    def move(self, src, dest):
        self._wrote(src)
        self._wrote(dest)
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        data = self._read(src)
        self._wrote(dest)
        if data is None:
            self.fs.copy_file(src, dest)
        else:
            with self.fs.open_output_stream(dest) as f:
                f.write(data.read())

    def delete_file(self, path):
        self._wrote(path)
        self.fs.delete_file(path)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("/", accept_root_dir=True)

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_type_name(self):
        return f"checked-{self.fs.type_name}"

    def equals(self, other):
        return other is self


# --------------------------------------------------------------------------- the state's data
#
# What Tune's restore takes from an experiment state as it is, beyond its pickles: the
# controller's and each trial's attributes (`TuneController.__setstate__` and
# `Trial.__setstate__` update `__dict__` with whatever keys the JSON holds: a controller
# given `_storage` writes the search's state and trial folders wherever that names), each
# trial's id (raylm's run name for it), config (the trial's overrides of the base config),
# and its storage's trial folder (joined to the experiment folder: an absolute or `..`
# name puts Tune's trial files anywhere). The keys are Ray 2.60's, as raylm's searches save them.

RUNNER_FIELDS = frozenset({
    "_actor_cleanup_timeout", "_actor_force_cleanup_timeout", "_buffer_length", "_buffer_max_time_s",
    "_buffer_min_time_s", "_cached_trial_decisions", "_checkpoint_period", "_earliest_stopping_actor", "_fail_fast",
    "_has_errored", "_iteration", "_max_pending_trials", "_metric", "_print_trial_errors", "_queued_trial_decisions",
    "_resumed", "_reuse_actors", "_session_str", "_should_stop_experiment", "_start_time", "_stopper", "_total_time",
    "_trial_checkpoint_config"})
TRIAL_FIELDS = frozenset({
    "_Trial__unresolved_config", "_default_placement_group_factory", "_default_result_or_future", "_resources",
    "_restore_checkpoint_result", "_setup_default_resource", "_state_json", "config", "custom_dirname",
    "custom_trial_name", "evaluated_params", "experiment_tag", "export_formats", "extra_arg", "log_to_file",
    "max_failures", "placement_group_factory", "relative_logdir", "restore_path", "results", "status",
    "stopping_criterion", "storage", "stub", "trainable_name", "trial_dirname_creator", "trial_id",
    "trial_name_creator"})
# Trial fields raylm's searches leave at Tune's defaults: set, they name files (log_to_file
# appends the trial's output to a path; restore_path restores a checkpoint from one), names,
# or stop the trial (stopping_criterion: raylm's searches stop on nothing but ASHA's rungs).
TRIAL_DEFAULTS = {"log_to_file": [None, None], "export_formats": [], "restore_path": None, "custom_trial_name": None,
                  "custom_dirname": None, "trial_name_creator": None, "trial_dirname_creator": None,
                  "_restore_checkpoint_result": None, "stopping_criterion": {}}
TRIAL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # Tune's ids (825c8_00000): a run's name, one path segment
_SEGMENT = re.compile(r"[^/\\\x00]{1,255}")  # one path segment (and not . or ..)


def _data_refusal(where: str, what: str) -> UnsafeTuneStateError:
    return UnsafeTuneStateError(f"{where}: {what}, which raylm's searches never save (a tampered search state: "
                                f"start the search anew)")


def check_experiment_data(text, where: str, check_params=None) -> None:
    """UnsafeTuneStateError naming the file and field where the experiment state `text`
    (its pickles already checked) holds data raylm's searches never save: controller or
    trial attributes outside Ray 2.60's own, a trial id that is not one plain name (or is
    another trial's: raylm's run name for the trial), a field
    raylm leaves at Tune's default set, a trial folder outside the experiment's, artifact
    syncing on. `check_params(config, where)` raises for a trial config the search space
    does not draw."""
    doc = json.loads(text)
    runner = doc.get("runner_data", {})
    if not isinstance(runner, dict):
        raise _data_refusal(where, "runner_data that is not a JSON object")
    extra = sorted(set(runner) - RUNNER_FIELDS)
    if extra:
        raise _data_refusal(where, f"runner_data {extra[0]!r} (sets the controller's own attribute)")
    ids = set()
    for i, (state_text, meta_text) in enumerate(doc.get("trial_data", [])):
        state = json.loads(state_text)
        field = f"{where}: trial_data[{i}]"
        extra = sorted(set(state) - TRIAL_FIELDS)
        if extra:
            raise _data_refusal(field, f"{extra[0]!r} (sets the trial's own attribute)")
        if "trial_id" in state and not (isinstance(state["trial_id"], str) and TRIAL_ID.fullmatch(state["trial_id"])):
            raise _data_refusal(field, f"trial_id={state['trial_id']!r} (not one plain name)")
        if state.get("trial_id") in ids:  # two trials would train in one run directory
            raise _data_refusal(field, f"trial_id={state['trial_id']!r} a second time")
        ids.add(state.get("trial_id"))
        for key, default in TRIAL_DEFAULTS.items():
            if key in state and state[key] != default:
                raise _data_refusal(field, f"{key}={state[key]!r}")
        if not _folder(state.get("relative_logdir")):
            raise _data_refusal(field, f"relative_logdir={state['relative_logdir']!r} (not one folder in the "
                                       f"experiment's)")
        if not _own_folder(state.get("relative_logdir"), state.get("trial_id")):
            raise _data_refusal(field, f"relative_logdir={state['relative_logdir']!r} (not trial "
                                       f"{state.get('trial_id')}'s own folder)")
        if check_params is not None and "config" in state:
            check_params(state["config"], f"{field} config")
        if "storage" in state:
            _check_trial_storage(state["storage"], f"{field} storage", state.get("trial_id"))
        _check_last_result(meta_text, state, f"{field} run metadata")


def _own_folder(name, trial_id) -> bool:
    """None (not started), or a folder Tune names for this trial: `<trainable>_<trial id>_<tag>_<date>`
    (raylm sets no trial_dirname_creator). Another trial's folder gave this one its reported
    history: results ranked it with another trial's metrics."""
    return name is None or isinstance(trial_id, str) and f"_{trial_id}_" in name


def _check_last_result(meta_text: str, state: dict, where: str) -> None:
    """The trial's last result (run metadata, which Tune keeps beside the trial's own data):
    what raylm's results take each trial's reported config and id from. Tune writes the trial's
    own into it (`Trainable.get_auto_filled_metrics`); another config there went into
    results.csv and best.yaml, keys the space cannot search included."""
    meta = json.loads(meta_text)
    if not isinstance(meta, dict):
        raise _data_refusal(where, "that is not a JSON object")
    last = meta.get("last_result", {})
    if not isinstance(last, dict):
        raise _data_refusal(where, "a last_result that is not a JSON object")
    if "trial_id" in last and last["trial_id"] != state.get("trial_id"):
        raise _data_refusal(where, f"last_result trial_id={last['trial_id']!r} (not the trial's own id)")
    if "config" in last and last["config"] != state.get("config"):
        raise _data_refusal(where, f"last_result config={_short_json(last['config'])} (not the trial's own config)")


def _short_json(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 200 else text[:200] + "..."


def _check_trial_storage(value, where: str, trial_id=None) -> None:
    """The trial's StorageContext (a checked pickle, loaded here by an unpickler that finds
    only allowed globals): its trial folder one plain name in the experiment's, the trial's
    own, no artifact sync."""
    obj = _load_checked(_unhex(value.get("value") if isinstance(value, dict) else None, where), where)
    name = getattr(obj, "trial_dir_name", None)
    if not _folder(name):
        raise _data_refusal(where, f"trial_dir_name={name!r} (not one folder in the experiment's)")
    if not _own_folder(name, trial_id):
        raise _data_refusal(where, f"trial_dir_name={name!r} (not trial {trial_id}'s own folder)")
    sync = getattr(obj, "sync_config", None)
    if getattr(sync, "sync_artifacts", False):
        raise _data_refusal(where, "sync_config.sync_artifacts=True (uploads the trial's working directory)")


def _folder(name) -> bool:
    """None (a trial not started yet: Tune names its folder as it starts it) or one plain name."""
    return name is None or isinstance(name, str) and bool(_SEGMENT.fullmatch(name)) and name not in (".", "..")


class _AllowedOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:  # already refused by check_pickle; kept as a second lock
            raise _refuse(self.where, f"{module}.{name}")
        return super().find_class(module, name)


def _load_checked(data: bytes, where: str):
    check_pickle(data, where)
    unpickler = _AllowedOnly(io.BytesIO(data))
    unpickler.where = where
    try:
        return unpickler.load()
    except UnsafeTuneStateError:
        raise
    except Exception as e:
        raise UnsafeTuneStateError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- state that checks
#
# What raylm's searches hand Tune, made so that Tune's state of them pickles by reference:
# a class defined inside a function, or any function that is not a module's own attribute
# (a lambda, a nested function), is pickled by value, as code, which no allowlist can let
# through. Ray is imported here: this module is imported only when a search runs or resumes.

import copy  # noqa: E402

import ray.tune  # noqa: E402
from ray.tune.experiment.config_parser import _make_parser  # noqa: E402
from ray.tune.search.basic_variant import BasicVariantGenerator as _BasicVariantGenerator  # noqa: E402


class BasicVariantGenerator(_BasicVariantGenerator):
    """Tune's random and grid search, whose saved state leaves out each trial iterator's
    argparse parser (rebuilt on restore): argparse keeps a nested function in it, which
    cloudpickle writes as code, into every search's `basic-variant-state-*.json`."""

    def get_state(self):
        state = super().get_state()
        if state:
            state["_iterators"] = [_without_parser(it) for it in state.get("_iterators", [])]
        return state

    def set_state(self, state):
        for it in state.get("_iterators", []):
            if getattr(it, "parser", None) is None:
                it.parser = _make_parser()
        super().set_state(state)


def _without_parser(iterator):
    out = copy.copy(iterator)
    out.parser = None
    return out


class TrialLog(ray.tune.Callback):
    """A Tune callback that prints each trial's start, evaluations and end, one line each.
    It pickles (into tuner.pkl) without its `log` function, which may be any callable, so
    code: a restored search logs through raylm's own log."""

    def __init__(self, log=None, train=None):
        if log is None:
            from raylm.pipeline import log
        self.log, self.train = log, train

    def __reduce__(self):
        return TrialLog, (None, self.train)

    def on_trial_start(self, iteration, trials, trial, **info):
        from raylm.tune import _params_text

        self.log(f"tune: trial {trial.trial_id} started: {_params_text(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "val_loss" in result:
            self.log(f"tune: trial {trial.trial_id} step {result.get('step')}: val loss {result['val_loss']:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        from raylm.tune import _ended

        step = trial.last_result.get("step") or 0
        self.log(f"tune: trial {trial.trial_id} {_ended(step, self.train, trial.config)} at step {step}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.log(f"tune: trial {trial.trial_id} failed")
