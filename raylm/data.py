"""Corpus -> packed token blocks, on Ray Data.

    read (any of .txt .jsonl .jsonl.gz .parquet, local or s3://)
      -> parse into documents (file and line kept for errors)
      -> clean (NFC, control characters, whitespace, length filters) and split train/val
      -> tokenize (an actor pool; each actor loads the tokenizer once)
      -> pack into blocks of seq_len + 1 tokens, EOS between documents       (driver, in order)
      -> seeded shuffle buffer -> parquet shards + manifest.json (written last)

Ray Data runs with `preserve_order`, so the documents reach the packer in corpus order and
the block sequence is a pure function of (corpus, config, tokenizer, seed), whatever the
cluster size. Packing is a cheap sequential step on the driver; the expensive parts (parsing,
cleaning, tokenizing) run in parallel. Training streams the prepared shards back through Ray
Data (`training_dataset`), which makes resume a matter of counting blocks.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import time
import unicodedata
import uuid
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylm import storage
from raylm.config import DataConfig, S3Config

SUFFIXES = (".jsonl.gz", ".jsonl", ".txt", ".parquet")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what is wrong."""


# --------------------------------------------------------------------------- reading


def list_corpus(path: str, s3: S3Config | None = None) -> list[storage.FileInfo]:
    """Every corpus file under `path` (file, directory or glob), in a stable sorted order."""
    if not path:
        raise DataError("data.path is empty: point it at a corpus file, directory or glob")
    try:
        files = storage.list_files(path, s3)
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    usable = [f for f in files if f.uri.endswith(SUFFIXES)]
    if not usable:
        raise DataError(f"{path}: no corpus files found (looked for {', '.join(SUFFIXES)})")
    return usable


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None


def parse_documents(path: str, raw: bytes, text_field: str):
    """Yield (line_number, text) or (line_number, DataError) for one corpus file's bytes.

    Bad records are yielded, not raised, so the driver can apply the error budget in order."""
    name = path.rsplit("/", 1)[-1]
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            yield 0, DataError(f"{path}: truncated or corrupt gzip ({e})")
            return
    if name.endswith(".txt"):
        try:
            yield 1, _decode(raw, path)  # one document per text file
        except DataError as e:
            yield 1, e
        return
    if name.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(raw))
        except Exception as e:  # pyarrow raises several types for damaged files
            yield 0, DataError(f"{path}: truncated or corrupt parquet ({str(e).splitlines()[0]})")
            return
        if text_field not in table.column_names:
            yield 0, DataError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)}); "
                               f"set data.text_field")
            return
        for i, text in enumerate(table.column(text_field).to_pylist(), start=1):
            if not isinstance(text, str):
                yield i, DataError(f"{path}: row {i}: {text_field!r} is {type(text).__name__}, not a string")
            else:
                yield i, text
        return
    # JSON lines
    for i, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            record = json.loads(_decode(line, where))
        except DataError as e:
            yield i, e
            continue
        except json.JSONDecodeError as e:
            yield i, DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            yield i, DataError(f"{where}: no field {text_field!r} (found: {keys}); set data.text_field")
        elif not isinstance(record[text_field], str):
            yield i, DataError(f"{where}: field {text_field!r} is {type(record[text_field]).__name__}, not a string")
        else:
            yield i, record[text_field]


# --------------------------------------------------------------------------- cleaning

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ODD_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+(?=\n|\Z)")
_MANY_BLANK = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC, control characters out, whitespace normalised; indentation is kept (code matters)."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _ODD_SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _MANY_BLANK.sub("\n\n", text)
    return text.strip("\n")


def stable_fraction(text: str) -> float:
    """A hash of the text mapped to [0, 1): the same document always lands in the same split."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def parse_and_clean(batch: dict, cfg: DataConfig, val_files: frozenset = frozenset()) -> dict:
    """Ray Data stage (stateless tasks, fused with the read): file bytes -> cleaned documents
    with their split, origin, and the reason if one is bad or dropped."""
    out = {"text": [], "val": [], "source": [], "line": [], "error": [], "dropped": []}
    for path, raw in zip(batch["path"], batch["bytes"]):
        n = 0
        force_val = path in val_files
        for line, doc in parse_documents(path, raw, cfg.text_field):
            n += 1
            text, err, dropped = "", "", ""
            if isinstance(doc, DataError):
                err = str(doc)
            else:
                text = clean_text(doc)
                if len(text) < cfg.min_chars:
                    dropped, text = "too_short", ""
                elif len(text) > cfg.max_chars:
                    dropped, text = "too_long", ""
            # With an explicit validation corpus (val_files), no training document is diverted.
            val = force_val or (not val_files and bool(text) and stable_fraction(text) < cfg.val_fraction)
            for k, v in (("text", text), ("val", val), ("source", path), ("line", line),
                         ("error", err), ("dropped", dropped)):
                out[k].append(v)
        if n == 0:  # an empty shard is almost always a broken export, never silently fine
            for k, v in (("text", ""), ("val", False), ("source", path), ("line", 0),
                         ("error", f"{path}: empty shard (no documents)"), ("dropped", "")):
                out[k].append(v)
    return {k: np.array(v, dtype=object if k in ("text", "source", "error", "dropped") else None)
            for k, v in out.items()}


class TokenizeDocuments:
    """Ray Data stage (actor pool): each actor loads the tokenizer once and encodes batches."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        ids = self.tok.encode_batch(texts)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
        return batch.drop_columns(["text"]).append_column(
            "ids", pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)))


# --------------------------------------------------------------------------- packing


class BlockPacker:
    """Concatenate documents (each followed by EOS) and cut blocks of `block_len` tokens."""

    def __init__(self, block_len: int, eos_id: int):
        self.block_len, self.eos_id = block_len, eos_id
        self.buf = np.empty(0, dtype=np.int32)

    def add(self, flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Add documents given as flat ids + offsets; return the completed blocks (n, block_len)."""
        n_docs = len(offsets) - 1
        with_eos = np.empty(len(flat) + n_docs, dtype=np.int32)
        ends = offsets[1:] + np.arange(1, n_docs + 1)  # position of each EOS after shifting
        keep = np.ones(len(with_eos), dtype=bool)
        keep[ends - 1] = False
        with_eos[keep] = flat
        with_eos[ends - 1] = self.eos_id
        self.buf = np.concatenate([self.buf, with_eos])
        n = len(self.buf) // self.block_len
        blocks = self.buf[: n * self.block_len].reshape(n, self.block_len)
        self.buf = self.buf[n * self.block_len:]
        return blocks


class ShuffleBuffer:
    """Seeded reservoir-style shuffle over a window: the output order depends only on the
    input order and the seed."""

    def __init__(self, window: int, seed: int):
        self.window, self.rng, self.items = max(1, window), np.random.default_rng(seed), []

    def push(self, blocks: np.ndarray):
        for b in blocks:
            self.items.append(b)
            if len(self.items) >= self.window:
                yield self._pop()

    def drain(self):
        while self.items:
            yield self._pop()

    def _pop(self):
        i = int(self.rng.integers(len(self.items)))
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        return self.items.pop()


def blocks_table(blocks: list[np.ndarray], block_len: int) -> pa.Table:
    arr = np.stack(blocks).astype(np.int32, copy=False)
    return pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), block_len)})


class ShardWriter:
    """Buffers blocks and writes fixed-size parquet shards under an attempt prefix."""

    def __init__(self, prefix: str, split: str, block_len: int, blocks_per_shard: int, s3: S3Config | None):
        self.prefix, self.split, self.block_len = prefix, split, block_len
        self.per_shard, self.s3 = blocks_per_shard, s3
        self.pending: list[np.ndarray] = []
        self.shards: list[dict] = []
        self.blocks = 0

    def add(self, block: np.ndarray) -> None:
        self.pending.append(block)
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
        self.shards.append({"path": name, "rows": len(self.pending), "sha256": hashlib.sha256(data).hexdigest()})
        self.blocks += len(self.pending)
        self.pending = []


# --------------------------------------------------------------------------- prepare


@dataclass
class PrepareStats:
    files: int = 0
    bytes_read: int = 0
    documents: int = 0
    val_documents: int = 0
    dropped: dict = field(default_factory=dict)
    bad_records: list = field(default_factory=list)
    tokens: int = 0
    train_blocks: int = 0
    val_blocks: int = 0
    seconds: float = 0.0


def dataset_key(sources: list[storage.FileInfo], val_sources: list[storage.FileInfo], cfg: DataConfig,
                tokenizer_sha: str, seed: int) -> str:
    """Identity of a prepared dataset: same key, same blocks in the same order."""
    relevant = {k: getattr(cfg, k) for k in ("text_field", "seq_len", "val_fraction", "min_chars",
                                             "max_chars", "shuffle_window", "blocks_per_shard")}
    blob = json.dumps({"sources": [[f.uri, f.size, f.etag_or_mtime] for f in sources],
                       "val_sources": [[f.uri, f.size, f.etag_or_mtime] for f in val_sources],
                       "cfg": relevant, "tokenizer": tokenizer_sha, "seed": seed,
                       "version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest(out: str, s3: S3Config | None = None) -> dict | None:
    uri = storage.join(out, MANIFEST)
    if not storage.exists(uri, s3):
        return None
    return json.loads(storage.read_text(uri, s3))


def _document_stream(files: list[storage.FileInfo], val_files: list[storage.FileInfo], cfg: DataConfig,
                     tokenizer, s3, tokenizer_actors: int):
    """Ray Dataset of tokenized documents, in corpus order."""
    import ray

    files = files + val_files  # one Ray Data execution for both splits
    fs, _ = storage.filesystem(files[0].uri, s3)
    paths = [storage.filesystem(f.uri, s3)[1] for f in files]
    ds = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True)
    # Parsing yields many documents per file; the uri (not the bucket-relative path) names
    # the file in errors.
    uri_of = {p: f.uri for p, f in zip(paths, files)}
    ds = ds.map_batches(_with_uris, fn_kwargs={"uri_of": uri_of}, batch_size=1)
    ds = ds.map_batches(parse_and_clean, batch_size=1,
                        fn_kwargs={"cfg": cfg, "val_files": frozenset(f.uri for f in val_files)})
    return ds.map_batches(TokenizeDocuments, fn_constructor_args=(tokenizer,), batch_format="pyarrow",
                          batch_size=256, concurrency=tokenizer_actors)


def _with_uris(batch: dict, uri_of: dict) -> dict:
    batch["path"] = np.array([uri_of.get(p, p) for p in batch["path"]], dtype=object)
    return batch


def prepare(cfg: DataConfig, tokenizer, out: str, seed: int, s3: S3Config | None = None,
            log=print) -> dict:
    """Run the whole pipeline into `out` and return its manifest. Reuses a complete identical
    dataset already at `out`. Shards go under a fresh attempt prefix and count only once
    `manifest.json`, written last, names them; an interrupted prepare leaves nothing a later
    run would read."""
    import ray

    files = list_corpus(cfg.path, s3)
    val_files = list_corpus(cfg.val_path, s3) if cfg.val_path else []
    key = dataset_key(files, val_files, cfg, tokenizer.sha256, seed)
    existing = read_manifest(out, s3)
    if existing and existing.get("key") == key:
        log(f"data: reusing prepared dataset at {out} ({existing['train']['blocks']} train blocks)")
        return existing

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # determinism: blocks are a function of the corpus
    actors = cfg.tokenizer_actors or max(1, int(ray.available_resources().get("CPU", 2)) // 2)
    attempt = storage.join(out, f"attempt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    block_len = cfg.seq_len + 1
    stats = PrepareStats(files=len(files) + len(val_files), bytes_read=sum(f.size for f in files + val_files))
    writers = {s: ShardWriter(attempt, s, block_len, cfg.blocks_per_shard, s3) for s in ("train", "val")}
    packers = {s: BlockPacker(block_len, tokenizer.eos_id) for s in ("train", "val")}
    shuffle = ShuffleBuffer(cfg.shuffle_window, seed)
    t0 = last = time.time()
    for batch in _document_stream(files, val_files, cfg, tokenizer, s3, actors).iter_batches(
            batch_format="pyarrow", batch_size=None):
        _account(batch, stats, cfg.max_bad_records)
        keep = pa.compute.and_(pa.compute.equal(batch.column("error"), ""),
                               pa.compute.equal(batch.column("dropped"), ""))
        for split, mask in (("train", pa.compute.and_(keep, pa.compute.invert(batch.column("val")))),
                            ("val", pa.compute.and_(keep, batch.column("val")))):
            ids = batch.column("ids").filter(mask).combine_chunks()
            if len(ids) == 0:
                continue
            blocks = packers[split].add(ids.values.to_numpy(zero_copy_only=False),
                                        ids.offsets.to_numpy(zero_copy_only=False))
            stats.tokens += len(ids.values)
            if split == "train":
                for b in shuffle.push(blocks):
                    writers["train"].add(b)
            else:
                for b in blocks:
                    writers["val"].add(b)
        if time.time() - last > 5:
            last = time.time()
            log(f"data: {stats.documents} docs, {stats.tokens / 1e6:.2f}M tokens, "
                f"{stats.tokens / 1e3 / max(time.time() - t0, 1e-9):.0f}k tokens/s")
    for b in shuffle.drain():
        writers["train"].add(b)
    for w in writers.values():
        w.flush()
    stats.train_blocks, stats.val_blocks = writers["train"].blocks, writers["val"].blocks
    stats.seconds = time.time() - t0
    if stats.train_blocks == 0:
        raise DataError(f"{cfg.path}: corpus yields no training blocks of {block_len} tokens "
                        f"({stats.documents} documents, {stats.tokens} tokens); add text or lower data.seq_len")
    if stats.val_blocks == 0:
        raise DataError(f"{cfg.path}: validation split is empty; raise data.val_fraction "
                        f"(now {cfg.val_fraction}) or set data.val_path")
    rel = attempt[len(out.rstrip("/")) + 1:]
    manifest = {
        "format_version": FORMAT_VERSION, "key": key, "seed": seed, "seq_len": cfg.seq_len,
        "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "sources": [{"uri": f.uri, "size": f.size, "etag": f.etag_or_mtime} for f in files],
        "val_sources": [{"uri": f.uri, "size": f.size, "etag": f.etag_or_mtime} for f in val_files],
        "train": {"blocks": stats.train_blocks,
                  "shards": [dict(s, path=f"{rel}/{s['path']}") for s in writers["train"].shards]},
        "val": {"blocks": stats.val_blocks,
                "shards": [dict(s, path=f"{rel}/{s['path']}") for s in writers["val"].shards]},
        "stats": {k: v for k, v in stats.__dict__.items()},
    }
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1), s3)
    _remove_stale_attempts(out, rel, s3)
    log(f"data: {stats.documents} docs ({stats.val_documents} val), {stats.tokens / 1e6:.2f}M tokens -> "
        f"{stats.train_blocks} train + {stats.val_blocks} val blocks in {stats.seconds:.1f}s "
        f"({stats.bytes_read / 1e6 / max(stats.seconds, 1e-9):.1f} MB/s); dropped {stats.dropped or 'none'}; "
        f"bad records {len(stats.bad_records)}")
    return manifest


def _account(batch: pa.Table, stats: PrepareStats, max_bad: int) -> None:
    errors = [e for e in batch.column("error").to_pylist() if e]
    stats.bad_records.extend(errors)
    if len(stats.bad_records) > max_bad:
        extra = f" ({len(stats.bad_records)} bad records > data.max_bad_records={max_bad})" if max_bad else ""
        raise DataError(stats.bad_records[max_bad] + extra)
    for reason in batch.column("dropped").to_pylist():
        if reason:
            stats.dropped[reason] = stats.dropped.get(reason, 0) + 1
    ok = pa.compute.and_(pa.compute.equal(batch.column("error"), ""), pa.compute.equal(batch.column("dropped"), ""))
    stats.documents += pa.compute.sum(ok.cast(pa.int64())).as_py() or 0
    stats.val_documents += pa.compute.sum(pa.compute.and_(ok, batch.column("val")).cast(pa.int64())).as_py() or 0


def _remove_stale_attempts(out: str, keep: str, s3) -> None:
    for f in storage.list_files(out, s3):
        rel = f.uri[len(out.rstrip("/")) + 1:]
        if rel.startswith("attempt-") and not rel.startswith(keep + "/"):
            storage.delete(f.uri, s3)


# --------------------------------------------------------------------------- training input


def shard_uris(out: str, manifest: dict, split: str) -> list[str]:
    return [storage.join(out, s["path"]) for s in manifest[split]["shards"]]


# Below this size a split is loaded once by the driver and handed to Ray as in-memory blocks.
IN_MEMORY_BYTES = 256 * 2**20


def training_dataset(out: str, manifest: dict, split: str, s3: S3Config | None = None):
    """Ray Dataset of packed blocks (column `tokens`, int32 [seq_len + 1]) in manifest order.

    Large splits stream from storage through read tasks. Small ones are read here once and
    put in the object store: each worker iterates the dataset once per epoch, and on a busy
    node every read task's process start costs seconds, which would dominate a small run."""
    import ray

    if manifest[split]["blocks"] * (manifest["seq_len"] + 1) * 4 < IN_MEMORY_BYTES:
        return ray.data.from_arrow([pq.read_table(io.BytesIO(storage.read_bytes(u, s3)))
                                    for u in shard_uris(out, manifest, split)])
    uris = shard_uris(out, manifest, split)
    fs, _ = storage.filesystem(uris[0], s3)
    return ray.data.read_parquet([storage.filesystem(u, s3)[1] for u in uris], filesystem=fs,
                                 columns=["tokens"])

