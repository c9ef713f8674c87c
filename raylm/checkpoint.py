"""Checkpoints: DCP shards plus a commit marker, in the run's storage (local or s3://).

Layout of one checkpoint, `<run_dir>/ckpt-00000200/`:
    __0_0.distcp, __1_0.distcp, ...   each rank's shards of model + optimizer (DCP)
    .metadata                         DCP's index (rank 0)
    meta.json                         step, data position, world size, config, tokenizer hash
    COMMITTED                         written last, after every rank's upload finished

Only a directory with COMMITTED counts: a save cut off halfway is invisible to resume,
which falls back to the newest complete one. DCP state dicts are keyed by parameter name,
not by rank, so a checkpoint written by N workers loads into M.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import pickle
import re
import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.futures import Future
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from raylm import storage
from raylm.config import S3Config

# Loading for inference or export reads a sharded checkpoint in one process, as intended;
# DCP warns about it on every load.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

PREFIX = "ckpt-"
COMMIT_MARKER = "COMMITTED"
META = "meta.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def step_of(name: str) -> int | None:
    """The step a checkpoint directory's name holds (`ckpt-00000004`: 4); None for another name."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def write_local(model, optimizer, meta: dict, local_dir: str, async_group=None, use_async: bool = False):
    """Every rank writes its own shards into its own `local_dir`; rank 0 adds the index and meta.

    With `use_async`, DCP copies the state to host memory now (the only part that blocks
    training) and writes the files in a background thread; the returned future completes when
    they are on disk. The background thread's collectives go through `async_group`, a group
    of its own, so they never interleave with training's collectives."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    os.makedirs(local_dir, exist_ok=True)
    if _rank() == 0:
        with open(os.path.join(local_dir, META), "w") as f:
            f.write(meta_json(meta))
    state = {"model": model_sd, "optim": optim_sd}
    if use_async:
        return dcp.async_save(state, checkpoint_id=local_dir, process_group=async_group,
                              no_dist=not dist.is_initialized())
    dcp.save(state, checkpoint_id=local_dir, no_dist=not dist.is_initialized())
    return None


def meta_json(meta: dict) -> str:
    """meta.json's text: strict JSON, as metrics.jsonl is. The metrics row it carries (the
    step's loss, NaN on a step the non-finite guard skipped) is written as that file writes it
    (`raylm.eval.report.row_json`: null, named under "non_finite"); Python's bare NaN made the
    whole file unreadable to jq, JavaScript or Go. Older checkpoints' NaN still loads (json.loads)."""
    from raylm.eval.report import row_json
    from raylm.eval.results import finite

    if isinstance(meta.get("metrics"), dict):
        meta = {**meta, "metrics": json.loads(row_json(meta["metrics"]))}
    return json.dumps(finite(meta), indent=1, allow_nan=False)


def commit(ckpt_uri: str, meta: dict, s3: S3Config | None = None, files: dict | None = None,
           flushed: bool = False, fence: Callable[[], None] | None = None) -> None:
    """Mark a checkpoint complete. Call on one rank, after every rank's files are in storage.
    `files` ({name: [size, sha256]}, from `file_digests` on every rank) is recorded in the
    marker, and loads check each file they read against it. `flushed`: each writer has made
    its files durable already (`make_durable`, in its upload thread), so only the directory's
    entries are left; otherwise every file is flushed here, before the marker. `fence`:
    called right before the marker, it raises where this process no longer holds the run
    (`raylm.run_lock.check_fence`)."""
    body = {"step": meta["step"], **({"files": dict(sorted(files.items()))} if files else {})}
    # On a local disk, the files reach it before the marker.
    storage.make_durable(ckpt_uri, s3, names=() if flushed else None)
    if fence is not None:
        fence()
    storage.write_text(storage.join(ckpt_uri, COMMIT_MARKER), json.dumps(body, indent=0), s3)
    # And the checkpoint's own entry in the run directory: retention deletes older checkpoints
    # next, and a crash must not keep those deletions while losing this checkpoint's creation.
    storage.make_durable(storage.parent(ckpt_uri), s3, names=())


def list_checkpoints(run_dir: str, s3: S3Config | None = None) -> list[tuple[int, str, bool]]:
    """(step, uri, complete) for every checkpoint directory under run_dir, oldest first."""
    found: dict[int, tuple[str, bool]] = {}
    if not storage.exists(run_dir, s3):
        return []
    for info in storage.list_files(run_dir, s3, pattern=False):
        try:
            rel = storage.relative(info.uri, run_dir)
        except ValueError:  # run_dir names a file (a run's record.json, say): it holds no checkpoints
            continue
        top, _, rest = rel.partition("/")
        m = _NAME.match(top)
        # Only the name raylm writes for a step counts: `ckpt-1/COMMITTED` beside an
        # unfinished `ckpt-00000001/` must not make that one look complete.
        if not m or top != checkpoint_name(int(m.group(1))):
            continue
        step = int(m.group(1))
        uri, done = found.get(step, (storage.join(run_dir, top), False))
        found[step] = (uri, done or rest == COMMIT_MARKER)
    return [(s, u, d) for s, (u, d) in sorted(found.items())]


def latest_complete(run_dir: str, s3: S3Config | None = None) -> str | None:
    complete = [u for _, u, done in list_checkpoints(run_dir, s3) if done]
    return complete[-1] if complete else None


def read_meta(ckpt_uri: str, s3: S3Config | None = None) -> dict:
    uri = storage.join(ckpt_uri, META)
    return _parse_meta(storage.read_bytes(uri, s3), uri)


def _parse_meta(text: str | bytes, where: str) -> dict:
    try:
        # Bytes, decoded here: a damaged file that is not UTF-8 is a one-line error too
        # (UnicodeDecodeError is a ValueError), not a traceback from decoding before the parse.
        meta = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:  # '[[[[...' nested past the parser's limit: altered
        raise CheckpointError(f"{where}: not valid JSON (nested too deeply to read)") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{where}: not a raylm checkpoint's meta.json (no 'step')")
    # The fields raylm writes, checked where present (older checkpoints lack some): their
    # readers (resume, generate, eval, export) use them as these types, and a damaged or
    # hand-edited file would otherwise fail there with a traceback.
    for key, ok, what in _META_FIELDS:
        if key in meta and not ok(meta[key]):
            raise CheckpointError(f"{where}: {key!r} is {_short(meta[key])}, expected {what} (a damaged or "
                                  f"altered meta.json)")
    sections = _config_sections()
    for key, value in (meta.get("config") or {}).items():
        if key in sections and not isinstance(value, dict):
            raise CheckpointError(f"{where}: 'config.{key}' is {_short(value)}, expected a mapping (a damaged or "
                                  f"altered meta.json)")
    return meta


def _count(at_least: int):
    return lambda v: type(v) is int and v >= at_least


_META_FIELDS = (
    ("step", _count(0), "an integer >= 0"),
    ("consumed_blocks", _count(0), "an integer >= 0"),
    ("world_size", _count(1), "an integer >= 1"),
    ("global_batch_size", _count(1), "an integer >= 1"),
    ("train_seconds", lambda v: type(v) in (int, float), "a number"),
    ("guards", lambda v: isinstance(v, dict), "a mapping"),
    ("config", lambda v: isinstance(v, dict), "a mapping"),
    # Read as "not recorded" when empty or null.
    ("tokenizer", lambda v: v is None or isinstance(v, str), "a string"),
    ("tokenizer_sha256", lambda v: v is None or isinstance(v, str), "a string"),
    ("data_key", lambda v: v is None or isinstance(v, str), "a string"),
)


def _config_sections() -> set[str]:
    """The config's keys whose values are sections (model, data, tokenizer, ...)."""
    from raylm.config import Config, to_dict

    return {k for k, v in to_dict(Config()).items() if isinstance(v, dict)}


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


from raylm.errors import CheckpointError  # noqa: E402  (defined with raylm's other error types)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to unpickle something other than checkpoint metadata."""


def _metadata_globals() -> dict[tuple[str, str], object]:
    """Exactly the (module, name) pairs that DCP's `.metadata` pickle names: its own
    dataclasses, torch's dtypes and sizes, the layout and path helpers. Names are compared
    whole, so a dotted name (`torch.distributed.checkpoint.filesystem` / `os.system`, which
    pickle protocol 4 would resolve through that module's `import os`) is refused."""
    from torch.distributed.checkpoint import filesystem as dcp_fs
    from torch.distributed.checkpoint import metadata as dcp_md

    found = {("torch.distributed.checkpoint.metadata", n): getattr(dcp_md, n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    found[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = dcp_fs._StorageInfo
    found[("torch", "Size")] = torch.Size
    found[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    found[("pathlib", "PosixPath")] = pathlib.PosixPath  # StorageMeta.checkpoint_id
    found.update({("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    return found


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves globals only from `_metadata_globals()`, so every REDUCE, NEWOBJ or BUILD can
    only ever call one of those classes; persistent ids are refused by pickle itself."""

    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path
        self.allowed = _metadata_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(f"{self.path}: refuses to unpickle {module}.{name}; "
                                        f"checkpoint metadata never needs it (a tampered file?)") from None


def _load_metadata(path: str, sizes: dict[str, int], data: bytes | None = None):
    """DCP's index from `path` (or its bytes, `data`, already read from storage), refused
    unless it is plain checkpoint metadata whose entries all lie inside the checkpoint's own
    files (`sizes`: file name -> bytes in storage)."""
    import io

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with (open(path, "rb") if data is None else io.BytesIO(data)) as f:
            metadata = _MetadataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or garbled: any of a dozen exception types
        raise CheckpointError(f"{path}: not readable checkpoint metadata ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'truncated'})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path}: not DCP checkpoint metadata (found {type(metadata).__name__})")
    for index, info in metadata.storage_data.items():
        if not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{path}: entry {getattr(index, 'fqn', index)!r} is not a file range")
        name = info.relative_path
        if not isinstance(name, str) or name not in sizes:
            # Also what keeps an index from pointing at ../../elsewhere or /etc/passwd.
            raise CheckpointError(f"{path}: entry {index.fqn!r} names {name!r}, which is not a file of this checkpoint")
        if info.transform_descriptors:
            raise CheckpointError(f"{path}: entry {index.fqn!r} asks for stream transforms "
                                  f"{list(info.transform_descriptors)}; raylm never writes them")
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0):
            raise CheckpointError(f"{path}: entry {index.fqn!r} has a bad range ({info.offset}, {info.length})")
        if info.offset + info.length > sizes[name]:
            raise CheckpointError(f"{path.rsplit('/', 1)[0]}/{name}: truncated "
                                  f"({sizes[name]} bytes; the index needs {info.offset + info.length})")
    return metadata


# --------------------------------------------------------------------------- integrity


def file_digests(local_dir: str) -> dict[str, list]:
    """{relative path: [size, sha256]} of one rank's checkpoint files: what storage must hold
    before commit, and what the commit marker records so that a load can tell a shard that
    was cut short or altered in storage from a good one."""
    out = {}
    for root, _, names in os.walk(local_dir):
        for n in names:
            path = os.path.join(root, n)
            out[os.path.relpath(path, local_dir)] = [os.path.getsize(path), _sha256(path)]
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _committed_files(local_dir: str) -> dict[str, list]:
    """What the commit marker records ({} for checkpoints committed before it recorded files)."""
    path = os.path.join(local_dir, COMMIT_MARKER)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{local_dir}: no {COMMIT_MARKER} marker; an incomplete checkpoint is never loaded") from None
    return _parse_committed(text, path)


def _parse_committed(text: str | bytes, path: str) -> dict[str, list]:
    try:
        files = json.loads(text).get("files", {})
    except (ValueError, AttributeError, RecursionError):
        raise CheckpointError(f"{path}: not a commit marker (expected JSON with the step and files)") from None
    if not isinstance(files, dict) or not all(isinstance(v, list) and len(v) == 2 for v in files.values()):
        raise CheckpointError(f"{path}: malformed file list")
    return files


class SafeReader(dcp.FileSystemReader):
    """DCP's reader for a local checkpoint directory, hardened:
    - the index (`.metadata`) unpickles through an exact allowlist and must only name byte
      ranges inside the checkpoint's own files;
    - every file this rank reads is checked against the size and sha256 that the commit
      marker recorded, before a byte of it is deserialised;
    - any failure is one `CheckpointError` naming the file."""

    def __init__(self, path: str):
        super().__init__(path)
        self.local_dir = str(path)
        self.committed = _committed_files(self.local_dir)
        self.sizes = {n: os.path.getsize(os.path.join(self.local_dir, n)) for n in os.listdir(self.local_dir)
                      if os.path.isfile(os.path.join(self.local_dir, n))}
        self.verified: set[str] = set()

    def _verify(self, name: str) -> None:
        if name in self.verified:
            return
        path = os.path.join(self.local_dir, name)
        if name not in self.sizes:
            raise CheckpointError(f"{path}: missing")
        expected = self.committed.get(name)
        if expected is not None:
            size, digest = expected
            if self.sizes[name] != size:
                raise CheckpointError(f"{path}: {self.sizes[name]} bytes, but {size} were committed (truncated "
                                      f"or replaced; load an earlier checkpoint)")
            if _sha256(path) != digest:
                raise CheckpointError(f"{path}: content differs from the sha256 recorded at commit (corrupt or "
                                      f"altered; load an earlier checkpoint)")
        self.verified.add(name)

    def read_metadata(self, *args, **kwargs):
        path = str(self._get_metadata_path(kwargs.get("rank")))
        self._verify(os.path.basename(path))
        metadata = _load_metadata(path, self.sizes)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        planner = _weights_only_bytes(planner)
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        for name, items in per_file.items():
            self._verify(name)
            path = os.path.join(self.local_dir, name)
            try:
                super().read_data(dataclasses.replace(plan, items=items), planner).wait()
            except UnsafeCheckpointError as e:  # from SafePlanner: name the file too
                raise UnsafeCheckpointError(f"{path}: {e}") from None
            except pickle.UnpicklingError as e:  # DCP's own weights_only load of a tensor entry
                raise UnsafeCheckpointError(f"{path}: a tensor entry {_refusal(e)}") from None
            except Exception as e:
                raise CheckpointError(f"{path}: unreadable shard ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
        done: Future = Future()
        done.set_result(None)
        return done


def _refusal(e: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only refusal that says what was refused (its first line
    advises turning weights_only off, which is exactly what must not happen here)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    what = next((x for x in lines if x.startswith(("Unsupported", "Trying to", "Can only"))), lines[-1] if lines else "")
    return f"refuses to unpickle ({what.split('. Please use')[0]})"


class SafePlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) load with `weights_only=True`:
    primitives, containers and tensors only."""

    def load_bytes(self, read_item, value) -> None:
        try:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"entry {read_item.dest_index.fqn} {_refusal(e)}") from None


class _WeightsOnlyBytes:
    """Another load planner (DCP's default, as `_load_state_dict_from_keys` uses, unpickles
    non-tensor entries with `weights_only=False`), given each non-tensor entry only after a
    weights-only load of it, re-serialised from what that load accepted."""

    def __init__(self, planner):
        self._planner = planner

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value) -> None:
        import io

        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"entry {read_item.dest_index.fqn} {_refusal(e)}") from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


def _weights_only_bytes(planner):
    """`planner` as it is if it loads non-tensor entries weights-only already (SafePlanner),
    else wrapped so that it does: the readers' guarantee must not hang on the caller's planner."""
    return planner if isinstance(planner, (SafePlanner, _WeightsOnlyBytes)) else _WeightsOnlyBytes(planner)


class RangedReader(dcp.StorageReader):
    """DCP's reader straight from the checkpoint's storage, local or s3://, with nothing
    downloaded first: each rank reads only the byte ranges its load plan names (its shards of
    the entries its state dict asks for: a weights-only load never touches an optimizer
    entry), one ranged read (an S3 GET with a Range header) per run of adjacent entries.

    The guarantees of `SafeReader`, adapted to partial reads:
    - the index (`.metadata`) is read whole, checked against the size and sha256 the commit
      marker recorded, unpickled through the exact allowlist, and must name only byte ranges
      inside the checkpoint's own files;
    - every shard file a rank reads from must have the committed size; a rank that reads a
      file whole (a load on the same workers that saved it, for one) also checks its sha256
      before a byte of it is deserialised, as does `meta.json`;
    - tensor and non-tensor entries load with `torch.load(weights_only=True)`;
    - any failure is one `CheckpointError` naming the file.
    The trade-off, for object storage only: a byte altered inside a shard that a rank reads
    only in part is not caught by a digest (the commit marker records one per file, not per
    range, and checking it would mean fetching the whole file); sizes, the verified index and
    the weights-only unpickler still refuse a truncated, replaced or malicious file. A local
    checkpoint's files are hashed whole whatever is read of them (a disk read, no copy).
    `bytes_read`, `requests` and `reads` record what this reader fetched from storage.
    Rank 0's reads from object storage of `progress_min_bytes` or more report their progress
    on stderr (a 7B model's shards take minutes to fetch)."""

    progress_min_bytes = storage.PROGRESS_MIN_BYTES
    progress_every_s: float | None = None  # raylm.progress's default

    def __init__(self, uri: str, s3: S3Config | None = None):
        super().__init__()
        from torch.distributed.checkpoint.filesystem import _generate_uuid

        self.uri, self.s3 = uri.rstrip("/"), s3
        self.fs, self.root = storage.filesystem(self.uri, s3)
        self.load_id = _generate_uuid()
        self.storage_data: dict = {}
        self.bytes_read = self.requests = 0
        self.reads: list[tuple[str, int, int]] = []  # (file, offset, length) of every read
        self.verified: set[str] = set()
        try:
            marker = storage.read_bytes(storage.join(self.uri, COMMIT_MARKER), s3)
        except storage.StorageError as e:
            # Only a missing marker means an incomplete checkpoint; an endpoint that cannot be
            # reached, or access denied, is said as it is.
            if e.problem != "no such file or directory":
                raise
            raise CheckpointError(f"{self.uri}: no {COMMIT_MARKER} marker; an incomplete checkpoint is never "
                                  f"loaded") from None
        self.committed = _parse_committed(marker, storage.join(self.uri, COMMIT_MARKER))
        self.sizes = {storage.relative(i.uri, self.uri): i.size for i in storage.list_files(self.uri, s3, pattern=False)}

    def _where(self, name: str) -> str:
        return storage.join(self.uri, name)

    def _check_size(self, name: str) -> None:
        if name not in self.sizes:
            raise CheckpointError(f"{self._where(name)}: missing")
        expected = self.committed.get(name)
        if expected is not None and self.sizes[name] != expected[0]:
            raise CheckpointError(f"{self._where(name)}: {self.sizes[name]} bytes, but {expected[0]} were committed "
                                  f"(truncated or replaced; load an earlier checkpoint)")

    def _check_digest(self, name: str, data) -> None:
        expected = self.committed.get(name)
        if expected is not None and hashlib.sha256(data).hexdigest() != expected[1]:
            raise CheckpointError(f"{self._where(name)}: content differs from the sha256 recorded at commit "
                                  f"(corrupt or altered; load an earlier checkpoint)")
        self.verified.add(name)

    def _read(self, name: str, offset: int, length: int) -> bytes:
        path = f"{self.root}/{name}"
        with storage._errors(self._where(name), self.s3):
            with self.fs.open_input_file(path) as f:
                data = f.read_at(length, offset)
        if len(data) != length:
            raise CheckpointError(f"{self._where(name)}: read {len(data)} of {length} bytes at {offset} (truncated)")
        self.bytes_read += length
        self.requests += 1
        self.reads.append((name, offset, length))
        return data

    def read_whole(self, name: str) -> bytes:
        """A small file (`.metadata`, `meta.json`) in one read, its size and digest checked."""
        self._check_size(name)
        data = self._read(name, 0, self.sizes[name])
        self._check_digest(name, data)
        return data

    # DCP's StorageReader interface

    def reset(self, checkpoint_id=None) -> None:
        from torch.distributed.checkpoint.filesystem import _generate_uuid

        self.storage_data = {}
        self.load_id = _generate_uuid()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True  # constructed for one checkpoint; DCP only asks when it picks a reader itself

    def read_metadata(self, *args, **kwargs):
        name = ".metadata"
        metadata = _load_metadata(self._where(name), self.sizes, self.read_whole(name))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner):
        planner = _weights_only_bytes(planner)
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        progress = self._progress(plan)
        try:
            self._read_files(per_file, planner, progress)
        finally:
            if progress is not None:
                progress.close()
        done: Future = Future()
        done.set_result(None)
        return done

    def _progress(self, plan):
        """A Progress over the bytes this load plan reads, or None: a local checkpoint, a rank
        other than 0, or less than `progress_min_bytes`."""
        total = sum(self.storage_data[item.storage_index].length for item in plan.items)
        if not storage.is_s3(self.uri) or _rank() != 0 or total < self.progress_min_bytes:
            return None
        import sys

        from raylm.progress import Progress, to_stderr

        return Progress(f"load {storage.redact_url(self.uri)}", total, unit="MB", scale=1e6, log=to_stderr,
                        stream=sys.stderr, every_s=self.progress_every_s)

    def _read_files(self, per_file: dict, planner, progress) -> None:
        start_bytes = self.bytes_read
        for name, items in per_file.items():
            self._check_size(name)
            if not storage.is_s3(self.uri) and name not in self.verified and name in self.committed:
                # Local: hashing the whole file costs a disk read and no copy, so a local
                # checkpoint keeps SafeReader's full guarantee even for partial loads.
                if _sha256(os.path.join(self.root, name)) != self.committed[name][1]:
                    self._check_digest(name, b"")  # raises, naming the file
                self.verified.add(name)
            for start, data, run in self._runs(name, items):
                try:
                    for item in run:
                        info = self.storage_data[item.storage_index]
                        at = info.offset - start
                        self._load_item(item, memoryview(data)[at:at + info.length], planner)
                except UnsafeCheckpointError as e:  # from SafePlanner: name the file too
                    raise UnsafeCheckpointError(f"{self._where(name)}: {e}") from None
                except pickle.UnpicklingError as e:  # the weights_only load of a tensor entry
                    raise UnsafeCheckpointError(f"{self._where(name)}: a tensor entry {_refusal(e)}") from None
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{self._where(name)}: unreadable shard ({type(e).__name__}: "
                                          f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
                if progress is not None:
                    progress.update(self.bytes_read - start_bytes)

    def _runs(self, name: str, items: list):
        """(offset, bytes, items) per run of adjacent or overlapping entries, in file order;
        a run that is the whole file has its digest checked before anything is unpickled."""
        items = sorted(items, key=lambda i: self.storage_data[i.storage_index].offset)
        runs: list[list] = []
        for item in items:
            info = self.storage_data[item.storage_index]
            if runs and info.offset <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], info.offset + info.length)
                runs[-1][2].append(item)
            else:
                runs.append([info.offset, info.offset + info.length, [item]])
        for start, end, run in runs:
            data = self._read(name, start, end - start)
            if start == 0 and end == self.sizes[name] and name not in self.verified:
                self._check_digest(name, data)
            yield start, data, run

    @staticmethod
    def _load_item(item, view, planner) -> None:
        import io

        from torch.distributed.checkpoint.filesystem import narrow_tensor_by_index
        from torch.distributed.checkpoint.planner import LoadItemType

        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(view))
            return
        tensor = torch.load(io.BytesIO(view), map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise CheckpointError(f"entry {item.dest_index.fqn}: shape {tuple(tensor.size())} in the checkpoint, "
                                  f"{tuple(target.size())} in the model")
        target.copy_(tensor)
        planner.commit_tensor(item, target)


def _dcp_load(state: dict, ckpt_uri: str, s3: S3Config | None = None, one_process: bool = False) -> dict:
    """Load `state` from a checkpoint in storage (local or s3://), each rank reading only the
    ranges it needs; returns its verified meta.json. `one_process`: this process alone
    loads, with no collectives, even inside a process group."""
    reader = RangedReader(ckpt_uri, s3)
    reader.read_metadata()  # refuse a tampered or damaged index with its own message
    try:
        try:
            dcp.load(state, storage_reader=reader, planner=SafePlanner(),
                     no_dist=one_process or not dist.is_initialized())
        except CheckpointException as e:  # DCP wraps each rank's error, with its traceback, in the text
            errors = [exc for exc, _ in e.failures.values()]
            raise next((x for x in errors if isinstance(x, CheckpointError)), errors[0] if errors else e) from None
    except (ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError) or not str(e).startswith(_MISFIT):
            raise
        raise CheckpointError(f"{reader.uri}: does not fit this model: {str(e).splitlines()[0]} (written for "
                              f"another model shape or raylm version; load it with the config in its "
                              f"{META})") from None
    meta = _parse_meta(reader.read_whole(META), reader._where(META))
    _last_reader.append(reader)
    del _last_reader[:-1]
    return meta


# How DCP's load planner words a state dict that does not match the checkpoint's entries.
_MISFIT = ("Missing key in checkpoint state_dict", "Size mismatch between saved")

# The reader of this process's latest load, for benchmarks/checkpoint_io.py's byte counts.
_last_reader: list[RangedReader] = []


def load(model, optimizer, ckpt_uri: str, s3: S3Config | None = None) -> dict:
    """Load shards into a (possibly sharded) model and optimizer; returns meta.json. Each rank
    reads its own shards' byte ranges straight from storage (RangedReader)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    meta = _dcp_load(state, ckpt_uri, s3)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta


def model_entries(ckpt_uri: str, s3: S3Config | None = None) -> dict[str, torch.Size]:
    """{parameter name: shape} of the model's entries in a checkpoint's own index (`.metadata`,
    read and checked as a load reads it: the committed size and sha256, the unpickling
    allowlist, ranges inside the checkpoint's files), without reading a shard: what a loader
    compares its model with before allocating it. An entry whose stored bytes could not hold
    the shape it claims is refused, so a shape here is one the files really back."""
    reader = RangedReader(ckpt_uri, s3)
    metadata = reader.read_metadata()
    stored: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out = {}
    for fqn, entry in metadata.state_dict_metadata.items():
        if not fqn.startswith("model.") or not isinstance(entry, TensorStorageMetadata):
            continue
        size = torch.Size(entry.size)
        need = size.numel() * entry.properties.dtype.itemsize
        if stored.get(fqn, 0) < need:
            raise CheckpointError(f"{reader._where('.metadata')}: entry {fqn!r} claims {tuple(size)} "
                                  f"{str(entry.properties.dtype).removeprefix('torch.')} ({need} bytes), but the "
                                  f"checkpoint stores {stored.get(fqn, 0)} bytes of it (a damaged or altered index)")
        out[fqn.removeprefix("model.")] = size
    return out


def check_model_shapes(model, ckpt_uri: str, s3: S3Config | None = None,
                       entries: dict[str, torch.Size] | None = None) -> None:
    """Refuse a model (built on meta: nothing allocated yet) whose parameters differ from the
    checkpoint's entries (`model_entries`, read here unless given), in one line naming the
    checkpoint's meta.json (whose config the model was built from) and the first differing
    tensor: a mismatched or altered meta.json must not make a loader allocate the model it
    claims (a dim of 10^6 is terabytes) before the weights are compared."""
    saved = model_entries(ckpt_uri, s3) if entries is None else entries
    where = storage.join(ckpt_uri, META)
    own = {name: t.shape for name, t in model.state_dict().items()}
    for name, shape in own.items():
        if name not in saved:
            problem = f"{name} {tuple(shape)} in the model is not in the checkpoint"
        elif saved[name] != shape:
            problem = f"{name} is {tuple(shape)} in the model, {tuple(saved[name])} in the checkpoint"
        else:
            continue
        break
    else:
        extra = next((n for n in saved if n not in own), None)
        if extra is None:
            return
        problem = f"{extra} {tuple(saved[extra])} in the checkpoint is not in the model"
    raise CheckpointError(f"{where}: its config's model does not match the checkpoint's weights: {problem} "
                          f"(a meta.json from another checkpoint, or altered)")


def load_model_weights(model, ckpt_uri: str, s3: S3Config | None = None) -> dict:
    """Model weights only, into a plain single-process model: for eval, export and serving.
    Only the model's entries are read; the optimizer's bytes never leave storage."""
    sd = {"model": model.state_dict()}
    meta = _dcp_load(sd, ckpt_uri, s3, one_process=True)
    model.load_state_dict(sd["model"])
    return meta


def apply_retention(run_dir: str, keep: int, s3: S3Config | None = None) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than
    the newest complete one. The newest complete checkpoint is never deleted."""
    ckpts = list_checkpoints(run_dir, s3)
    complete = [(s, u) for s, u, d in ckpts if d]
    if not complete:
        return []
    keep_uris = {u for _, u in complete[-max(1, keep):]}
    newest_step = complete[-1][0]
    doomed = [u for s, u, d in ckpts if u not in keep_uris and (d or s < newest_step)]
    for uri in doomed:
        # The marker first: a deletion cut short must not leave a complete-looking checkpoint
        # with shards missing (the newest one's deletion, by hand, would fall back to it).
        storage.delete(storage.join(uri, COMMIT_MARKER), s3)
        storage.delete(uri, s3)
    return doomed


def full_model_state(model) -> dict[str, torch.Tensor]:
    """Gather the full, unsharded weights onto CPU (every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
