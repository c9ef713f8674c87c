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

import json
import os
import pickle
import re
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from raylm import storage
from raylm.config import S3Config

PREFIX = "ckpt-"
COMMIT_MARKER = "COMMITTED"
META = "meta.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


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
            json.dump(meta, f, indent=1)
    state = {"model": model_sd, "optim": optim_sd}
    if use_async:
        return dcp.async_save(state, checkpoint_id=local_dir, process_group=async_group,
                              no_dist=not dist.is_initialized())
    dcp.save(state, checkpoint_id=local_dir, no_dist=not dist.is_initialized())
    return None


def commit(ckpt_uri: str, meta: dict, s3: S3Config | None = None) -> None:
    """Mark a checkpoint complete. Call on one rank, after every rank's files are in storage."""
    storage.write_text(storage.join(ckpt_uri, COMMIT_MARKER), json.dumps({"step": meta["step"]}), s3)


def list_checkpoints(run_dir: str, s3: S3Config | None = None) -> list[tuple[int, str, bool]]:
    """(step, uri, complete) for every checkpoint directory under run_dir, oldest first."""
    found: dict[int, tuple[str, bool]] = {}
    if not storage.exists(run_dir, s3):
        return []
    for info in storage.list_files(run_dir, s3):
        rel = info.uri[len(run_dir.rstrip("/")) + 1:]
        top, _, rest = rel.partition("/")
        m = _NAME.match(top)
        if not m:
            continue
        step = int(m.group(1))
        uri, done = found.get(step, (storage.join(run_dir, top), False))
        found[step] = (uri, done or rest == COMMIT_MARKER)
    return [(s, u, d) for s, (u, d) in sorted(found.items())]


def latest_complete(run_dir: str, s3: S3Config | None = None) -> str | None:
    complete = [u for _, u, done in list_checkpoints(run_dir, s3) if done]
    return complete[-1] if complete else None


def read_meta(ckpt_uri: str, s3: S3Config | None = None) -> dict:
    return json.loads(storage.read_text(storage.join(ckpt_uri, META), s3))


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to unpickle something other than checkpoint metadata."""


# What DCP's `.metadata` pickle legitimately names: its own dataclasses, torch's dtype/size
# types, paths and plain containers. Anything else (os.system, subprocess, eval, ...) is refused.
_SAFE_TORCH = {"Size", "dtype", "layout", "memory_format", "device", *[
    n for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)]}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str):
        ok = (module.startswith("torch.distributed.checkpoint.")
              or (module == "torch" and name in _SAFE_TORCH)
              or (module == "torch.serialization" and name == "_get_layout")
              or (module == "collections" and name == "OrderedDict")
              or (module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath",
                                                   "PureWindowsPath"))
              or (module == "builtins" and name in ("set", "frozenset", "slice", "complex")))
        if not ok:
            raise UnsafeCheckpointError(f"{self.path}: refuses to unpickle {module}.{name}; "
                                        f"checkpoint metadata never needs it (a tampered file?)")
        return super().find_class(module, name)


class SafeReader(dcp.FileSystemReader):
    """DCP's reader, with its metadata unpickled through an allowlist."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f, str(path)).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) load with `weights_only=True`:
    primitives, containers and tensors only."""

    def load_bytes(self, read_item, value) -> None:
        try:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"checkpoint entry {read_item.dest_index.fqn}: {str(e).splitlines()[0]}") from None


def _dcp_load(state: dict, local_dir: str) -> None:
    SafeReader(local_dir).read_metadata()  # refuse a tampered index with its own message
    dcp.load(state, storage_reader=SafeReader(local_dir), planner=SafePlanner(), no_dist=not dist.is_initialized())


def load(model, optimizer, ckpt_uri: str, s3: S3Config | None = None) -> dict:
    """Load shards into a (possibly sharded) model and optimizer; returns meta.json.

    Each rank reads from its own local copy: ranks sharing one download directory race on
    DCP's index file."""
    with _local_copy(ckpt_uri, s3) as local:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        _dcp_load(state, local)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        with open(os.path.join(local, META)) as f:
            return json.load(f)


def load_model_weights(model, ckpt_uri: str, s3: S3Config | None = None) -> dict:
    """Model weights only (no optimizer), into a plain single-process model: for eval,
    export and serving."""
    with _local_copy(ckpt_uri, s3) as local:
        sd = {"model": model.state_dict()}
        _dcp_load(sd, local)
        model.load_state_dict(sd["model"])
        with open(os.path.join(local, META)) as f:
            return json.load(f)


class _local_copy:
    def __init__(self, uri: str, s3: S3Config | None):
        self.uri, self.s3, self.tmp = uri, s3, None

    def __enter__(self) -> str:
        if not storage.is_s3(self.uri):
            return self.uri
        self.tmp = tempfile.mkdtemp(prefix="raylm-ckpt-")
        storage.download_dir(self.uri, self.tmp, self.s3)
        return self.tmp

    def __exit__(self, *exc) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


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
        storage.delete(uri, s3)
    return doomed


def full_model_state(model) -> dict[str, torch.Tensor]:
    """Gather the full, unsharded weights onto CPU (every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
