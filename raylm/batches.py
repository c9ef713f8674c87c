"""What a rank trains on next: global batches cut into this rank's micro-batches.

The data position is a count of consumed blocks, and a step takes one fixed global batch, so
a run resumed on any number of workers continues at the same global token offset
(`RankBatches`). A small training set is kept in host memory after its first pass and
reshuffled each later epoch (`reshuffled`), the blocks left after its last full global batch
included; micro-batches go to the device as they are used
(`to_device`, `DeviceBatches`). Plain torch: the Ray Train worker (raylm.train_ray) and the
loop without Ray (raylm.train.train_local) feed `fit` through the same classes.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch

from raylm.config import TrainConfig
from raylm.errors import ConfigError, DataError


Batch = dict[str, torch.Tensor]  # one column per name, rows aligned: tokens, loss_mask, chosen, ...


def reshuffled(batches: list[Batch], seed: int, epoch: int) -> list[Batch]:
    """An in-memory training set's full global batches for `epoch`. `batches` is the whole set
    in its prepared order, cut into global batches; the last may be short: the N mod G rows
    after the last full one. Epoch 0 is the prepared order, short batch left out. Each later
    epoch is a permutation of all N rows seeded by (seed, epoch), one permutation for every
    column, of which the last N mod G rows are left for that epoch only: with a fixed
    remainder, those blocks would never be trained in any epoch. Repeating one order every
    epoch teaches the model where each block sits in it: on a 1 MB corpus trained for 6
    epochs, validation loss swung by 0.06 nats with where in the epoch the run stopped.
    An epoch has N // G batches whatever its order, so a block count maps to the same
    (epoch, step) in every epoch (RankBatches)."""
    if not batches:
        return []
    # The first batch is full: a set smaller than one global batch never trains (RankBatches).
    size = len(next(iter(batches[0].values())))
    if epoch == 0:
        return [b for b in batches if len(next(iter(b.values()))) == size]
    rows = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    n = len(next(iter(rows.values())))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    # The kept batches live on the host (RankBatches moves micro-batches), but index on the
    # rows' own device whatever it is: a CPU permutation cannot index a CUDA tensor.
    perm = perm.to(next(iter(rows.values())).device)
    return [{k: v[perm[i:i + size]] for k, v in rows.items()} for i in range(0, n - size + 1, size)]


def to_device(batch: Batch, device) -> Batch:
    """Token columns as long and masks as bool, on the device; precomputed log-probabilities
    stay float32. To CUDA, each column is copied from pinned (page-locked) host memory and
    asynchronously, so the copy overlaps the previous micro-batch's compute; the dtype is
    converted on the device. Elsewhere pinning would only cost a copy."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        dtype = torch.bool if k.endswith("mask") else torch.float32 if v.is_floating_point() else torch.long
        if cuda and v.device.type == "cpu" and not v.is_pinned():
            v = v.pin_memory()
        out[k] = v.to(device, dtype=dtype, non_blocking=cuda)
    return out


class DeviceBatches:
    """Micro-batches kept on the host that go to `device` one at a time as they are iterated,
    so a cache of them (the validation rows) never holds device memory between uses."""

    def __init__(self, host: list[Batch], device):
        self.host, self.device = host, device

    def __len__(self) -> int:
        return len(self.host)

    def __iter__(self) -> Iterator[Batch]:
        return (Padding(to_device(b, self.device)) if isinstance(b, Padding) else to_device(b, self.device)
                for b in self.host)


class Padding(dict):
    """A validation micro-batch that a rank runs only so that it makes as many forward passes
    as every other rank (FSDP's collectives wait for all of them): real rows, whose forward
    pass runs and whose loss and units `raylm.train.evaluate` counts as nothing."""


def is_padding(batch) -> bool:
    return isinstance(batch, Padding)


class RankBatches:
    """This rank's micro-batches for each optimizer step, cut from a stream of global batches.

    The stream yields global batches (a dict of columns, global_batch rows each: packed
    blocks, SFT rows with their loss mask, DPO pairs) in a fixed order; a step uses
    one global batch, and micro-step a of rank r takes rows [(a * world + r) * micro, ...).
    Because the global batch is fixed and the position is a count of blocks, a run resumed
    on a different number of workers continues at the same global token offset.
    blocks_per_epoch=None (a raw-text stream) learns the epoch's length at the end of the
    first full pass; a resumed run that is past it skips through that pass first."""

    def __init__(self, epoch_stream: Callable[[int], Iterator[Batch]], global_batch: int,
                 micro: int, rank: int, world: int, blocks_per_epoch: int | None, consumed: int, device):
        if global_batch % (micro * world):
            raise ConfigError(f"train.global_batch_size={global_batch} is not divisible by "
                             f"train.micro_batch_size * workers = {micro} * {world}")
        self.stream, self.G, self.micro, self.rank, self.world = epoch_stream, global_batch, micro, rank, world
        self.steps_per_epoch = None if blocks_per_epoch is None else blocks_per_epoch // global_batch
        if self.steps_per_epoch == 0:
            self._too_small(blocks_per_epoch)
        self.consumed, self.device, self.wait_s = consumed, device, 0.0

    def _too_small(self, blocks: int):
        raise DataError(f"the dataset has {blocks} training blocks, fewer than one global "
                         f"batch of {self.G}: lower train.global_batch_size or add data")

    @property
    def epoch(self) -> int:
        return self.consumed // (self.G * self.steps_per_epoch) if self.steps_per_epoch else 0

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            epoch, steps = self.epoch, self.steps_per_epoch
            skip = self.consumed // self.G if steps is None else (self.consumed // self.G) % steps
            it = self.stream(epoch)
            t0 = time.perf_counter()
            seen = 0
            for i, batch in enumerate(it):
                seen = i + 1
                if i < skip:
                    continue
                if steps is not None and i >= steps:
                    break
                self.wait_s += time.perf_counter() - t0
                rows = [slice((a * self.world + self.rank) * self.micro, (a * self.world + self.rank + 1) * self.micro)
                        for a in range(self.G // (self.micro * self.world))]
                self.consumed += self.G
                # Sliced on the host, then moved: only this rank's rows reach the device, and
                # the global batch (perhaps a kept epoch's) stays where it was.
                yield [to_device({k: v[r] for k, v in batch.items()}, self.device) for r in rows]
                t0 = time.perf_counter()
            if steps is None:  # the end of the first full pass: now the length is known
                if seen == 0:
                    self._too_small(0)
                self.steps_per_epoch = seen
            elif seen < steps:  # the shards hold fewer blocks than the manifest says
                raise DataError(f"epoch {epoch} ended after {seen} global batches; the manifest promised "
                                 f"{self.steps_per_epoch}: the prepared dataset is damaged, prepare it again")


def val_set_rows(tc: TrainConfig) -> int:
    """How many validation rows an evaluation covers, at most: train.eval_batches global
    batches, the first rows in the order every worker reads them (all of them where there
    are fewer). A function of the global batch, which a resume keeps, and of eval_batches;
    never of the worker count or the micro-batch, which may change on resume and between
    runs (or Tune trials) that are compared."""
    return tc.eval_batches * tc.global_batch_size


def rank_val_batches(rows: Batch, tc: TrainConfig, rank: int, world: int, device) -> DeviceBatches:
    """This rank's share of the validation set (`val_set_rows`: the first rows, in the order every
    worker reads them), cut into micro-batches. Every row counts once over all ranks, so
    the loss is the same for any worker count and micro-batch size, and a run resumed on
    other workers, or runs that differ only in how a step is computed, evaluate the same
    rows. Rank r takes the contiguous rows [n * r // world, n * (r + 1) // world) and cuts
    them into P micro-batches of near-equal size, P the same on every rank (FSDP's
    collectives deadlock otherwise): the fewest that keep each within train.micro_batch_size
    rows. Where a rank's share is shorter than P rows (fewer rows than workers, or
    micro_batch_size 1 on an uneven split), each missing micro-batch is a `Padding` one of
    one row, whose forward pass runs and counts for nothing. The rows stay on the host;
    each micro-batch goes to `device` as the evaluation reaches it."""
    n_rows = len(next(iter(rows.values())))
    if n_rows == 0:
        raise ConfigError("the validation split has no rows to evaluate on: raise data.val_fraction")
    n = min(n_rows, val_set_rows(tc))
    longest = -(-n // world)  # the largest share, ceil(n / world) rows
    passes = -(-longest // tc.micro_batch_size)
    lo, size = n * rank // world, n * (rank + 1) // world - n * rank // world
    out: list[Batch] = []
    for i in range(passes):
        start, end = lo + size * i // passes, lo + size * (i + 1) // passes
        if start < end:
            out.append({k: v[start:end] for k, v in rows.items()})
        else:
            out.append(Padding({k: v[:1] for k, v in rows.items()}))
    return DeviceBatches(out, device)


def concat(batches: list[Batch]) -> Batch:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def manifest_columns(manifest: dict) -> list[str]:
    """The batch columns of a prepared dataset: `tokens` for pre-training (and streams),
    what the manifest names for SFT and DPO data."""
    return list(manifest.get("columns", ["tokens"]))


def row_bytes(manifest: dict) -> int:
    return int(manifest.get("row_bytes", (manifest["seq_len"] + 1) * 4))
