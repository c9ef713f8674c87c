"""Corpus files -> cleaned documents: parsing, cleaning and the train/validation split.

    bytes (.txt .jsonl .jsonl.gz .parquet, in any case, gunzipped by name, a leading UTF-8 BOM
      dropped, UTF-16 or UTF-32 that opens with its BOM converted to UTF-8)
      -> documents, each with its line (a .txt file is one document; a bad record is kept
         as a DataError naming its file and line, for the error budget)
      -> clean_text (NFC, control characters, whitespace) and length filters
      -> PII redaction (raylm.pii), then the split: whole documents by a stable hash of their
         redacted text, or each document's tail (so no cut splits an e-mail)

`parse_and_clean` is that chain as one Ray Data stage; raylm.data runs it over a corpus, in
Ray Data or on threads here, and tokenizes and packs what it yields. No `ray` here.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import re
import unicodedata
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylm.config import DataConfig
from raylm.errors import DataError
from raylm.pii import PLACEHOLDERS, redact as redact_pii


def check_plain_types(schema: pa.Schema, where: str) -> None:
    """Refuse columns of extension types before any value is converted: an extension type's
    values become Python objects through code of its own, and Ray Data's
    `ray.data.arrow_pickled_object` does it by unpickling, so a crafted parquet file would run
    code the moment its column is read (`to_pylist`, `to_numpy`, a torch batch). Nested
    anywhere too: in a list of any kind (list views included, which parquet files can name
    in their Arrow schema), a struct, a map, a union, or a dictionary's values."""

    def extension(t: pa.DataType) -> pa.DataType | None:
        if isinstance(t, pa.ExtensionType):
            return t
        # A dictionary has no fields (its values are a type of their own); every other nested
        # type (lists, list views, structs, maps, unions, run-end encoded) names its children
        # as fields.
        children = [t.value_type] if pa.types.is_dictionary(t) else [t.field(i).type for i in range(t.num_fields)]
        return next((x for x in map(extension, children) if x is not None), None)

    for f in schema:
        if (ext := extension(f.type)) is not None:
            name = getattr(ext, "extension_name", str(ext))
            raise DataError(f"{where}: column {f.name!r} has the extension type {name!r}, whose values would be "
                            f"deserialised by code of their own (unpickled, for Ray's object columns); refused")


# A .gz file may hold at most this many times its own size (or GZIP_FLOOR, if more). Text
# compresses 3-5x, JSON lines with repeated keys some 10x; a file of one repeated byte 1000x
# and more: 400 KB of it took 1.7 GB of memory to parse, and a few MB ended the process.
GZIP_RATIO = 100
GZIP_FLOOR = 256 << 20


def decompressed(path: str, raw: bytes) -> bytes:
    """A file's bytes, gunzipped if its name ends in .gz (in any case). Decompressed in a
    stream, and refused past GZIP_RATIO times its size: a decompression bomb is one line
    naming the file, not the machine's memory."""
    if not path.lower().endswith(".gz"):
        return raw
    cap = max(GZIP_RATIO * len(raw), GZIP_FLOOR)
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            out = f.read(cap + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip ({e})") from None
    if len(out) > cap:
        raise DataError(f"{path}: decompresses to more than {cap >> 20} MiB, over {GZIP_RATIO}x its "
                        f"{len(raw)} bytes (a decompression bomb?); refused: split the file, or store it "
                        f"uncompressed")
    return out


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None


def _without_bom(raw: bytes) -> bytes:
    """A text file's bytes without the UTF-8 byte order mark some editors put first."""
    return raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw


# UTF-32 first: its little-endian mark begins with UTF-16's.
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
              (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _as_utf8(raw: bytes, path: str) -> bytes:
    """A text file's bytes as UTF-8 without a byte order mark. A file that opens with a UTF-16
    or UTF-32 mark (Windows Notepad's and Excel's "Unicode text") is that encoding, without a
    doubt: it is converted, not read as UTF-8 (where every line of it was a bad record, or
    the whole file one whose message said nothing of UTF-16). DataError naming the file if it
    does not decode as what its mark says."""
    for bom, codec in _WIDE_BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(codec).encode("utf-8")  # the codec reads and drops the mark
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: begins with a {codec.upper()} byte order mark but is not valid "
                                f"{codec.upper()} (at byte offset {e.start})") from None
    return _without_bom(raw)


def read_parquet(path: str, raw: bytes):
    """One parquet file's table from its bytes; DataError naming the file if it is damaged."""
    try:
        table = pq.read_table(io.BytesIO(raw))
        table.column_names  # noqa: B018  decoded here: names that are not UTF-8 (a damaged footer) are this error
        return table
    except MemoryError:  # the machine's limit, not the file's fault: never a file skipped as damaged
        raise
    except Exception as e:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: truncated or corrupt parquet ({str(e).splitlines()[0]})") from None


def parse_documents(path: str, raw: bytes, text_field: str):
    """Yield (line_number, text) or (line_number, DataError) for one corpus file's bytes.

    Bad records are yielded, not raised, so the driver can apply the error budget in order."""
    name = path.rsplit("/", 1)[-1].lower()
    try:
        raw = decompressed(path, raw)
    except DataError as e:
        yield 0, e
        return
    if name.endswith(".txt"):
        try:
            text = _decode(_as_utf8(raw, path), path)  # one document per text file
        except DataError as e:
            yield 1, e
            return
        if text:  # an empty file is an empty shard, as for the other formats (one of blank lines is a
            yield 1, text  # document, dropped by the length filter)
        return
    if name.endswith(".parquet"):
        try:
            table = read_parquet(path, raw)
        except DataError as e:
            yield 0, e
            return
        if text_field not in table.column_names:
            yield 0, DataError(f"{path}: no column {text_field!r} (columns: {', '.join(table.column_names)}); "
                               f"set data.text_field")
            return
        try:
            check_plain_types(table.select([text_field]).schema, path)
        except DataError as e:
            yield 0, e
            return
        for i, text in enumerate(column_values(table.column(text_field), path, text_field), start=1):
            if isinstance(text, DataError):
                yield i, text
            elif not isinstance(text, str):
                yield i, DataError(f"{path}: row {i}: {text_field!r} is {type(text).__name__}, not a string")
            else:
                yield i, text
        return
    for i, record in json_lines(path, raw, unique=text_field):
        where = f"{path}:{i}"
        if isinstance(record, DataError):
            yield i, record
        elif not isinstance(record, dict):
            yield i, DataError(f"{where}: a JSON {type(record).__name__}, not an object with a {text_field!r} field")
        elif text_field not in record:
            keys = ", ".join(record) or "no fields"
            yield i, DataError(f"{where}: no field {text_field!r} (found: {keys}); set data.text_field")
        elif not isinstance(record[text_field], str):
            yield i, DataError(f"{where}: field {text_field!r} is {type(record[text_field]).__name__}, not a string")
        elif not encodable(record[text_field]):
            yield i, DataError(f"{where}: field {text_field!r} holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                               f"not text")
        else:
            yield i, record[text_field]


def has_binary(t: pa.DataType) -> bool:
    """Whether a parquet type holds bytes anywhere: itself, a dictionary's values, or a list's
    or struct's fields (an SFT `messages` list of structs of binary role and content)."""
    if pa.types.is_dictionary(t):
        return has_binary(t.value_type)
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_binary_view(t)):
        return True
    return any(has_binary(t.field(i).type) for i in range(t.num_fields))


def _as_text(value):
    """`value` with every bytes in it (at any depth) decoded as UTF-8; UnicodeDecodeError if one
    does not decode."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list):
        return [_as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_text(v) for k, v in value.items()}
    return value


# What converting a parquet value to Python raises where the value, not the code, is at fault:
# a date, time or duration (at any depth) that datetime cannot hold (a year past 9999), a
# timestamp whose time zone no database names ("Mars/Olympus": a KeyError). Such a row is a
# bad record naming it, as a number in the text column is; it was a traceback out of the run.
_UNCONVERTIBLE = (OverflowError, ValueError, KeyError, pa.ArrowException)


def column_values(column: pa.ChunkedArray, path: str, field: str) -> list:
    """A parquet column's values as Python objects, a row that does not read as text a
    DataError naming it, not a crash: parquet does not check that a string column holds
    UTF-8. Bytes are text too (parquet's BYTE_ARRAY without the UTF8 annotation, as some
    writers leave their strings, also inside lists and structs), decoded as UTF-8 row by row;
    every row of such a column was a bad record."""
    def bad(i: int, e: UnicodeDecodeError) -> DataError:
        return DataError(f"{path}: row {i + 1}: {field!r} is not valid UTF-8 "
                         f"(byte {e.object[e.start]:#04x} at offset {e.start})")

    try:
        values = column.to_pylist()
    except (UnicodeDecodeError, *_UNCONVERTIBLE):  # rare: find the rows one by one
        values = []
        for i in range(len(column)):
            try:
                values.append(column[i].as_py())
            except UnicodeDecodeError as e:
                values.append(bad(i, e))
            except _UNCONVERTIBLE as e:
                values.append(DataError(f"{path}: row {i + 1}: {field!r} holds a value of type {column.type} "
                                        f"that Python cannot represent ({e}), not text"))
    if has_binary(column.type):
        for i, v in enumerate(values):
            if not isinstance(v, DataError):
                try:
                    values[i] = _as_text(v)
                except UnicodeDecodeError as e:
                    values[i] = bad(i, e)
    return values


def _top_level_count(text: str, key: str) -> int:
    """How many times an object given as JSON text names `key` at its top level (json.loads
    keeps the last of repeated names without a word)."""
    outermost: list = []

    def pairs(items: list) -> dict:
        outermost[:] = items  # objects close inside out: the last call is the outermost
        return dict(items)

    json.loads(text, object_pairs_hook=pairs)
    return sum(k == key for k, _ in outermost)


_KEY_END = re.compile(rb'"\s*:')


def _escaped_key(line: bytes) -> bool:
    """Whether a key of the JSON line may hold a \\u escape (`"te\\u0078t"`: "text" spelled
    another way): the text from a key's closing quote back to the quote before it. Text values
    with escapes (every non-ASCII line of a corpus written with ensure_ascii) hold none, so
    they are not parsed a second time (that cost about 75% more reading them). A key that
    spells a name without quotes has no escaped quote, so the quote before it is its own."""
    return any(b"\\u" in line[line.rfind(b'"', 0, m.start()) + 1:m.start()] for m in _KEY_END.finditer(line))


def json_lines(path: str, raw: bytes, unique: str | None = None, object_pairs_hook=None):
    """(line number, parsed value) or (line number, DataError) for each non-blank line of a
    JSON-lines file: the one reader of corpus documents and of SFT/DPO records. `unique`: a
    field named more than once in a record's object is a bad record (which of its values is
    meant is anyone's guess), checked only on lines where the name occurs twice or where a
    key holds a `\\u` escape (`_escaped_key`).
    `object_pairs_hook`: json.loads', for a reader that checks more of its objects' keys."""
    try:
        raw = _as_utf8(raw, path)
    except DataError as e:
        yield 0, e
        return
    needle = json.dumps(unique, ensure_ascii=False).encode() if unique is not None else None
    for i, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        if line.startswith(codecs.BOM_UTF8):  # files with their marks joined (cat, gzip members): never JSON
            line = line[len(codecs.BOM_UTF8):]
        try:
            text = _decode(line, f"{path}:{i}")
            value = json.loads(text, object_pairs_hook=object_pairs_hook)
            # The name twice as written, or a key spelled with an escape (`"te\u0078t"`): counted on the parsed pairs.
            if needle is not None and isinstance(value, dict) \
                    and (line.count(needle) > 1 or b"\\u" in line and _escaped_key(line)) \
                    and (n := _top_level_count(text, unique)) > 1:
                value = DataError(f"{path}:{i}: field {unique!r} appears {n} times in one record")
            yield i, value
        except DataError as e:
            yield i, e
        except json.JSONDecodeError as e:
            yield i, DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})")
        except RecursionError:  # '[[[[...' thousands deep: the parser's recursion limit
            yield i, DataError(f"{path}:{i}: JSON nested too deeply to read")
        except ValueError as e:  # an integer of more digits than Python converts (sys.set_int_max_str_digits)
            yield i, DataError(f"{path}:{i}: unreadable JSON ({str(e).split(';')[0]})")


def encodable(text: str) -> bool:
    """JSON may escape lone surrogates ("\\ud800"), which no UTF-8 consumer downstream accepts."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# --------------------------------------------------------------------------- cleaning

# C0 and C1 control characters (U+0080-U+009F are controls too: mis-decoded text is full of
# them), tab and line feed aside.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Vertical tab, form feed, the file/group/record/unit separators and NEL (next line) part
# text: they become line breaks, not nothing, so the words either side stay apart.
_BREAKS = re.compile(r"[\x0b\x0c\x1c-\x1f\x85]")
_ODD_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
# Only from a run's first blank: tried at every position inside a long run of spaces that
# ends in a word, the match failed once per position after reading the rest of the run, so
# a document with 160,000 spaces in a row (padded tables, extracted PDFs) took 5 minutes.
_TRAILING = re.compile(r"(?<![ \t])[ \t]+(?=\n|\Z)")
_MANY_BLANK = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC, control characters out (those that part text, such as a form feed, become line
    breaks), whitespace normalised; indentation is kept (code matters).

    Each rewrite runs only where a substring test (memchr speed) says it can match: most
    text needs none of them, and the regex scans were most of the cost of cleaning."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _CONTROL.search(text):
        text = _CONTROL.sub("", _BREAKS.sub("\n", text))
    # After the controls are out: one between a letter and its combining mark ("A\x00\u0308")
    # kept them apart through NFC, and its removal would leave them decomposed.
    text = unicodedata.normalize("NFC", text)  # itself a fast no-op on ASCII
    if not text.isascii():
        text = _ODD_SPACES.sub(" ", text)
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        text = _TRAILING.sub("", text)
    if "\n\n\n" in text:
        text = _MANY_BLANK.sub("\n\n", text)
    return text.strip("\n")


def stable_fraction(text: str) -> float:
    """A hash of the text mapped to [0, 1): the same document always lands in the same split."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


# `tail`: the row holds the held-out tail of the document in the row before it, which
# carries the document's figures (`chars`, `pii_<type>`); counts of documents skip it.
COLUMNS = ("text", "val", "tail", "source", "file", "line", "chars", "error", "dropped")


# Below this many expected held-out documents, a split by document is likely to hold out
# none (the hash decides each one), so val_split=auto holds out each document's tail instead.
MIN_VAL_DOCUMENTS = 4


def val_split_mode(cfg: DataConfig, files: list, val_files: list) -> str:
    """How validation text is held out: "files" (data.val_path), "document" (whole documents
    by a stable hash of their text) or "tail" (the last data.val_fraction of every document,
    cut at a line break, as single-file trainers do). data.val_split=auto picks "tail" when
    the corpus is plain-text files too few to split by document: each .txt file is one
    document, so one file would otherwise hold out nothing, or everything. Known from the
    listing alone, so it is decided before any stage runs."""
    if val_files:
        return "files"
    if cfg.val_split != "auto":
        return cfg.val_split
    text_only = all(f.uri.lower().endswith(".txt") for f in files)
    return "tail" if text_only and len(files) * cfg.val_fraction < MIN_VAL_DOCUMENTS else "document"


def tail_split(text: str, fraction: float) -> tuple[str, str]:
    """(head, tail) of a document: the tail is its last `fraction` of characters, extended
    back to the line break before the cut so a line is never split (kept exact when the
    text has no break in the part that would become the tail), nor a PII placeholder (the
    text is redacted before it is split). A fraction of 0 holds out nothing: a document's
    tail is at least one character otherwise, and data.val_fraction=0 made a validation
    split of every document's last character (and trained none of them)."""
    if fraction <= 0:
        return text, ""
    cut = max(1, min(len(text) - 1, round(len(text) * (1 - fraction))))
    brk = text.rfind("\n", 0, cut)
    if brk > 0 and len(text) - brk <= 2 * (len(text) - cut):  # at most twice the asked-for tail
        cut = brk + 1
    for p in PLACEHOLDERS.values():  # an occurrence found in this window spans the cut
        start = text.find(p, max(0, cut - len(p) + 1), cut + len(p) - 1)
        if start >= 0:  # cut before it; or after it, where it opens the text (the head keeps it)
            cut = start if start > 0 else len(p)
    return text[:cut], text[cut:]


def parse_and_clean(batch: dict, cfg: DataConfig, order: dict | None = None, val_files: frozenset = frozenset(),
                    drop: dict | None = None, redact: tuple[str, ...] = (), tail: bool = False) -> dict:
    """Ray Data stage (stateless tasks, fused with the read): file bytes -> cleaned documents
    with their split, origin (file index in corpus order, line), and the reason if one is bad
    or dropped. `drop` maps (file, line) to a de-duplication verdict; `redact` names the PII
    types to replace, counted per document in `pii_<type>` columns. `tail`: every document
    is two rows, its head for training and its last data.val_fraction for validation
    (`val_split_mode`), cut after redaction so that no e-mail or number is split in two
    halves that neither is found in; one too short to cut is one training row."""
    out = {k: [] for k in (*COLUMNS, *(f"pii_{t}" for t in redact))}

    def emit(**row):
        for k, v in row.items():
            out[k].append(v)

    for path, raw in zip(batch["path"], batch["bytes"]):
        n, file = 0, order[path] if order is not None else 0
        force_val = path in val_files
        for line, doc in parse_documents(path, raw, cfg.text_field):
            n += 1
            text, err, dropped, chars, found = "", "", "", 0, {}
            if isinstance(doc, DataError):
                err = str(doc)
            else:
                text = clean_text(doc)
                chars = len(text)
                if chars < cfg.min_chars:
                    dropped = "too_short"
                elif chars > cfg.max_chars:
                    dropped = "too_long"
                elif drop and (file, line) in drop:
                    dropped = drop[(file, line)]
            if dropped:
                text = ""
            elif text and redact:
                text, found = redact_pii(text, redact)
            # With an explicit validation corpus (val_files), no training document is diverted.
            # The split by document hashes the redacted text, the text trained on: documents that
            # differ only in an address or a number are one text then, and land on one side (as
            # de-duplication, which hashes redacted text too, keeps one of them); hashed before
            # redaction, copies of one notice trained and were scored in validation.
            val = force_val or (not val_files and not dropped and bool(text)
                                and stable_fraction(text) < cfg.val_fraction)
            pii = {f"pii_{t}": found.get(t, 0) for t in redact}
            if tail and not force_val and text and not dropped:
                head, rest = tail_split(text, cfg.val_fraction)
                if rest:
                    emit(text=head, val=False, tail=False, source=path, file=file, line=line, chars=chars,
                         error="", dropped="", **pii)
                    emit(text=rest, val=True, tail=True, source=path, file=file, line=line, chars=0, error="",
                         dropped="", **{k: 0 for k in pii})
                    continue
                # Nothing to hold out (one character, or one placeholder): the document trains
                # whole. An empty tail row was a lone EOS in validation, counted as a document.
                val = False
            emit(text=text, val=val, tail=False, source=path, file=file, line=line, chars=chars, error=err,
                 dropped=dropped, **pii)
        if n == 0:  # an empty shard is almost always a broken export, never silently fine
            emit(text="", val=False, tail=False, source=path, file=file, line=0, chars=0,
                 error=f"{path}: empty shard (no documents)", dropped="", **{f"pii_{t}": 0 for t in redact})
    return {k: np.array(v, dtype=object if k in ("text", "source", "error", "dropped") else None)
            for k, v in out.items()}
