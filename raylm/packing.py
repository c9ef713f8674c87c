"""Token documents -> fixed-size blocks -> shuffled parquet shards.

`BlockPacker` concatenates documents (each followed by EOS) and cuts blocks of seq_len + 1
tokens, remembering which corpus files each block drew on; `ShuffleBuffer` is the seeded
shuffle window; `ShardWriter` writes the blocks as parquet shards with their provenance.
raylm.data.packed_blocks chains them into the one definition of the block stream. No `ray`.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylm import storage
from raylm.config import S3Config


class BlockPacker:
    """Concatenate documents (each followed by EOS) and cut blocks of `block_len` tokens.

    Provenance rides along: each token remembers the corpus file it came from, and
    `last_sources` holds, for the blocks the latest `add` returned, the files each drew on."""

    def __init__(self, block_len: int, eos_id: int):
        self.block_len, self.eos_id = block_len, eos_id
        self.buf = np.empty(0, dtype=np.int32)
        self.src = np.empty(0, dtype=np.int32)
        self.last_sources: list[tuple[int, ...]] = []

    def add(self, flat: np.ndarray, offsets: np.ndarray, files: np.ndarray | None = None) -> np.ndarray:
        """Add documents given as flat ids + offsets (and their file indices); return the
        completed blocks (n, block_len)."""
        n_docs = len(offsets) - 1
        with_eos = np.empty(len(flat) + n_docs, dtype=np.int32)
        ends = offsets[1:] + np.arange(1, n_docs + 1)  # position of each EOS after shifting
        keep = np.ones(len(with_eos), dtype=bool)
        keep[ends - 1] = False
        with_eos[keep] = flat
        with_eos[ends - 1] = self.eos_id
        files = np.zeros(n_docs, dtype=np.int32) if files is None else np.asarray(files, dtype=np.int32)
        src = np.repeat(files, np.diff(offsets) + 1)
        self.buf = np.concatenate([self.buf, with_eos])
        self.src = np.concatenate([self.src, src])
        n = len(self.buf) // self.block_len
        cut = n * self.block_len
        blocks = self.buf[:cut].reshape(n, self.block_len)
        self.last_sources = _row_sets(self.src[:cut].reshape(n, self.block_len))
        self.buf, self.src = self.buf[cut:], self.src[cut:]
        return blocks


def _row_sets(rows: np.ndarray) -> list[tuple[int, ...]]:
    """The distinct values of each row, sorted. Vectorised for the common case (a block's
    tokens all come from one file); a per-row np.unique was the packer's main cost."""
    rows = np.sort(rows, axis=1)
    mixed = (rows[:, 1:] != rows[:, :-1]).any(axis=1)
    out = [(v,) for v in rows[:, 0].tolist()]
    for i in np.flatnonzero(mixed).tolist():
        out[i] = tuple(np.unique(rows[i]).tolist())
    return out


class ShuffleBuffer:
    """Seeded reservoir-style shuffle over a window: the output order depends only on the
    input order and the seed (not on how the input is chunked)."""

    DRAWS = 4096  # random picks drawn at once while the window is full (one numpy call, not one per block)

    def __init__(self, window: int, seed: int):
        self.window, self.rng, self.items = max(1, window), np.random.default_rng(seed), []
        self.picks: list[int] = []

    def push(self, blocks):
        for b in blocks:
            self.items.append(b)
            if len(self.items) >= self.window:
                if not self.picks:
                    self.picks = self.rng.integers(self.window, size=self.DRAWS).tolist()[::-1]
                yield self._pop(self.picks.pop())

    def drain(self):
        while self.items:
            yield self._pop(int(self.rng.integers(len(self.items))))

    def _pop(self, i: int):
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        return self.items.pop()


def blocks_table(blocks: list[np.ndarray], block_len: int) -> pa.Table:
    arr = np.stack(blocks).astype(np.int32, copy=False)
    return pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), block_len)})


class ShardWriter:
    """Buffers blocks and writes fixed-size parquet shards under an attempt prefix. Each
    shard's entry names the corpus files (indices into the manifest's `files`) it holds
    tokens of: its provenance."""

    def __init__(self, prefix: str, split: str, block_len: int, blocks_per_shard: int, s3: S3Config | None):
        self.prefix, self.split, self.block_len = prefix, split, block_len
        self.per_shard, self.s3 = blocks_per_shard, s3
        self.pending: list[np.ndarray] = []
        self.sources: set[int] = set()
        self.shards: list[dict] = []
        self.blocks = 0

    def add(self, block: np.ndarray, sources=()) -> None:
        self.pending.append(block)
        self.sources.update(sources)
        if len(self.pending) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        sink = io.BytesIO()
        pq.write_table(blocks_table(self.pending, self.block_len), sink, compression="zstd")
        data = sink.getvalue()
        name = f"{self.split}/shard-{len(self.shards):05d}.parquet"
        storage.write_bytes(storage.join(self.prefix, name), data, self.s3)
        self.shards.append({"path": name, "rows": len(self.pending), "sha256": hashlib.sha256(data).hexdigest(),
                            "source_files": sorted(self.sources)})
        self.blocks += len(self.pending)
        self.pending, self.sources = [], set()
