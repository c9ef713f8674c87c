"""Corpus -> packed token blocks, on Ray Data.

    read (any of .txt .jsonl .jsonl.gz .parquet in any case, local or s3://)
      -> parse into documents (file and line kept for errors)                raylm.documents
      -> clean (NFC, control characters, whitespace, length filters)
      -> redact PII (typed placeholders)                                      raylm.pii
      -> de-duplicate the redacted text: exact (content hash) and near (MinHash + LSH), across
         all files                                       (here; the hashing: raylm.dedup)
      -> split train/val (by a hash of the redacted text, or each document's tail)
      -> tokenize (an actor pool; each actor loads the tokenizer once)
      -> pack into blocks of seq_len + 1 tokens, EOS between documents       raylm.packing
         (driver, in order)
      -> seeded shuffle buffer -> parquet shards + DATACARD.md + manifest.json (written last)

This module runs that chain (on Ray Data, or on threads in this process for a small corpus)
and owns the prepared dataset's format: listing, manifest, data card, training input.

De-duplication is a first pass over the corpus (`find_duplicates`): hashes and signatures
are computed in parallel and grouped by a Ray Data groupby, so duplicates are found across
every file, not only within one. The second pass drops them while it streams the rest.

Ray Data runs with `preserve_order`, so the documents reach the packer in corpus order and
the block sequence is a pure function of (corpus, config, tokenizer, seed), whatever the
cluster size. Packing is a cheap sequential step on the driver; the expensive parts (parsing,
cleaning, hashing, tokenizing) run in parallel. Training streams the prepared shards back
through Ray Data (`training_dataset`), which makes resume a matter of counting blocks.
Each shard records the corpus files its tokens came from (provenance).

data.mode=stream skips the shards: `stream_datasets` hands training the tokenized document
stream, and each worker packs and shuffles it with the same `packed_blocks` that `prepare`
writes through, so both modes train on the same blocks in the same order.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import itertools
import json
import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylm import storage
from raylm.config import DataConfig, S3Config
from raylm.dedup import (MinHasher, UnionFind, band_keys, compact_jaccard, compact_signature, content_hash,
                         is_empty_signature, lsh_params)
from raylm.documents import check_plain_types, parse_and_clean, val_split_mode
from raylm.packing import BlockPacker, ShardWriter, ShuffleBuffer
from raylm.progress import Progress

SUFFIXES = (".jsonl.gz", ".jsonl", ".txt", ".parquet")
MANIFEST = "manifest.json"
DATACARD = "DATACARD.md"
FORMAT_VERSION = 3  # 3: shuffle picks drawn in bulk (a different, equally seeded order)
# Raised when the same documents encode to other ids; in the dataset key (a dataset prepared
# before is prepared again, not reused). 2: chat marker strings in documents are plain text
# (`Tokenizer.encode_flat`), no longer marker ids; keys before it did not name one.
TEXT_ENCODING = 2
# Raised when cleaning or PII redaction makes other text of the same documents; in the dataset
# key too. 2: C1 control characters removed (NEL a line break), international phone numbers
# with groups of any length or a code in parentheses, an IPv6 address before a colon, a
# placeholder that opens a tail-split document kept whole. Keys before it did not name one.
# 3: phone extensions (`x123`, `ext. 12`), an apostrophe inside an e-mail's local part.
# 4: NFC after control characters are removed; near-dedup's bands chosen for recall at the
# threshold (13 bands of 7 rows at 0.8, raylm.dedup.lsh_params).
# 5: near-dedup's words keep their combining marks (Devanagari's vowel signs, among others).
# 6: with data.val_split=tail, a document with no tail to hold out (one character, or one PII
# placeholder) trains whole; its empty tail was a lone EOS in validation, counted as a document.
# 7: PII: file names shaped like addresses (logo@2x.png, jquery@3.6.0.min.js) and git@host
# remotes are kept; an address written with a full-width '＠' is redacted.
# 8: de-duplication and the split by document hash the redacted text: documents that differ
# only in their PII are duplicates, and one text on one side of the split.
# 9: text opening with a UTF-16 or UTF-32 byte order mark is read in that encoding (it was a bad
# record), as are parquet text stored as bytes and JSON lines after a mid-file UTF-8 mark; an
# empty .txt file is a bad record (an empty shard), and so is a record naming data.text_field twice.
CLEANING = 9


from raylm.errors import DataError  # noqa: E402,F401  (defined with raylm's other error types)


# --------------------------------------------------------------------------- reading


def list_corpus(path: str, s3: S3Config | None = None) -> list[storage.FileInfo]:
    """Every corpus file under `path` (file, directory or glob), in a stable sorted order;
    hidden files are left out. Files of other kinds are an error naming them (a corpus that
    lost some of its text without a word would be worse), except those no corpus is made of
    (`_beside_corpus`)."""
    if not path:
        raise DataError("data.path is empty: point it at a corpus file, directory or glob")
    try:
        files = storage.list_files(path, s3, follow_links=True)
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    base = "/".join(itertools.takewhile(lambda p: "*" not in p and "?" not in p, path.split("/")))
    usable, other = [], []
    for f in files:
        rel = _below(f.uri, base)  # None for the one file data.path names
        if rel is not None and any(p.startswith(".") for p in rel.split("/")):
            continue  # .DS_Store, macOS's ._ copies, a .git directory
        if f.uri.lower().endswith(SUFFIXES):
            usable.append(f)
        elif rel is not None and not _beside_corpus(rel.rsplit("/", 1)[-1]):
            other.append(rel)
    if other:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise DataError(f"{path}: {_count(len(other), 'file')} raylm cannot read as a corpus ({shown}; it reads "
                        f"{', '.join(SUFFIXES)}); select the corpus files with a glob in data.path, e.g. "
                        f"{base.rstrip('/') or '.'}/**/*.jsonl")
    if not usable:
        raise DataError(f"{path}: no corpus files found (looked for {', '.join(SUFFIXES)})")
    # Token shards are parquet too, and would be read as a corpus without a text column.
    shards = next((m for m in map(_SHARD.match, (f.uri for f in usable)) if m), None)
    if shards:
        out = shards.group(1)
        if storage.exists(storage.join(out, MANIFEST), s3):
            raise DataError(f"{out}: a prepared dataset (token shards), not a corpus; use it as data.path "
                            f"of `raylm pretrain`, or point this at the raw text")
        raise DataError(f"{out}: an unfinished prepared dataset (shards but no {MANIFEST}: `raylm data prepare` "
                        f"stopped before the end); re-run `raylm data prepare --data <corpus> --out {out}`")
    return usable


def _below(uri: str, base: str) -> str | None:
    """`uri` relative to the listed directory `base`; None if it is the file `base` names."""
    try:
        return storage.relative(uri, base)
    except ValueError:
        return None


def _beside_corpus(name: str) -> bool:
    """Files a corpus directory may hold that are no part of it, and no error: the markers
    and checksums other tools write (Spark's and Hadoop's `_SUCCESS`, `_metadata`, `.crc`), and
    what raylm writes beside a corpus (the built-in corpus's `_SUCCESS`; a prepared dataset's
    manifest and data card)."""
    return name.startswith("_") or name.endswith(".crc") or name in (MANIFEST, DATACARD)


# Where `prepare` writes shards: <out>/attempt-<id>/<split>/shard-<n>.parquet
_SHARD = re.compile(r"(.+)/attempt-[^/]+/(?:train|val)/shard-\d+\.parquet\Z")


class TokenizeDocuments:
    """Ray Data stage (actor pool): each actor loads the tokenizer once, and its segment
    cache (`Tokenizer.encode_flat`) warms up over the batches it encodes."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids, offsets = self.tok.encode_flat(batch.column("text"))
        return batch.drop_columns(["text"]).append_column(  # 64-bit offsets: no limit on tokens per batch
            "ids", pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids)))


# --------------------------------------------------------------------------- prepare


@dataclass
class PrepareStats:
    files: int = 0
    bytes_read: int = 0
    documents_read: int = 0  # every record parsed, good or bad
    documents: int = 0  # kept: they reach the tokenizer
    val_documents: int = 0
    dropped: dict = field(default_factory=dict)  # reason -> count (filters and duplicates)
    bad_records: list = field(default_factory=list)
    pii: dict = field(default_factory=dict)  # type -> replacements
    chars: "Histogram" = field(default_factory=lambda: Histogram())  # kept documents
    doc_tokens: "Histogram" = field(default_factory=lambda: Histogram())
    tokens: int = 0  # of the kept documents, EOS not counted
    # split -> tokens (EOS included) after its last full block: too few for a block, left out
    partial_block_tokens: dict = field(default_factory=dict)
    train_blocks: int = 0
    val_blocks: int = 0
    dedup_seconds: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Histogram) else v for k, v in self.__dict__.items()}


class Histogram:
    """Lengths in power-of-two bins: percentiles to within a factor of 2, in constant
    memory however many documents pass."""

    def __init__(self):
        self.bins = np.zeros(64, dtype=np.int64)
        self.n = self.total = self.max = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.int64)
        if not len(values):
            return
        np.add.at(self.bins, np.floor(np.log2(np.maximum(values, 1))).astype(np.int64), 1)
        self.n += len(values)
        self.total += int(values.sum())
        self.max = max(self.max, int(values.max()))

    def percentile(self, q: float) -> int:
        """Upper edge of the bin holding the q-th percentile."""
        if not self.n:
            return 0
        i = int(np.searchsorted(np.cumsum(self.bins), q / 100 * self.n))
        return min(2 ** (i + 1), self.max)

    def to_dict(self) -> dict:
        return {"count": self.n, "total": self.total, "mean": round(self.total / max(self.n, 1), 1),
                "p50": self.percentile(50), "p90": self.percentile(90), "p99": self.percentile(99),
                "max": self.max}


def dataset_key(sources: list[storage.FileInfo], val_sources: list[storage.FileInfo], cfg: DataConfig,
                tokenizer_sha: str, seed: int) -> str:
    """Identity of a prepared dataset: same key, same blocks in the same order."""
    relevant = {k: getattr(cfg, k) for k in ("text_field", "seq_len", "val_fraction", "min_chars",
                                             "max_chars", "shuffle_window", "blocks_per_shard", "dedup",
                                             "near_dup_threshold", "minhash_perm", "redact_pii")}
    blob = json.dumps({"sources": [[f.uri, f.size, f.etag_or_mtime] for f in sources],
                       "val_sources": [[f.uri, f.size, f.etag_or_mtime] for f in val_sources],
                       "cfg": relevant, "tokenizer": tokenizer_sha, "seed": seed,
                       # Only a tail split is named: keys of datasets split by document stay as they were.
                       # Its cut follows PII redaction since "redacted" (a tail prepared before may hold
                       # an address the cut split, unredacted: it is prepared again).
                       **({"val_split": "tail", "cut": "redacted"}
                          if val_split_mode(cfg, sources, val_sources) == "tail" else {}),
                       "version": FORMAT_VERSION, "text_encoding": TEXT_ENCODING, "cleaning": CLEANING},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# What every manifest raylm writes holds: one without them is another tool's file.
MANIFEST_KEYS = ("format_version", "key", "seq_len")


def is_raylm_manifest(manifest) -> bool:
    """Whether a parsed manifest.json is one raylm wrote (a corpus may come with its own)."""
    return isinstance(manifest, dict) and all(k in manifest for k in MANIFEST_KEYS)


def read_manifest(out: str, s3: S3Config | None = None, strict: bool = False) -> dict | None:
    """The manifest.json in `out`, None if there is none. One that is not a JSON object is
    a DataError naming it, and so, with `strict`, is one raylm did not write
    (`is_raylm_manifest`), for callers that must not write it over or read it as a prepared
    dataset."""
    uri = storage.join(out, MANIFEST)
    if not storage.exists(uri, s3):
        return None
    try:
        manifest = json.loads(storage.read_text(uri, s3))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError too
        why = f"not valid JSON: {str(e).splitlines()[0][:100]}"
    else:
        if is_raylm_manifest(manifest):
            damage = _manifest_damage(manifest)
            if damage is None:
                return manifest
            raise DataError(f"{uri}: a damaged manifest ({damage}); move it away and prepare the dataset again "
                            f"(`raylm data prepare`), or use another directory")
        if isinstance(manifest, dict) and not strict:
            return manifest
        why = (f"no {', '.join(k for k in MANIFEST_KEYS if k not in manifest)}" if isinstance(manifest, dict)
               else f"a JSON {type(manifest).__name__}, not an object")
    raise DataError(f"{uri}: not a manifest raylm wrote ({why}); move it away or use another directory "
                    f"(a glob in data.path selects the corpus files beside it)")


def _manifest_damage(manifest: dict, whole: bool = False) -> str | None:
    """What is wrong with the fields training and re-preparing read from a manifest raylm wrote
    (one edited by hand, or from another version), in a few words; None if nothing. Fields
    left out are wrong only where `whole` (training reads it: `prepared_datasets`)."""
    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not count(manifest["seq_len"]) or not manifest["seq_len"]:
        return f"seq_len {manifest['seq_len']!r} is not a positive integer"
    if ("tokenizer_sha256" in manifest or whole) and not isinstance(manifest.get("tokenizer_sha256"), str):
        return "no tokenizer_sha256 string"
    if "row_bytes" in manifest and not count(manifest["row_bytes"]):
        return f"row_bytes {manifest['row_bytes']!r} is not a count"
    stats = manifest.get("stats", {})
    if not isinstance(stats, dict) or not isinstance(stats.get("bad_records", []), list):
        return "stats.bad_records is not a list"
    if "columns" in manifest and not (isinstance(manifest["columns"], list) and manifest["columns"]
                                      and all(isinstance(c, str) for c in manifest["columns"])):
        return "columns is not a list of names"
    for split in ("train", "val"):
        part = manifest.get(split)
        if part is None and not whole:
            continue
        if not isinstance(part, dict):
            return f"no {split} object"
        if not count(part.get("blocks")):
            return f"{split}.blocks {part.get('blocks')!r} is not a count"
        shards = part.get("shards")
        if not isinstance(shards, list):
            return f"{split}.shards is not a list"
        for i, shard in enumerate(shards):
            if not isinstance(shard, dict) or not isinstance(shard.get("path"), str):
                return f"{split}.shards[{i}] has no path"
            if shard.get("rows") is not None and not count(shard["rows"]):
                return f"{split}.shards[{i}].rows {shard['rows']!r} is not a count"
    return None


def _cleaned_documents(files: list[storage.FileInfo], val_files: list[storage.FileInfo], cfg: DataConfig, s3,
                       drop: dict | None = None, redact: tuple[str, ...] = (),
                       read: list[storage.FileInfo] | None = None, tail: bool = False):
    """Ray Dataset of cleaned documents from both splits' files (one execution), in corpus
    order; `read` limits it to some of them, with file indices and splits unchanged. `tail`:
    documents split into head and held-out tail rows (de-duplication reads whole ones)."""
    import ray

    order = {f.uri: i for i, f in enumerate(files + val_files)}
    files = files + val_files if read is None else read
    # One read task per file: small files would otherwise share a block, and files are the
    # unit of parallelism (and of ordered error reporting) for the stages after the read.
    ds = ray.data.read_datasource(_corpus_source(files, s3), override_num_blocks=len(files))
    return ds.map_batches(parse_and_clean, batch_size=1, fn_kwargs={
        "cfg": cfg, "order": order,
        "val_files": frozenset(f.uri for f in val_files), "drop": drop, "redact": tuple(redact), "tail": tail})


def _corpus_source(files: list[storage.FileInfo], s3):
    """A Ray Data source of (path, bytes), one read task and block per corpus file, that
    names the file when a read fails (StorageError): Ray Data's read_binary_files does not."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class CorpusFiles(Datasource):
        def estimate_inmemory_data_size(self) -> int:
            return sum(f.size for f in files)

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            return [ReadTask(functools.partial(_read_file, f.uri, s3),
                             BlockMetadata(num_rows=1, size_bytes=f.size, input_files=[f.uri], exec_stats=None))
                    for f in files]

    return CorpusFiles()


def _read_file(uri: str, s3) -> list[pa.Table]:
    return [pa.table({"path": [uri], "bytes": pa.array([storage.read_bytes(uri, s3)], pa.large_binary())})]


# --------------------------------------------------------------------------- de-duplication


@functools.lru_cache(maxsize=4)
def _near_dup_hashing(num_perm: int, threshold: float):
    # A fixed seed: which documents count as duplicates must not change with the run's seed.
    return MinHasher(num_perm=num_perm, seed=0), *lsh_params(threshold, num_perm)


def bucket_keys(batch: dict, mode: str, num_perm: int, threshold: float) -> dict:
    """Ray Data stage: one row per (document, bucket). Documents sharing a bucket are
    duplicates: the exact bucket is the content hash, and with mode "near" each band of the
    MinHash signature is one more (LSH: similar documents collide in some band). Band rows
    carry the document's compact signature, so the candidates can be verified."""
    hasher, bands, rows = _near_dup_hashing(num_perm, threshold) if mode == "near" else (None, 0, 0)
    keys, files, lines, exact, sigs, errors, chars = [], [], [], [], [], [], []
    for text, file, line, error in zip(batch["text"], batch["file"], batch["line"], batch["error"]):
        if error:  # reported to the driver, which applies the error budget before the second pass
            doc_keys, compact = [ERROR_KEY], b""
        elif not text:  # filtered or empty: nothing to compare
            continue
        else:
            doc_keys, compact = [b"exact:" + content_hash(text)], b""
            if hasher:
                sig = hasher.signature(text)
                if not is_empty_signature(sig):  # no words (only punctuation): exact match only
                    doc_keys += band_keys(sig, bands, rows)
                    compact = compact_signature(sig)
        keys += doc_keys
        files += [file] * len(doc_keys)
        lines += [line] * len(doc_keys)
        exact += [not error] + [False] * (len(doc_keys) - 1)
        sigs += [b""] + [compact] * (len(doc_keys) - 1)
        errors += [error] + [""] * (len(doc_keys) - 1)
        chars += [len(text)] + [0] * (len(doc_keys) - 1)  # once per document: the progress bar's measure
    return {"key": np.array(keys, dtype=object), "file": np.array(files, dtype=np.int64),
            "line": np.array(lines, dtype=np.int64), "exact": np.array(exact, dtype=bool),
            "sig": np.array(sigs, dtype=object), "error": np.array(errors, dtype=object),
            "chars": np.array(chars, dtype=np.int64)}


# The bucket of bad records: no content hash ("exact:" + 16 bytes) or band key (12 bytes) can equal it.
ERROR_KEY = b"error"


def bucket_edges(group: dict, threshold: float = 0.0) -> dict:
    """Ray Data stage (per bucket): edges that join the bucket's duplicates, so that the
    union of all buckets' edges connects each duplicate cluster.

    An exact bucket holds copies of one text: every member joins the first in corpus order.
    A band bucket holds LSH candidates, which the S-curve lets in below the threshold too
    (at 0.8 with 13 bands of 7 rows, about 67% of pairs at Jaccard 0.7 and 10% at 0.5), so they are verified:
    in corpus order, each member joins the first earlier head (a member that started a
    cluster) whose estimated Jaccard with it reaches `threshold`, or else becomes a head
    itself. Comparing with heads only keeps a bucket linear in its size for one cluster; a
    member similar only to a non-head is joined through another band it shares with it.
    `threshold` 0 skips the check."""
    if "key" in group and len(group["key"]) and group["key"][0] == ERROR_KEY:
        return _error_rows(group)
    sigs = group.get("sig")
    members: dict[tuple[int, int], bytes] = {}
    for i, key in enumerate(zip(group["file"].tolist(), group["line"].tolist())):
        members.setdefault(key, sigs[i] if sigs is not None else b"")
    order = sorted(members)
    exact = bool(group["exact"][0]) if len(group["exact"]) else False
    pairs = []
    if exact or threshold <= 0:
        pairs = [(order[0], m) for m in order[1:]]
    else:
        heads: list[tuple[int, int]] = []
        for m in order:
            match = next((h for h in heads if compact_jaccard(members[h], members[m]) >= threshold), None)
            if match is None:
                heads.append(m)
            else:
                pairs.append((match, m))
    return {"a_file": np.array([a[0] for a, _ in pairs], dtype=np.int64),
            "a_line": np.array([a[1] for a, _ in pairs], dtype=np.int64),
            "b_file": np.array([b[0] for _, b in pairs], dtype=np.int64),
            "b_line": np.array([b[1] for _, b in pairs], dtype=np.int64),
            "exact": np.array([exact] * len(pairs), dtype=bool), "error": np.array([""] * len(pairs), dtype=object)}


def _error_rows(group: dict) -> dict:
    """The bad records of the first pass, in the edge schema (error set, no second member)."""
    n = len(group["error"])
    return {"a_file": np.asarray(group["file"], dtype=np.int64), "a_line": np.asarray(group["line"], dtype=np.int64),
            "b_file": np.full(n, -1, dtype=np.int64), "b_line": np.full(n, -1, dtype=np.int64),
            "exact": np.zeros(n, dtype=bool), "error": np.asarray(group["error"], dtype=object)}


# Below this corpus size the buckets are formed on the driver from the streamed keys: the
# keys of a few hundred MB of text fit in memory (about 12x the text for documents of 200
# bytes, the worst case: 3 GB at this size), and a distributed groupby's start-up (shuffle
# actors) would cost more than the grouping itself.
SMALL_CORPUS_BYTES = 256 * 2**20


def _edges_on_driver(keys: Iterable[dict], threshold: float):
    """Edges of every bucket of `keys` (`bucket_keys` batches), grouped here.

    Memory is per key: a document has one exact key and one per band, nearly all of them
    alone in their bucket. So a bucket holds its first member, a (file, line) tuple shared
    by the document's keys, and becomes a list only at a second member; exactness is read
    from the key ("exact:" + 16 bytes; band keys are 12)."""
    buckets: dict[bytes, tuple | list] = {}
    compact: dict[tuple[int, int], bytes] = {}  # one signature per document, not one per band
    bad = {"file": [], "line": [], "error": []}
    member = None
    for b in keys:
        for key, file, line, sig, error in zip(b["key"], b["file"].tolist(), b["line"].tolist(), b["sig"], b["error"]):
            if key == ERROR_KEY:
                bad["file"].append(file)
                bad["line"].append(line)
                bad["error"].append(error)
                continue
            if member is None or member[0] != file or member[1] != line:
                member = (file, line)
            g = buckets.get(key)
            if g is None:
                buckets[key] = member
            elif type(g) is tuple:
                buckets[key] = [g, member]
            else:
                g.append(member)
            if sig:
                compact.setdefault(member, sig)
    for key, g in buckets.items():
        if type(g) is list:
            exact = _is_exact_key(key)
            yield bucket_edges({"file": np.array([m[0] for m in g]), "line": np.array([m[1] for m in g]),
                                "exact": np.array([exact]), "sig": None if exact else [compact[m] for m in g]},
                               threshold)
    if bad["error"]:
        yield _error_rows(bad)


def _is_exact_key(key: bytes) -> bool:
    """Whether a `bucket_keys` key is a content hash ("exact:" + 16 bytes) rather than a band key (12 bytes)."""
    return len(key) == 22 and key.startswith(b"exact:")


def find_duplicates(files: list[storage.FileInfo], val_files: list[storage.FileInfo], cfg: DataConfig,
                    s3=None, in_process: bool = False, log=None) -> tuple[dict[tuple[int, int], str], list[str]]:
    """First pass over the corpus: (file index, line) -> "exact_duplicate" or
    "near_duplicate" for every document that repeats an earlier one (corpus order: training
    files, then validation files, so a validation copy of training text is the one dropped),
    and the bad records it met, in corpus order.

    Hashing and MinHash run in parallel tasks; buckets are formed by a Ray Data groupby over
    the whole corpus (across all shards), or on the driver for small corpora; only the edges
    between duplicates reach the union-find, which joins them into clusters and keeps each
    cluster's first document. Documents are hashed as they are trained on, redacted
    (data.redact_pii): copies that differ only in an address or a number are duplicates.
    `in_process`: the same stages on threads here (`runs_in_process`).
    `log`: where the hashing pass's progress goes, where the keys stream through this process."""
    import ray

    hashing = {"mode": cfg.dedup, "num_perm": cfg.minhash_perm, "threshold": cfg.near_dup_threshold}
    watch = (lambda keys: watched(keys, files + val_files, "data: hashing for de-duplication", log)) if log \
        else (lambda keys: keys)
    if in_process:
        clean = _clean_file(files, val_files, cfg, s3, redact=cfg.redact_pii)
        edges = _edges_on_driver(watch(_ordered_map(lambda f: bucket_keys(clean(f), **hashing), files + val_files,
                                                    _threads(cfg))), cfg.near_dup_threshold)
    elif sum(f.size for f in files + val_files) < SMALL_CORPUS_BYTES:
        keys = _cleaned_documents(files, val_files, cfg, s3, redact=cfg.redact_pii).map_batches(
            bucket_keys, fn_kwargs=hashing)
        edges = _edges_on_driver(watch(keys.iter_batches(batch_format="numpy", batch_size=None)),
                                 cfg.near_dup_threshold)
    else:
        # One partition per CPU: Ray Data's default (200) is sized for clusters, not a laptop.
        partitions = max(1, int(ray.cluster_resources().get("CPU", 1)))
        keys = _cleaned_documents(files, val_files, cfg, s3, redact=cfg.redact_pii).map_batches(
            bucket_keys, fn_kwargs=hashing)
        edges = keys.groupby("key", num_partitions=partitions).map_groups(
            bucket_edges, batch_format="numpy", fn_kwargs={"threshold": cfg.near_dup_threshold}
        ).iter_batches(batch_format="numpy", batch_size=None)
    clusters, exact, bad = UnionFind(), set(), []
    for b in edges:
        for af, al, bf, bl, ex, err in zip(b["a_file"].tolist(), b["a_line"].tolist(), b["b_file"].tolist(),
                                           b["b_line"].tolist(), b["exact"].tolist(), b["error"]):
            if err:
                bad.append((af, al, err))
                continue
            clusters.union((af, al), (bf, bl))
            if ex:
                exact.add((bf, bl))
    drop = {}
    for members in clusters.groups():
        first = min(members)
        for m in members:
            if m != first:
                drop[m] = "exact_duplicate" if m in exact else "near_duplicate"
    return drop, [err for _, _, err in sorted(bad)]


# --------------------------------------------------------------------------- prepare


def _document_stream(files, val_files, cfg: DataConfig, tokenizer, s3, tokenizer_actors: int, drop: dict,
                     read=None):
    """Ray Dataset of cleaned, de-duplicated, redacted and tokenized documents, in corpus order."""
    ds = _cleaned_documents(files, val_files, cfg, s3, drop=drop, redact=cfg.redact_pii, read=read,
                            tail=val_split_mode(cfg, files, val_files) == "tail")
    from ray.data import ActorPoolStrategy

    # One block per file: more actors than files would never get work (and Ray Data warns so).
    size = max(1, min(tokenizer_actors, len(files) + len(val_files) if read is None else len(read)))
    with warnings.catch_warnings():  # max_restarts has no named parameter yet (Ray 2.60)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(TokenizeDocuments, fn_constructor_args=(tokenizer,), batch_format="pyarrow",
                              batch_size=None, compute=ActorPoolStrategy(size=size), max_restarts=actor_restarts())


def runs_in_process(cfg: DataConfig, files: list, val_files: list) -> bool:
    """Whether `prepare` runs its stages here, on threads over the files, instead of on Ray
    Data: below data.in_process_mb a corpus is done before an actor pool would have started."""
    return sum(f.size for f in files + val_files) < cfg.in_process_mb * 1e6


def _threads(cfg: DataConfig) -> int:
    from raylm.tokenizer import usable_cpus

    return cfg.tokenizer_actors or usable_cpus()


def _ordered_map(fn: Callable, items: list, workers: int):
    """fn over items on `workers` threads, yielding results in the items' order, with at most
    2 * workers in flight (memory stays a few files' worth). Arrow's kernels and SentencePiece
    run outside the GIL, which is where these stages spend their time."""
    with ThreadPoolExecutor(max(1, min(workers, len(items))), thread_name_prefix="raylm-data") as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _clean_file(files, val_files, cfg: DataConfig, s3, drop: dict | None = None, redact: tuple[str, ...] = (),
                tail: bool = False) -> Callable:
    """`_cleaned_documents`'s stage for one file, in this process: FileInfo -> cleaned batch."""
    order = {f.uri: i for i, f in enumerate(files + val_files)}
    val = frozenset(f.uri for f in val_files)

    def clean(f: storage.FileInfo) -> dict:
        return parse_and_clean({"path": [f.uri], "bytes": [storage.read_bytes(f.uri, s3)]}, cfg, order, val,
                               drop, redact, tail)

    return clean


def _document_batches_in_process(files, val_files, cfg: DataConfig, tokenizer, s3, drop: dict):
    """`_document_stream`'s batches, made here: each thread reads, cleans and tokenizes whole
    files with its own copy of the tokenizer (a segment cache is not shared between threads)."""
    clean = _clean_file(files, val_files, cfg, s3, drop, cfg.redact_pii,
                        tail=val_split_mode(cfg, files, val_files) == "tail")
    local = threading.local()

    def tokenized(f: storage.FileInfo) -> pa.Table:
        if not hasattr(local, "stage"):
            local.stage = TokenizeDocuments(tokenizer.fork())
        return local.stage(pa.table(clean(f)))

    return _ordered_map(tokenized, files + val_files, _threads(cfg))


def actor_restarts() -> int:
    """Restarts for raylm's Ray Data actors: Ray's default (-1, forever) on a cluster, where
    nodes come and go; none on the one-machine cluster `init_ray` starts, where a dead actor
    means a real failure to report (and Ray logs an error-level line for every restartable
    actor whose constructor arguments sit in the object store, as Ray Data's all do)."""
    return 0 if os.environ.get("RAYLM_LOCAL_CLUSTER") == "1" else -1


def packed_blocks(batches: Iterable[pa.Table], cfg: DataConfig, eos_id: int, seed: int,
                  stats: PrepareStats | None = None, splits: tuple[str, ...] = ("train", "val")):
    """(split, block, source file indices) from tokenized document batches, in the order
    `prepare` writes them: each split's documents packed in corpus order, training blocks
    through the seeded shuffle window. The one definition of the block stream, shared by
    `prepare` (into shards) and data.mode=stream (straight into training). Bad records
    count against data.max_bad_records either way."""
    stats = stats if stats is not None else PrepareStats()
    block_len = cfg.seq_len + 1
    packers = {s: BlockPacker(block_len, eos_id) for s in splits}
    shuffle = ShuffleBuffer(cfg.shuffle_window, seed)
    for batch in batches:
        _account(batch, stats, cfg)
        keep = pa.compute.and_(pa.compute.equal(batch.column("error"), ""),
                               pa.compute.equal(batch.column("dropped"), ""))
        for split, mask in (("train", pa.compute.and_(keep, pa.compute.invert(batch.column("val")))),
                            ("val", pa.compute.and_(keep, batch.column("val")))):
            if split not in packers:
                continue
            ids = batch.column("ids").filter(mask).combine_chunks()
            if len(ids) == 0:
                continue
            offsets = ids.offsets.to_numpy(zero_copy_only=False)
            stats.doc_tokens.add(np.diff(offsets))
            stats.tokens += len(ids.values)
            packer = packers[split]
            blocks = packer.add(ids.values.to_numpy(zero_copy_only=False), offsets,
                                batch.column("file").filter(mask).to_numpy(zero_copy_only=False))
            pairs = list(zip(blocks, packer.last_sources))
            for b, src in (shuffle.push(pairs) if split == "train" else pairs):
                yield split, b, src
    if "train" in packers:
        for b, src in shuffle.drain():
            yield "train", b, src
    stats.partial_block_tokens = {s: len(p.buf) for s, p in packers.items()}


def corpus_files(cfg: DataConfig, s3) -> tuple[list[storage.FileInfo], list[storage.FileInfo]]:
    files = list_corpus(cfg.path, s3)
    val_files = list_corpus(cfg.val_path, s3) if cfg.val_path else []
    both = {f.uri for f in files} & {f.uri for f in val_files}
    if both:
        raise DataError(f"{sorted(both)[0]}: in both data.path and data.val_path; validation text must be held out")
    return files, val_files


def _duplicates(files, val_files, cfg: DataConfig, s3, stats: PrepareStats, log,
                in_process: bool = False) -> tuple[dict, list[str]]:
    """The first pass: (file, line) -> verdict for every document de-duplication drops, and
    the bad records it read, in corpus order. It reads every record, so bad ones past
    data.max_bad_records stop the run here, before any tokenizing (and, with
    data.mode=stream, before training starts)."""
    if cfg.dedup == "none":
        return {}, []
    t0 = time.time()
    log(f"data: finding {cfg.dedup} duplicates across {len(files) + len(val_files)} files")
    drop, bad = find_duplicates(files, val_files, cfg, s3, in_process, log=log)
    check_error_budget(bad, cfg)
    stats.dedup_seconds = round(time.time() - t0, 2)
    log(f"data: {len(drop)} duplicate documents found in {stats.dedup_seconds:.1f}s")
    return drop, bad


def _say_tail_split(cfg: DataConfig, files, val_files, log) -> None:
    if val_split_mode(cfg, files, val_files) == "tail":
        n = len(files)
        log(f"data: {n} text file{'s' if n > 1 else ''}, too few documents to hold out whole ones: validation is "
            f"the last {cfg.val_fraction:.0%} of each (data.val_split=tail)")


def source_rows(files) -> list[dict]:
    return [{"uri": f.uri, "size": f.size, "etag": f.etag_or_mtime} for f in files]


def tokenizer_pool_size() -> int:
    """Tokenizer actors for `prepare`: one per core, leaving a quarter of the logical CPUs
    (at least one) to the read tasks that feed them. Each actor holds a whole logical CPU,
    so a pool as large as the cluster would leave the reads no slot, and the pipeline would
    hang. On a one-node cluster running on this machine, cores are counted as well:
    `init_ray` gives it more logical CPUs than cores (so streaming tasks never starve), and
    more actors than cores would only add process start-ups on the same cores."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = cpus - max(1, cpus // 4)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address():
        from raylm.tokenizer import usable_cpus

        actors = min(actors, usable_cpus())
    return max(1, actors)


def stream_datasets(cfg: DataConfig, tokenizer, seed: int, s3: S3Config | None = None, readers: int = 1,
                    log=print, corpus: tuple | None = None) -> tuple[dict, dict]:
    """data.mode=stream: Ray Datasets of tokenized documents for training to pack itself
    (`packed_blocks`), one per split, and a manifest naming what they read. No shards are
    written; de-duplication still makes its first pass here. Each training worker runs its
    own execution of the stream (and `readers` tokenizer actors), so that the blocks a
    worker gets never depend on timing. The validation stream reads data.val_path, or the
    corpus until enough held-out documents have come by. `corpus`: (files, val_files) as
    `corpus_files` listed them already."""
    files, val_files = corpus or corpus_files(cfg, s3)
    _say_tail_split(cfg, files, val_files, log)
    drop, bad = _duplicates(files, val_files, cfg, s3, PrepareStats(), log)
    datasets = {"train": _document_stream(files, val_files, cfg, tokenizer, s3, readers, drop, read=files),
                "val": _document_stream(files, val_files, cfg, tokenizer, s3, readers, drop,
                                        read=val_files or files)}
    manifest = {
        "format_version": FORMAT_VERSION, "mode": "stream", "key": dataset_key(files, val_files, cfg, tokenizer.sha256, seed),
        "text_encoding": TEXT_ENCODING,
        "seed": seed, "seq_len": cfg.seq_len, "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "sources": source_rows(files), "val_sources": source_rows(val_files), "files": [f.uri for f in files + val_files],
        "dedup": cfg.dedup, "duplicates_dropped": len(drop), "bad_records": bad,
    }
    # No data card and no summary line come after: what the stream skips is said here, once.
    for b in bad[:10]:
        log(f"data: skipped bad record: {b}")
    if len(bad) > 10:
        log(f"data: ... and {len(bad) - 10} more bad records")
    if cfg.dedup == "none" and cfg.max_bad_records:
        log(f"data: data.dedup=none: no first pass reads the corpus, so the training workers skip bad records "
            f"(up to data.max_bad_records={cfg.max_bad_records}) without listing them")
    first = (f"de-duplication {cfg.dedup}, {_count(len(drop), 'duplicate')} and {_count(len(bad), 'bad record')} "
             f"skipped" if cfg.dedup != "none" else "no de-duplication")
    log(f"data: streaming {len(files) + len(val_files)} files straight into training (data.mode=stream: {first}; "
        f"no data card, so documents dropped by the length filters and PII replaced go uncounted)")
    return datasets, manifest


def prepare(cfg: DataConfig, tokenizer, out: str, seed: int, s3: S3Config | None = None,
            log=print, corpus: tuple | None = None) -> dict:
    """Run the whole pipeline into `out` and return its manifest. Reuses a complete identical
    dataset already at `out`. Shards go under a fresh attempt prefix and count only once
    `manifest.json`, written last, names them; an interrupted prepare leaves nothing a later
    run would read. A Markdown data card (DATACARD.md) goes beside the manifest. `corpus`:
    (files, val_files) as `corpus_files` listed them already."""
    files, val_files = corpus or corpus_files(cfg, s3)
    _say_tail_split(cfg, files, val_files, log)
    key = dataset_key(files, val_files, cfg, tokenizer.sha256, seed)
    existing = read_manifest(out, s3, strict=True)  # another tool's manifest is not written over
    if existing and existing.get("key") == key:
        # The key leaves data.max_bad_records out (the same records make the same blocks); the
        # bad records skipped when it was made must still be within this run's budget.
        check_error_budget(existing.get("stats", {}).get("bad_records", []), cfg)
        log(f"data: reusing prepared dataset at {out} ({existing['train']['blocks']} train blocks)")
        return existing

    attempt = storage.join(out, f"attempt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    block_len = cfg.seq_len + 1
    stats = PrepareStats(files=len(files) + len(val_files), bytes_read=sum(f.size for f in files + val_files))
    t0 = time.time()
    in_process = runs_in_process(cfg, files, val_files)
    if in_process:  # no Ray here: importing Ray Data alone took about 0.8 s of a 10 MB run's 4.4 s
        log(f"data: {stats.bytes_read / 1e6:.1f} MB, under data.in_process_mb={cfg.in_process_mb:g}: "
            f"preparing in this process on {_count(min(_threads(cfg), stats.files), 'thread')}")
    else:
        import ray

        # determinism: blocks are a function of the corpus
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    drop, _ = _duplicates(files, val_files, cfg, s3, stats, log, in_process)  # the second pass counts the bad ones
    writers = {s: ShardWriter(attempt, s, block_len, cfg.blocks_per_shard, s3) for s in ("train", "val")}
    if in_process:
        batches = _document_batches_in_process(files, val_files, cfg, tokenizer, s3, drop)
    else:
        actors = cfg.tokenizer_actors or tokenizer_pool_size()
        batches = _document_stream(files, val_files, cfg, tokenizer, s3, actors, drop).iter_batches(
            batch_format="pyarrow", batch_size=None)
    # packed_blocks counts each batch into stats before it asks for the next, when the bar is drawn
    batches = watched(batches, files + val_files, "data: tokenizing", log,
                      lambda: f"{stats.documents:,} docs, {stats.tokens / 1e6:.2f}M tokens")
    for split, block, sources in packed_blocks(batches, cfg, tokenizer.eos_id, seed, stats):
        writers[split].add(block, sources)
    for w in writers.values():
        w.flush()
    stats.train_blocks, stats.val_blocks = writers["train"].blocks, writers["val"].blocks
    stats.seconds = round(time.time() - t0, 2)
    if stats.train_blocks == 0:
        raise DataError(f"{cfg.path}: corpus yields no training blocks of {block_len} tokens "
                        f"({stats.documents_read} documents read, {_losses(stats, cfg) or 'none dropped'}; "
                        f"{stats.documents} kept, {stats.tokens} tokens); add text or lower data.seq_len")
    if stats.val_blocks == 0:
        how = {"tail": "the held-out tails are shorter than one block",
               "document": "no document was held out"}.get(val_split_mode(cfg, files, val_files), "")
        raise DataError(f"{cfg.path}: validation split is empty ({how or 'data.val_path yields no block'}); "
                        f"raise data.val_fraction (now {cfg.val_fraction}), set data.val_split=tail, or set "
                        f"data.val_path")
    rel = storage.relative(attempt, out)
    manifest = {
        "format_version": FORMAT_VERSION, "key": key, "text_encoding": TEXT_ENCODING, "seed": seed,
        "seq_len": cfg.seq_len,
        "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "sources": source_rows(files), "val_sources": source_rows(val_files),
        # Shards name their source files by index into this list (training files, then validation files).
        "files": [f.uri for f in files + val_files],
        "train": {"blocks": stats.train_blocks,
                  "shards": [dict(s, path=f"{rel}/{s['path']}") for s in writers["train"].shards]},
        "val": {"blocks": stats.val_blocks,
                "shards": [dict(s, path=f"{rel}/{s['path']}") for s in writers["val"].shards]},
        "config": {k: getattr(cfg, k) for k in ("text_field", "min_chars", "max_chars", "dedup",
                                               "near_dup_threshold", "minhash_perm", "redact_pii",
                                               "max_bad_records")},
        "stats": stats.to_dict(),
    }
    card = datacard(manifest)
    _check_attempt_whole(out, attempt, manifest, s3)
    storage.write_text(storage.join(out, DATACARD), card, s3)
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1), s3)  # last: the commit
    remove_stale_attempts(out, rel, s3)
    log(summary_line(stats))
    if stats.dropped.get("too_long") or stats.dropped.get("too_short"):
        log(f"data: dropped {_losses(stats, cfg, filters_only=True)}")
    for bad in stats.bad_records[:10]:
        log(f"data: skipped bad record: {bad}")
    if len(stats.bad_records) > 10:
        log(f"data: ... and {len(stats.bad_records) - 10} more bad records (listed in {MANIFEST})")
    return manifest


class CorpusProgress:
    """How many of the corpus's bytes the document stream has delivered, for `prepare`'s
    progress bar: every file before the current one (the stream keeps corpus order), plus the
    current one's characters where a character is about a byte (uncompressed text and JSON
    lines; a compressed file counts once the stream has moved past it)."""

    def __init__(self, files: list[storage.FileInfo]):
        self.sizes = np.array([f.size for f in files], dtype=np.int64)
        self.plain = [not f.uri.lower().endswith((".gz", ".parquet")) for f in files]
        self.current, self.whole, self.partial = 0, 0, 0

    def observe(self, batch) -> int:
        """Count a batch (an Arrow table or a dict of arrays, with "file" and "chars" columns)."""
        files = np.asarray(batch["file"])
        if len(files) == 0:
            return self.done
        top = int(files.max())
        if top > self.current:
            self.whole += int(self.sizes[self.current:top].sum())
            self.current, self.partial = top, 0
        if top == self.current and self.plain[top]:
            self.partial += int(np.asarray(batch["chars"])[files == top].sum())
        return self.done

    @property
    def done(self) -> int:
        return self.whole + min(self.partial, int(self.sizes[self.current]) if len(self.sizes) else 0)


def watched(batches: Iterable, files: list[storage.FileInfo], label: str, log, note: Callable[[], str] | None = None):
    """`batches` passed through unchanged, with a progress bar of how far they are through
    `files` (`CorpusProgress`), drawn each time the consumer asks for the next batch."""
    progress = Progress(label, sum(f.size for f in files), unit="MB", scale=1e6, log=log)
    reading = CorpusProgress(files)
    try:
        for batch in batches:
            done = reading.observe(batch)
            yield batch
            progress.update(done, note() if note else "")
    finally:
        progress.close()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def summary_line(stats: PrepareStats) -> str:
    dups = sum(v for k, v in stats.dropped.items() if k.endswith("_duplicate"))
    filtered = sum(v for k, v in stats.dropped.items() if not k.endswith("_duplicate"))
    return (f"data: read {stats.documents_read} documents ({stats.bytes_read / 1e6:.1f} MB from {_count(stats.files, 'file')}); "
            f"kept {stats.documents} ({stats.val_documents} val), dropped {filtered} by filters, "
            f"{dups} as duplicates, {len(stats.bad_records)} bad records; "
            f"PII replaced {sum(stats.pii.values())}; {stats.tokens / 1e6:.2f}M tokens -> "
            f"{stats.train_blocks} train + {stats.val_blocks} val blocks{_partial_blocks(stats)} in "
            f"{stats.seconds:.1f}s ({stats.bytes_read / 1e6 / max(stats.seconds, 1e-9):.1f} MB/s)")


def _partial_blocks(stats: PrepareStats) -> str:
    """The tokens after each split's last full block, which are left out: " (12 + 3 tokens past
    the last full blocks left out)"."""
    left = stats.partial_block_tokens
    if not any(left.values()):
        return ""
    return f" ({left.get('train', 0)} + {left.get('val', 0)} tokens past the last full blocks left out)"


def _losses(stats: PrepareStats, cfg: DataConfig, filters_only: bool = False) -> str:
    """Where documents went, for messages: "2 longer than data.max_chars=10000000, 1 bad records"."""
    said = {"too_long": f"longer than data.max_chars={cfg.max_chars}",
            "too_short": f"shorter than data.min_chars={cfg.min_chars}",
            "exact_duplicate": "exact duplicates", "near_duplicate": "near duplicates"}
    parts = [f"{stats.dropped[r]} {text}" for r, text in said.items()
             if stats.dropped.get(r) and not (filters_only and r.endswith("_duplicate"))]
    if stats.bad_records and not filters_only:
        parts.append(f"{len(stats.bad_records)} bad records")
    return ", ".join(parts)


def check_error_budget(bad_records: list[str], cfg: DataConfig) -> None:
    """The first bad record past data.max_bad_records, as the error (records come in corpus order)."""
    if len(bad_records) > cfg.max_bad_records:
        budget = cfg.max_bad_records
        extra = f" ({len(bad_records)} bad records > data.max_bad_records={budget})" if budget else ""
        raise DataError(bad_records[budget] + extra)


def _account(batch: pa.Table, stats: PrepareStats, cfg: DataConfig) -> None:
    errors = [e for e in batch.column("error").to_pylist() if e]
    stats.bad_records.extend(errors)
    check_error_budget(stats.bad_records, cfg)
    # A document split into head and held-out tail is two rows (data.val_split=tail): counted
    # once, by its first row, and as a validation document by its tail.
    first = pa.compute.invert(batch.column("tail"))
    stats.documents_read += pa.compute.sum(first.cast(pa.int64())).as_py() or 0
    for reason in batch.column("dropped").to_pylist():
        if reason:
            stats.dropped[reason] = stats.dropped.get(reason, 0) + 1
    ok = pa.compute.and_(pa.compute.equal(batch.column("error"), ""), pa.compute.equal(batch.column("dropped"), ""))
    stats.documents += pa.compute.sum(pa.compute.and_(ok, first).cast(pa.int64())).as_py() or 0
    stats.val_documents += pa.compute.sum(pa.compute.and_(ok, batch.column("val")).cast(pa.int64())).as_py() or 0
    stats.chars.add(batch.column("chars").filter(pa.compute.and_(ok, first)).to_numpy(zero_copy_only=False))
    for t in cfg.redact_pii:
        stats.pii[t] = stats.pii.get(t, 0) + (pa.compute.sum(batch.column(f"pii_{t}")).as_py() or 0)


def datacard(manifest: dict) -> str:
    """The Markdown data card: what went in, what was removed and why, what came out."""
    st, c = manifest["stats"], manifest["config"]
    read = max(st["documents_read"], 1)

    def rate(n: int) -> str:
        return f"{n} ({100 * n / read:.2f}%)"

    lines = [
        "# Data card", "",
        f"Prepared dataset `{manifest['key'][:16]}`: {manifest['train']['blocks']} training and "
        f"{manifest['val']['blocks']} validation blocks of {manifest['seq_len'] + 1} tokens, "
        f"tokenizer `{manifest['tokenizer_sha256'][:12]}` (vocabulary {manifest['vocab_size']}), seed {manifest['seed']}.",
        "", "## Sources", "",
        f"{st['files']} files, {st['bytes_read'] / 1e6:.2f} MB, {st['documents_read']} records read.", "",
        "| file | bytes | checksum / ETag |", "|---|---:|---|",
        *[f"| `{s['uri']}` | {s['size']} | `{s['etag']}` |" for s in manifest["sources"][:50]],
        *[f"| `{s['uri']}` (validation) | {s['size']} | `{s['etag']}` |" for s in manifest["val_sources"][:50]],
    ]
    if len(manifest["sources"]) > 50 or len(manifest["val_sources"]) > 50:
        lines.append(f"| ... | | (all {len(manifest['files'])} files are listed in {MANIFEST}) |")
    drops = st["dropped"]
    lines += [
        "", "## Filters and de-duplication", "",
        f"Cleaning: Unicode NFC, control characters removed, whitespace normalised; documents "
        f"shorter than {c['min_chars']} or longer than {c['max_chars']} characters dropped. "
        f"De-duplication: `{c['dedup']}`"
        + (f" (MinHash with {c['minhash_perm']} permutations over 5-word shingles, LSH candidates "
           f"verified at estimated Jaccard {c['near_dup_threshold']})" if c["dedup"] == "near" else "")
        + "; the first occurrence is kept.",
        "", "| removed | documents (share of records read) |", "|---|---:|",
        f"| too short | {rate(drops.get('too_short', 0))} |",
        f"| too long | {rate(drops.get('too_long', 0))} |",
        f"| exact duplicate | {rate(drops.get('exact_duplicate', 0))} |",
        f"| near duplicate | {rate(drops.get('near_duplicate', 0))} |",
        f"| bad record (error budget {c['max_bad_records']}) | {rate(len(st['bad_records']))} |",
        f"| **kept** | {rate(st['documents'])} |",
        "", "## PII", "",
        ("Redacted types: " + ", ".join(c["redact_pii"]) + ". Replacements:" if c["redact_pii"]
         else "PII redaction was off."), "",
    ]
    if c["redact_pii"]:
        lines += ["| type | replaced |", "|---|---:|", *[f"| {t} | {n} |" for t, n in st["pii"].items()], ""]
    ch, tk = st["chars"], st["doc_tokens"]
    lines += [
        "## Documents and tokens", "",
        "| per kept document | mean | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|",
        f"| characters | {ch['mean']} | {ch['p50']} | {ch['p90']} | {ch['p99']} | {ch['max']} |",
        f"| tokens | {tk['mean']} | {tk['p50']} | {tk['p90']} | {tk['p99']} | {tk['max']} |", "",
        "Percentiles are upper bounds of power-of-two bins.", "",
        f"Tokens: {st['tokens']} in total ({st['val_documents']} validation documents); "
        f"{st['train_blocks']} training blocks, {st['val_blocks']} validation blocks.", "",
    ]
    left = st.get("partial_block_tokens") or {}
    if any(left.values()):
        lines += [f"Left out: the {left.get('train', 0)} training and {left.get('val', 0)} validation tokens "
                  f"(EOS included) after each split's last full block, too few to fill one.", ""]
    if st["bad_records"]:
        lines += ["## Bad records skipped", "", *[f"- {b}" for b in st["bad_records"][:100]], ""]
    return "\n".join(lines)


def _check_attempt_whole(out: str, attempt: str, manifest: dict, s3) -> None:
    """Every shard the manifest about to be committed names is still there: another prepare into
    the same directory that finished first removes this one's attempt (`remove_stale_attempts`
    takes it for a killed one), and a manifest naming removed shards would be committed over
    that prepare's whole one (and then remove it in turn)."""
    listed = {storage.relative(f.uri, out) for f in storage.list_files(attempt, s3, pattern=False)}
    missing = [storage.join(out, s["path"]) for split in ("train", "val") for s in manifest[split]["shards"]
               if s["path"] not in listed]
    if missing:
        raise DataError(f"{out}: {_count(len(missing), 'shard')} of this prepare were removed while it ran "
                        f"({missing[0]}), by another `raylm data prepare` into the same directory; its dataset "
                        f"there is left as it is: run one prepare at a time into a directory")


def remove_stale_attempts(out: str, keep: str, s3) -> None:
    """Every attempt under `out` but `keep`, whole: deleting only the files a listing shows
    left each old attempt's directories behind, and the partial shard a killed write left
    (a temporary file, which listings leave out), on every re-prepare. Only directories holding
    nothing but an attempt's `train` and `val` are attempts: a file or directory of the user's
    whose name starts with "attempt-" is left alone."""
    inside: dict[str, set] = collections.defaultdict(set)  # name -> what it holds (None: it is a file)
    for f in storage.list_files(out, s3, pattern=False):
        name, _, rest = storage.relative(f.uri, out).partition("/")
        inside[name].add(rest.split("/", 1)[0] if rest else None)
    if not storage.is_s3(out) and os.path.isdir(out):  # also attempts holding no finished file
        for name in os.listdir(out):
            path = os.path.join(out, name)
            inside[name].update(os.listdir(path) if os.path.isdir(path) and not os.path.islink(path) else [None])
    for name in sorted(inside):
        if name.startswith("attempt-") and name != keep and inside[name] <= {"train", "val"}:
            storage.delete(storage.join(out, name), s3)


# --------------------------------------------------------------------------- training input


def shard_uris(out: str, manifest: dict, split: str) -> list[str]:
    """The split's shards, each a path inside `out`: a manifest naming one elsewhere (absolute,
    '..', or '.' and empty segments) is a DataError, before anything is read."""
    uris = []
    for s in manifest[split]["shards"]:
        rel = s["path"]
        if not isinstance(rel, str) or rel.startswith(("/", "\\")) or any(
                p in ("", ".", "..") or "\\" in p for p in rel.split("/")):
            raise DataError(f"{storage.join(out, MANIFEST)}: shard path {rel!r} is not a file inside the dataset; "
                            f"not a manifest raylm wrote: prepare the dataset again (`raylm data prepare`)")
        uris.append(storage.join(out, rel))
    return uris


# Below this size a split is loaded once by the driver and handed to Ray as in-memory blocks.
IN_MEMORY_BYTES = 256 * 2**20


def check_manifest_whole(out: str, manifest: dict) -> None:
    """DataError naming the manifest of the prepared dataset at `out` and its field, where a
    field training reads is missing or of the wrong type (a manifest edited by hand, or from
    another version): it was a KeyError or TypeError deep in the loading."""
    damage = _manifest_damage(manifest, whole=True) if is_raylm_manifest(manifest) else None
    if damage is not None:
        raise DataError(f"{storage.join(out, MANIFEST)}: a damaged manifest ({damage}); prepare the dataset "
                        f"again (`raylm data prepare`)")


def prepared_datasets(out: str, manifest: dict, s3: S3Config | None = None) -> dict:
    """The "train" and "val" Ray Datasets of a prepared dataset, for `run_ray_training`."""
    check_manifest_whole(out, manifest)
    return {split: training_dataset(out, manifest, split, s3) for split in ("train", "val")}


def training_dataset(out: str, manifest: dict, split: str, s3: S3Config | None = None):
    """Ray Dataset of a split's rows in manifest order: packed blocks (column `tokens`, int32
    [seq_len + 1]), or the columns an SFT or DPO manifest names.

    Large splits stream from storage through read tasks. Small ones are read here once and
    put in the object store: each worker iterates the dataset once per epoch, and on a busy
    node every read task's process start costs seconds, which would dominate a small run.
    Every shard's column types are checked first (`check_plain_types`)."""
    import ray

    columns = list(manifest.get("columns", ["tokens"]))
    uris = shard_uris(out, manifest, split)
    rows = [s.get("rows") for s in manifest[split]["shards"]]
    row_bytes = manifest.get("row_bytes", (manifest["seq_len"] + 1) * 4)
    if manifest[split]["blocks"] * row_bytes < IN_MEMORY_BYTES:
        tables = []
        for u, n in zip(uris, rows):
            t = _read_shard(u, storage.read_bytes(u, s3), columns)
            _check_shard(u, t.schema, t.num_rows, n, columns)
            tables.append(t)
        # from_blocks: the same in-memory dataset as from_arrow, with each table's metadata
        # computed here; from_arrow runs a task a table for it, which on a cluster still
        # starting waits for a worker process and its import of Ray Data (about 2 s on 2 cores).
        return ray.data.from_blocks(tables)
    fs, _ = storage.filesystem(uris[0], s3)
    for u, n in zip(uris, rows):  # footers only: a few KB a shard
        with fs.open_input_file(storage.filesystem(u, s3)[1]) as f:
            footer = _read_shard(u, f, None)
            _check_shard(u, footer.schema_arrow, footer.metadata.num_rows, n, columns)
    return ray.data.read_parquet([storage.filesystem(u, s3)[1] for u in uris], filesystem=fs, columns=columns)


def _read_shard(uri: str, source, columns: list[str] | None):
    """A prepared shard's table (its bytes, `source`, read for `columns`), or with `columns`
    None its footer; a damaged shard (a copy cut short, a file written over) is a DataError
    naming it, not pyarrow's traceback, which names no file."""
    try:
        if columns is None:
            return pq.ParquetFile(source)  # reads the footer alone, as pq.read_schema does
        return pq.read_table(io.BytesIO(source), columns=columns)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{uri}: damaged shard of a prepared dataset ({str(e).splitlines()[0][:200]}); "
                        f"prepare the dataset again (`raylm data prepare`)") from None


def _check_shard(uri: str, schema: pa.Schema, num_rows: int, rows: int | None, columns: list[str]) -> None:
    """A shard holds the columns and the rows its manifest entry names; its column types are
    plain (`check_plain_types`)."""
    missing = [c for c in columns if schema.get_field_index(c) < 0]
    if missing:
        raise DataError(f"{uri}: no column {missing[0]!r} (columns: {', '.join(schema.names)}); not a shard of this "
                        f"prepared dataset: prepare the dataset again (`raylm data prepare`)")
    if rows is not None and num_rows != rows:
        raise DataError(f"{uri}: {num_rows} rows, but the manifest names {rows}; the shard was changed since it "
                        f"was prepared: prepare the dataset again (`raylm data prepare`)")
    check_plain_types(pa.schema([schema.field(c) for c in columns]), uri)

