"""Chat and preference records -> training rows for SFT and DPO, on Ray Data.

    read (.jsonl, .jsonl.gz, .parquet; local or s3://), one task per file
      -> parse and validate each record (file and line kept for errors)
      -> redact PII (data.redact_pii, raylm.pii, as pre-training does) in every text it trains
         on: message contents, prompt, completion, chosen, rejected; counted per type
      -> render the chat template and its loss mask (Tokenizer.encode_chat)
      -> split train/val by a stable hash of the redacted conversation (SFT: its messages, so
         a record's other fields, such as an id or a source, do not move it; DPO: the prompt
         alone, so that the pairs of one prompt land on one side and validation never scores
         a prompt trained on)
      -> de-duplicate (data.dedup), on the driver, in corpus order: a record whose redacted
         conversation (DPO: the whole prompt, chosen, rejected) repeats an earlier kept one
         is dropped and counted
      -> SFT: pack whole conversations into rows of seq_len + 1 tokens, EOS after each
         (training masks attention at each EOS: no cross-talk, positions restart)
         DPO: one pair per row, chosen and rejected side by side, so a pair is never split
      -> parquet shards + manifest.json (written last), the same layout as pre-training's

Record formats:
    SFT  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
         {"prompt": str, "completion": str}
    DPO  {"prompt": str, "chosen": str, "rejected": str}
         {"messages": [...the conversation so far, ending with a user turn...], "chosen": str, "rejected": str}
         TRL's conversational forms: "prompt" as such a message list, "chosen" and "rejected" as
         [{"role": "assistant", "content": str}]; or, with no prompt, "chosen" and "rejected" as
         whole conversations, the same up to their last (assistant) message
         (a pair's loss mask covers its response alone, never earlier assistant turns)
    A content may be OpenAI's list of text parts ([{"type": "text", "text": str}, ...], joined
    with nothing between, as raylm serve joins them); "developer" is a system message. Parquet
    text stored as bytes is read as UTF-8; a parquet file's other columns are not read. A JSON
    record that names a field, or a message's role or content, twice is a bad record.

A record that is malformed (unknown role, empty content, `messages` not a list, no
assistant turn, a lone surrogate escape in text, a DPO pair whose chosen and rejected are the
same text or encode to the same tokens) or longer than a row is a bad record naming
file and line; a null field (parquet rows have every column) counts as absent; within
data.max_bad_records they are counted and skipped, as in pre-training. Instruction sets are
small next to pre-training corpora, so the driver holds the encoded records and shuffles
them whole (seeded) before packing.

Redaction comes before the split hash and the duplicate key: two records that differ only in
an address redacted away train as the same text, so they are duplicates and land on one side.
(Pre-training splits a document on its text before redaction; a chat record's split follows
what is trained on.) The messages and prompt/completion forms of one conversation are one record.

De-duplication is exact for records, whether data.dedup is "exact" or "near"; "none" keeps
every record. MinHash near-dedup (raylm.dedup) is tuned for web documents, where text that
shares 80% of its 5-word shingles is a mirror or a boilerplate variant. Chat records share
text by design: a fixed system prompt of a few hundred words, one passage with many questions
about it, a prompt's several DPO pairs that differ in the rejected answer alone. Those are
distinct records that near-dedup at 0.8 would drop, with the default data.dedup=near. An
exact repeat (datasets merged from overlapping sources) is what this catches; the manifest
names the mode applied (`config.dedup`) and counts what was dropped (`stats.dropped`) and
replaced (`stats.pii`).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylm import storage
from raylm.config import DataConfig, S3Config
from raylm.data import (CLEANING, FORMAT_VERSION, MANIFEST, DataError, check_error_budget, remove_stale_attempts,
                        source_rows, list_corpus, read_manifest)
from raylm.dedup import content_hash
from raylm.documents import (column_values, encodable, check_plain_types, decompressed, json_lines,
                             read_parquet, stable_fraction)
from raylm.pii import PII_TYPES, redact as redact_pii
from raylm.tokenizer import CHAT_ROLES

KINDS = ("sft", "dpo")
COLUMNS = {"sft": ("tokens", "loss_mask"), "dpo": ("chosen", "chosen_mask", "rejected", "rejected_mask")}


# --------------------------------------------------------------------------- records


# The fields a record is read from (a parquet file's other columns are never converted), and
# within them, the keys of a message and of a content part. A key named twice in one of these
# objects is a bad record: json.loads keeps the last of repeated names without a word, so which
# text trains would be the file's accident.
FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")
MESSAGE_KEYS = ("role", "content")
PART_KEYS = ("type", "text")


def parse_records(path: str, raw: bytes):
    """(line, record dict) or (line, DataError) for each record of one file."""
    try:
        raw = decompressed(path, raw)
    except DataError as e:
        yield 0, e
        return
    if path.lower().endswith(".parquet"):
        yield from _parquet_records(path, raw)
        return
    for i, value in json_lines(path, raw, object_pairs_hook=_Pairs.of):
        twice = _named_twice(value)
        if twice:
            value = DataError(f"{path}:{i}: {twice} appears more than once in one record (JSON keeps "
                              f"the last silently: which one is meant is unknown)")
        yield i, value


class _Pairs(dict):
    """A JSON object that remembers which of its keys were named more than once."""
    repeated: frozenset = frozenset()

    @classmethod
    def of(cls, items: list) -> "_Pairs":
        d = cls(items)
        if len(d) < len(items):
            seen: set = set()
            d.repeated = frozenset(k for k, _ in items if k in seen or seen.add(k))
        return d


def _named_twice(record) -> str | None:
    """What a record (parsed with `_Pairs.of`) names twice among what is read of it: a field,
    a message's role or content, a content part's type or text; None if nothing."""
    if not isinstance(record, _Pairs):
        return None
    for key in FIELDS:
        if key in record.repeated:
            return f"field {key!r}"
    for key in FIELDS:
        messages = record.get(key)
        for i, m in enumerate(messages if isinstance(messages, list) else ()):
            if not isinstance(m, _Pairs):
                continue
            for k in MESSAGE_KEYS:
                if k in m.repeated:
                    return f"{key!r} message {i}: key {k!r}"
            for j, part in enumerate(m["content"] if isinstance(m.get("content"), list) else ()):
                for k in PART_KEYS:
                    if isinstance(part, _Pairs) and k in part.repeated:
                        return f"{key!r} message {i} content part {j}: key {k!r}"
    return None


def _parquet_records(path: str, raw: bytes):
    """A parquet file's rows as records of its FIELDS columns alone (other columns are never
    converted: a score, an id or text that is not UTF-8 there is not the record's concern).
    Text stored as bytes (binary columns, at any depth: a `messages` list of structs of binary
    role and content) is read as UTF-8, as corpus files' is; a value that is not UTF-8, in a
    string or a binary column, is a bad record naming its row and column."""
    try:
        table = read_parquet(path, raw)
    except DataError as e:
        yield 0, e
        return
    try:  # every column, read or not: a file with a column that unpickles is refused whole
        check_plain_types(table.schema, path)
    except DataError as e:
        yield 0, e
        return
    names = [c for c in FIELDS if c in table.column_names]
    if not names:
        yield 0, DataError(f"{path}: no column {', '.join(map(repr, FIELDS))} (columns: "
                           f"{', '.join(table.column_names) or 'none'})")
        return
    columns = {name: column_values(table.column(name), path, name) for name in names}
    for i in range(table.num_rows):
        record = {name: columns[name][i] for name in names}
        bad = next((v for v in record.values() if isinstance(v, DataError)), None)
        yield i + 1, bad if bad is not None else record


def _type_name(value) -> str:
    """The JSON value's type as errors name it: a JSON object is a dict (`_Pairs` is ours)."""
    return "dict" if isinstance(value, dict) else type(value).__name__


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"{_type_name(value)} {value!r}"[:60]
        raise DataError(f"{where}: field {key!r} must be a non-empty string (got {got})")
    if not encodable(value):
        raise DataError(f"{where}: field {key!r} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), not text")
    return value


def _has(record: dict, key: str) -> bool:
    """Whether the record sets `key`: in parquet every row has every column, null where unset."""
    return record.get(key) is not None


def _content(m: dict, where: str) -> str:
    """A message's text: a string, or OpenAI's list of content parts (`[{"type": "text", "text":
    ...}, ...]`, which raylm serve takes too) joined as serve joins them, with nothing between."""
    parts = m.get("content")
    if not isinstance(parts, list):
        return _text(m, "content", where)
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text":
            got = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DataError(f"{where}: content part {j} is {got!r}, not a text part ({{\"type\": \"text\", "
                            f"\"text\": ...}}): only text trains")
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}: content part {j}: 'text' must be a string")
        texts.append(part["text"])
    return _text({"content": "".join(texts)}, "content", where)


# OpenAI's newer name of the system role; raylm serve reads it so too.
ROLE_ALIASES = {"developer": "system"}


def _messages(record: dict, where: str, need_assistant: bool, key: str = "messages") -> list[dict]:
    msgs = record[key]
    if not isinstance(msgs, list) or not msgs:
        hint = " (a JSON string of the list? give the list itself)" if isinstance(msgs, str) and \
            msgs.lstrip().startswith("[") else ""
        raise DataError(f"{where}: {key!r} must be a non-empty list (got {_type_name(msgs)}){hint}")
    out = []
    field = "" if key == "messages" else f"{key!r} "  # a DPO record's lists: which of them
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field}message {i} is a {type(m).__name__}, not an object with role and "
                            f"content")
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role  # a list or object: unhashable
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: {field}message {i} has role {m.get('role')!r}; expected one of "
                            f"{', '.join(CHAT_ROLES)}")
        out.append({"role": role, "content": _content(m, f"{where}: {field}message {i}")})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message, so nothing to learn from")
    return out


def _response(record: dict, key: str, where: str) -> str:
    """A DPO side: a string, or (TRL's conversational form) a list of one assistant message."""
    value = record.get(key)
    if not isinstance(value, list):
        return _text(record, key, where)
    msgs = _messages(record, where, need_assistant=False, key=key)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise DataError(f"{where}: {key!r} as a list must be one assistant message, the response (got "
                        f"{', '.join(m['role'] for m in msgs)})")
    return msgs[0]["content"]


def _dpo_prompt(record: dict, where: str) -> list[dict]:
    """A DPO record's conversation before its responses: `messages`, or `prompt` as a string or
    (TRL's conversational form) a message list; with neither, TRL's implicit prompt: `chosen` and
    `rejected` as whole conversations, the same up to their last message, each response."""
    for key in ("messages", "prompt"):
        if _has(record, key) and (key == "messages" or isinstance(record[key], list)):
            prompt = _messages(record, where, need_assistant=False, key=key)
            break
    else:
        if not _has(record, "prompt") and isinstance(record.get("chosen"), list) \
                and isinstance(record.get("rejected"), list):
            sides = [_messages(record, where, need_assistant=False, key=k) for k in ("chosen", "rejected")]
            if any(len(s) < 2 or s[-1]["role"] != "assistant" for s in sides) or sides[0][:-1] != sides[1][:-1]:
                raise DataError(f"{where}: with no 'prompt', 'chosen' and 'rejected' must be conversations that "
                                f"are the same up to their last message, an assistant response each")
            prompt, key = sides[0][:-1], "chosen"
        else:
            return [{"role": "user", "content": _text(record, "prompt", where)}]
    if prompt[-1]["role"] != "user":  # chosen and rejected answer the last turn
        raise DataError(f"{where}: {key!r} must end with a user message, the one chosen and rejected answer "
                        f"(the last is {prompt[-1]['role']!r})")
    return prompt


def conversation(record, kind: str, where: str):
    """The messages an SFT record trains on, or (prompt messages, chosen, rejected) for DPO."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if kind == "sft":
        if _has(record, "messages"):
            return _messages(record, where, need_assistant=True)
        if _has(record, "prompt") or _has(record, "completion"):
            return [{"role": "user", "content": _text(record, "prompt", where)},
                    {"role": "assistant", "content": _text(record, "completion", where)}]
        found = ", ".join(k for k in record if _has(record, k)) or "nothing"
        raise DataError(f"{where}: expected 'messages' or 'prompt' and 'completion' (found: {found})")
    prompt = _dpo_prompt(record, where)
    if not _has(record, "prompt") and not _has(record, "messages") and isinstance(record.get("chosen"), list):
        chosen, rejected = (_messages(record, where, False, k)[-1]["content"] for k in ("chosen", "rejected"))
    else:
        chosen, rejected = _response(record, "chosen", where), _response(record, "rejected", where)
    if chosen == rejected:
        # Identical sides make the DPO margin zero whatever the weights: a constant loss with no
        # gradient, yet the pair counts in the normaliser and in preference accuracy.
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same text, so the pair prefers nothing")
    return prompt, chosen, rejected


def redact_conversation(conv, kind: str, types: tuple[str, ...], where: str = "record"):
    """`conversation`'s texts with the PII of `types` replaced (raylm.pii.redact, as
    pre-training redacts documents), and the replacements per type."""
    counts = {t: 0 for t in PII_TYPES if t in types}
    if not types:
        return conv, counts

    def redacted(text: str) -> str:
        text, found = redact_pii(text, types)
        for t, n in found.items():
            counts[t] += n
        return text

    messages = conv if kind == "sft" else conv[0]
    messages = [{"role": m["role"], "content": redacted(m["content"])} for m in messages]
    if kind == "sft":
        return messages, counts
    chosen, rejected = redacted(conv[1]), redacted(conv[2])
    if chosen == rejected:  # the zero margin `conversation` refuses, reached through redaction
        raise DataError(f"{where}: 'chosen' and 'rejected' differ only in PII that data.redact_pii replaces, "
                        f"so the pair prefers nothing once redacted")
    return (messages, chosen, rejected), counts


def encode_response(tok, prompt: list[dict], reply: str, prompt_len: int | None = None
                    ) -> tuple[list[int], list[bool]]:
    """Ids of `prompt` and one assistant `reply`, masked on the reply and its `<|end|>` alone:
    DPO scores a response, not the assistant turns of the conversation before it (an
    average-logprob loss would be diluted by them). `prompt_len`: `prompt_length(tok, prompt)`,
    when the caller encodes several replies to one prompt."""
    ids, mask = tok.encode_chat([*prompt, {"role": "assistant", "content": reply}])
    n = prompt_length(tok, prompt) if prompt_len is None else prompt_len
    return ids, [False] * n + mask[n:]


def prompt_length(tok, prompt: list[dict]) -> int:
    """How many ids of a reply's conversation are its prompt's: segments encode alone, so the
    prompt with its generation prompt is a prefix of every reply's ids."""
    return len(tok.encode_chat(prompt, add_generation_prompt=True)[0])


def encode_record(tok, record, kind: str, where: str):
    """Token ids and loss masks of one record: [(ids, mask)] for SFT (EOS appended, outside the
    loss), [(chosen ids, mask), (rejected ids, mask)] for DPO."""
    return encode_conversation(tok, conversation(record, kind, where), kind, where)


def split_text(conv, kind: str) -> str:
    """What decides a record's split (`stable_fraction` of it), from its (redacted)
    `conversation`. SFT: the messages trained on, never the record's other fields, so one
    conversation with another id or source lands on the same side (it was the whole record:
    a copy with other metadata could train while validation scored it). DPO: the prompt alone
    (the conversation before the chosen and rejected answers, in either record form), so that
    a prompt's several pairs land on one side: a pair of a trained prompt in validation would
    measure recall, not preference."""
    return json.dumps(conv[0] if kind == "dpo" else conv, sort_keys=True)


def duplicate_key(conv, kind: str) -> str:
    """What makes two records duplicates: their (redacted) conversation, for DPO the whole
    prompt, chosen and rejected (a prompt's several pairs are distinct records)."""
    return content_hash(json.dumps(conv, sort_keys=True)).hex()


def encode_conversation(tok, conv, kind: str, where: str = "record"):
    """`encode_record` of a record's `conversation`."""
    if kind == "sft":
        ids, mask = tok.encode_chat(conv)
        return [(ids + [tok.eos_id], mask + [False])]
    prompt, chosen, rejected = conv
    n = prompt_length(tok, prompt)
    pair = [encode_response(tok, prompt, reply, n) for reply in (chosen, rejected)]
    if pair[0][0] == pair[1][0]:
        # Texts the tokenizer reads alike (a "▁", U+2581, is its mark for a space) train as
        # identical sides: the same zero margin as the same text (`conversation`).
        raise DataError(f"{where}: 'chosen' and 'rejected' encode to the same tokens (text the tokenizer reads "
                        f"alike, such as a '\u2581' for a space), so the pair prefers nothing")
    return pair


def encode_file(batch: dict, tok, kind: str, order: dict, val_fraction: float, redact: tuple[str, ...] = ()) -> dict:
    """Ray Data stage (one file a batch): its records, redacted (`redact`: PII types, counted
    in `pii_<type>` columns) and encoded, with origin, split and duplicate key."""
    pii = [f"pii_{t}" for t in PII_TYPES if t in redact]
    out = {k: [] for k in ("file", "line", "error", "val", "seqs", "key", *pii)}
    for path, raw in zip(batch["path"], batch["bytes"]):
        n = 0
        for line, rec in parse_records(path, raw):
            n += 1
            err, seqs, val, key, found = "", "", False, "", {}
            where = f"{path}:{line}"
            try:
                if isinstance(rec, DataError):
                    raise rec
                conv, found = redact_conversation(conversation(rec, kind, where), kind, redact, where)
                seqs = json.dumps(encode_conversation(tok, conv, kind, where))
                val = stable_fraction(split_text(conv, kind)) < val_fraction
                key = duplicate_key(conv, kind)
            except DataError as e:
                err, found = str(e), {}
            for k, v in zip(out, (order[path], line, err, val, seqs, key, *(found.get(c[4:], 0) for c in pii))):
                out[k].append(v)
        if n == 0:
            empty = (order[path], 0, f"{path}: empty file (no records)", False, "", "", *(0 for _ in pii))
            for k, v in zip(out, empty):
                out[k].append(v)
    return {k: np.array(v, dtype=object if k in ("error", "seqs", "key") else None) for k, v in out.items()}


# --------------------------------------------------------------------------- rows


def pack_conversations(convs: list[tuple[list[int], list[bool]]], width: int, pad_id: int):
    """Whole conversations packed greedily, in order, into rows of `width` tokens: a row ends
    when the next conversation does not fit and is padded (mask False). Yields (ids, mask)."""
    ids: list[int] = []
    mask: list[bool] = []
    for c_ids, c_mask in convs:
        if len(ids) + len(c_ids) > width:
            yield _padded(ids, mask, width, pad_id)
            ids, mask = [], []
        ids += c_ids
        mask += c_mask
    if ids:
        yield _padded(ids, mask, width, pad_id)


def _padded(ids: list[int], mask: list[bool], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.full(width, pad_id, dtype=np.int32)
    out[:len(ids)] = ids
    m = np.zeros(width, dtype=np.int8)
    m[:len(mask)] = mask
    return out, m


def rows_table(rows: list[dict[str, np.ndarray]], width: int) -> pa.Table:
    """Fixed-size list columns (int32 ids, int8 masks) as pre-training's token blocks are, and
    plain columns for per-row values (a DPO reference's float32 log-probabilities)."""
    cols = {}
    for name in rows[0]:
        arr = np.stack([np.asarray(r[name]) for r in rows])
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(arr.ravel()), width) if arr.ndim == 2 else pa.array(arr)
    return pa.table(cols)


def write_rows(prefix: str, split: str, rows: list[dict], width: int, per_shard: int, s3) -> list[dict]:
    """Rows as parquet shards `<prefix>/<split>/shard-NNNNN.parquet`; their manifest entries."""
    shards = []
    for i in range(0, len(rows), per_shard):
        sink = io.BytesIO()
        pq.write_table(rows_table(rows[i:i + per_shard], width), sink, compression="zstd")
        data = sink.getvalue()
        name = f"{split}/shard-{len(shards):05d}.parquet"
        storage.write_bytes(storage.join(prefix, name), data, s3)
        shards.append({"path": name, "rows": len(rows[i:i + per_shard]), "sha256": hashlib.sha256(data).hexdigest()})
    return shards


# --------------------------------------------------------------------------- prepare


# Raised when the same records encode differently: 2, content markers as text and DPO masks
# over the response alone (a dataset prepared before is prepared again, not reused).
CHAT_ENCODING = 2
# Raised, for one kind, when the same records give that kind other rows (its datasets prepared
# before are prepared again; the other kind's keys stay as they were, so its runs still resume).
# DPO 1: a pair whose chosen and rejected are the same text is a bad record, and pairs split by
# their prompt, not the whole record. DPO 2: so is a pair whose two texts encode to the same ids.
# SFT 1: records split by their conversation, not the whole record (its other fields too).
# Both, SFT 2 and DPO 3: parquet text stored as bytes, content given as a list of text parts and
# the `developer` role are read (each was a bad record), DPO's TRL conversational forms too; a
# record naming a field (or a message's role or content) twice is a bad record (the last was
# kept); a parquet file's columns other than the record's are not read (one not UTF-8 ended
# the preparation).
KIND_ROWS = {"sft": 2, "dpo": 3}


def record_dedup(cfg: DataConfig) -> str:
    """The de-duplication records get: "exact" for data.dedup exact or near (the module
    docstring says why near is not MinHash here), else "none"."""
    return "none" if cfg.dedup == "none" else "exact"


def record_cleaning(cfg: DataConfig) -> dict:
    """What redaction and de-duplication do to the records, for the dataset key and the
    manifest: empty with both off (the rows are then those of keys that named neither)."""
    out = {}
    if cfg.redact_pii:  # in PII_TYPES order: the passes run in one order, whatever order names them
        out.update(redact_pii=[t for t in PII_TYPES if t in cfg.redact_pii], rules=CLEANING)
    if record_dedup(cfg) != "none":
        out["dedup"] = record_dedup(cfg)
    return out


def dataset_key(kind: str, sources, cfg: DataConfig, tokenizer_sha: str, seed: int) -> str:
    fields = {"kind": kind, "sources": [[f.uri, f.size, f.etag_or_mtime] for f in sources],
              "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction, "tokenizer": tokenizer_sha,
              "seed": seed, "version": FORMAT_VERSION, "chat_encoding": CHAT_ENCODING}
    if KIND_ROWS.get(kind):  # absent at 0: the keys of datasets prepared before it stay valid
        fields["rows"] = KIND_ROWS[kind]
    if record_cleaning(cfg):  # absent with both off, as above
        fields["cleaning"] = record_cleaning(cfg)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def prepare_chat(kind: str, cfg: DataConfig, tokenizer, out: str, seed: int, s3: S3Config | None = None,
                 log=print) -> dict:
    """SFT (`kind="sft"`) or DPO (`kind="dpo"`) records at cfg.path -> rows under `out`, and
    their manifest. Reuses a complete identical dataset already there; shards count only once
    manifest.json, written last, names them."""
    import ray

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    # Rows are a function of the records and the seed; the DPO reference pass that follows in
    # this driver (raylm.posttrain.precompute_reference) reads the rows back in order too, so
    # this holds on the reuse path as well.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    files = list_corpus(cfg.path, s3)
    key = dataset_key(kind, files, cfg, tokenizer.sha256, seed)
    existing = read_manifest(out, s3)
    if existing and existing.get("key") == key:
        check_error_budget(existing.get("stats", {}).get("bad_records", []), cfg)  # as data.prepare
        log(f"data: reusing prepared {kind} dataset at {out} ({existing['train']['blocks']} train rows)")
        return existing
    t0 = time.time()
    width = cfg.seq_len + 1
    order = {f.uri: i for i, f in enumerate(files)}
    fs, _ = storage.filesystem(files[0].uri, s3)
    paths = [storage.filesystem(f.uri, s3)[1] for f in files]
    uri_of = dict(zip(paths, (f.uri for f in files)))
    ds = ray.data.read_binary_files(paths, filesystem=fs, include_paths=True, override_num_blocks=len(paths))
    ds = ds.map_batches(lambda b: {**b, "path": np.array([uri_of[p] for p in b["path"]], dtype=object)},
                        batch_size=1)
    ds = ds.map_batches(encode_file, batch_size=1, fn_kwargs={"tok": tokenizer, "kind": kind, "order": order,
                                                              "val_fraction": cfg.val_fraction,
                                                              "redact": tuple(cfg.redact_pii)})
    dedup = record_dedup(cfg)
    if cfg.dedup == "near":
        log(f"data: {kind} records are de-duplicated exactly (data.dedup=near is MinHash for pre-training "
            f"documents alone: chat records share system prompts and contexts by design)")
    pii = [t for t in PII_TYPES if t in cfg.redact_pii]
    splits: dict[str, list] = {"train": [], "val": []}
    bad: list[str] = []
    seen: set[str] = set()  # duplicate keys of the records kept, in corpus order
    stats = {"records": 0, "too_long": 0, "target_tokens": 0, "dropped": {}, "pii": {t: 0 for t in pii}}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i, (err, val, seqs, f, line, dup) in enumerate(zip(batch["error"], batch["val"], batch["seqs"],
                                                                 batch["file"], batch["line"], batch["key"])):
            stats["records"] += 1
            if not err:
                encoded = json.loads(seqs)
                longest = max(len(ids) for ids, _ in encoded)
                if longest > width:
                    stats["too_long"] += 1
                    err = (f"{files[f].uri}:{line}: {longest} tokens, longer than a row of data.seq_len + 1 = "
                           f"{width}; raise data.seq_len or shorten the record")
            if err:
                bad.append(err)
                continue
            if dedup != "none":
                if dup in seen:
                    stats["dropped"]["exact_duplicate"] = stats["dropped"].get("exact_duplicate", 0) + 1
                    continue
                seen.add(dup)
            for t in pii:  # of the records kept, as pre-training counts its kept documents'
                stats["pii"][t] += int(batch[f"pii_{t}"][i])
            splits["val" if val else "train"].append(encoded)
    check_error_budget(bad, cfg)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict]] = {}
    for split, records in splits.items():
        if split == "train":
            records = [records[i] for i in rng.permutation(len(records))]
        stats["target_tokens"] += sum(sum(m) for r in records for _, m in r)
        if kind == "sft":
            convs = [r[0] for r in records]
            rows[split] = [{"tokens": ids, "loss_mask": m}
                           for ids, m in pack_conversations(convs, width, tokenizer.pad_id)]
        else:
            rows[split] = []
            for (c_ids, c_mask), (r_ids, r_mask) in records:
                c, cm = _padded(c_ids, c_mask, width, tokenizer.pad_id)
                r, rm = _padded(r_ids, r_mask, width, tokenizer.pad_id)
                rows[split].append({"chosen": c, "chosen_mask": cm, "rejected": r, "rejected_mask": rm})
        stats[f"{split}_records"] = len(records)
    unit = "records" if kind == "sft" else "records (pairs split by prompt: all of a prompt's on one side)"
    if not rows["train"] and not rows["val"]:
        raise DataError(f"{cfg.path}: no usable {kind.upper()} records ({stats['records']} read, {len(bad)} bad)")
    if not rows["train"]:
        raise DataError(f"{cfg.path}: training split is empty: all {stats['val_records']} usable {unit} fell in "
                        f"validation; lower data.val_fraction (now {cfg.val_fraction})")
    if not rows["val"]:
        raise DataError(f"{cfg.path}: validation split is empty ({stats['train_records']} usable {unit}); raise "
                        f"data.val_fraction (now {cfg.val_fraction})")
    attempt = storage.join(out, f"attempt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    rel = storage.relative(attempt, out)
    shards = {s: write_rows(attempt, s, rows[s], width, cfg.blocks_per_shard, s3) for s in rows}
    stats.update(bad_records=bad, seconds=round(time.time() - t0, 2))
    manifest = {
        "format_version": FORMAT_VERSION, "kind": kind, "columns": list(COLUMNS[kind]),
        "row_bytes": width * sum(4 if not c.endswith("mask") else 1 for c in COLUMNS[kind]),
        "key": key, "seed": seed, "seq_len": cfg.seq_len, "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        "sources": source_rows(files), "val_sources": [], "files": [f.uri for f in files],
        "config": {"dedup": dedup, "redact_pii": pii},
        **{s: {"blocks": len(rows[s]), "shards": [dict(x, path=f"{rel}/{x['path']}") for x in shards[s]]}
           for s in rows},
        "stats": stats,
    }
    storage.write_text(storage.join(out, MANIFEST), json.dumps(manifest, indent=1), s3)  # last: the commit
    remove_stale_attempts(out, rel, s3)
    log(f"data: {kind} {stats['train_records']} train / {stats['val_records']} val records -> "
        f"{len(rows['train'])} train rows of {width} tokens, {len(bad)} bad records skipped, "
        f"{sum(stats['dropped'].values())} duplicates dropped ({dedup}), "
        f"PII replaced {sum(stats['pii'].values())}, {stats['seconds']:.1f}s")
    for b in bad[:10]:
        log(f"data: skipped bad record: {b}")
    return manifest
