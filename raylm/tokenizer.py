"""SentencePiece BPE tokenizer with byte fallback and chat special tokens.

Why these choices:

* BPE with `byte_fallback`: every string is encodable without `<unk>`; characters outside
  the learned vocabulary (emoji, CJK on an English corpus) become their UTF-8 bytes, so
  `decode(encode(s)) == s` for any text but one holding "▁" (U+2581), SentencePiece's own
  mark for a space, which it reads as a space.
* Identity normalisation, no extra-whitespace removal, no dummy prefix: the model must see
  code exactly as written (indentation, runs of spaces, tabs, newlines), and exact round
  trips make the tokenizer's behaviour easy to test and reason about.
* `split_digits`: numbers are tokenised digit by digit, so arithmetic is not at the mercy of
  which digit groups happened to be frequent.
* The trained model is stored next to a JSON sidecar holding its sha256. Every artefact that
  depends on token ids (tokenized shards, checkpoints) records that hash, so mixing data
  from two different tokenizers is detected rather than silently training on garbage.
"""

from __future__ import annotations

import copy

import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sentencepiece as spm

from raylm.errors import ConfigError, DataError, OutputExistsError

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
UNK = "<unk>"
CHAT_ROLES = ("system", "user", "assistant")
END = "<|end|>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in CHAT_ROLES}

# bos/eos/pad use SentencePiece's own *control* slots: they are never matched from raw
# text, so a document that happens to contain the string "<|eos|>" cannot inject an
# end-of-sequence id; the pipeline adds them explicitly by id.
# The chat markers are *user-defined* symbols: they ARE matched from raw text, because the
# chat template is rendered as text and must encode each marker as a single id. Text must
# never do that: not message content (a user could forge a turn, and SFT would train a marker
# inside a reply), nor a pre-training document (a page or source file about chat templates
# would train role markers and turn ends outside any chat). So content (`encode_chat`) and
# documents (`encode_flat`, `encode_plain`, the tokenizer's training sample) are encoded with
# `_MARKER` occurrences cut apart, `_MARKER_CUT` characters in: "<|" + "end|>".
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, *ROLE_TOKENS.values(), END)
_MARKERS = (*ROLE_TOKENS.values(), END)
_MARKER = re.compile("|".join(re.escape(t) for t in _MARKERS))
_MARKER_CUT = 2
_MARKER_HEAD = "<|"  # what every marker's text before the cut is: no text without it holds a marker
assert all(t[:_MARKER_CUT] == _MARKER_HEAD for t in _MARKERS)

# "\n" is also a user-defined symbol (not a "special token": it is ordinary text). Being
# atomic, it never merges with its neighbours, so every line break of the chat template is
# a hard token boundary. That makes encoding the template piece by piece give exactly the
# same ids as encoding the whole rendered text, which is what lets `encode_chat` build an
# exact assistant-token mask and keeps SFT tokenisation identical to inference-time
# tokenisation of the same prompt.
_NEWLINE = "\n"

_UNK_ID, _BOS_ID, _EOS_ID, _PAD_ID = 0, 1, 2, 3

# SentencePiece silently skips sentences longer than `max_sentence_length` bytes, so
# documents are cut into chunks of at most this many bytes (at line breaks where possible).
_CHUNK_BYTES = 4096


def _utf8_prefix(data: bytes, limit: int) -> int:
    """Largest cut <= limit that does not split a UTF-8 character."""
    if limit >= len(data):
        return len(data)
    cut = limit
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # continuation byte: back off
        cut -= 1
    return cut


def _chunks(text: str, limit: int = _CHUNK_BYTES) -> Iterator[str]:
    """Split a document into pieces of <= limit UTF-8 bytes, preferring line boundaries."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > limit and buf:
            yield "".join(buf)
            buf, size = [], 0
        if n > limit:  # one very long line: hard-split it at character boundaries
            data = line.encode("utf-8")
            while len(data) > limit:
                cut = _utf8_prefix(data, limit)
                yield data[:cut].decode("utf-8")
                data = data[cut:]
            line, n = data.decode("utf-8"), len(data)
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def _plain_parts(text: str) -> list[str]:
    """`text` cut inside each chat marker string it holds ("...<|" + "end|>..."), so that
    no part holds a whole marker; `[text]` when it holds none. Encoding the parts alone and
    joining their ids is encoding `text` as plain text (`Tokenizer.encode_plain`)."""
    if _MARKER_HEAD not in text:
        return [text]
    cuts = [m.start() + _MARKER_CUT for m in _MARKER.finditer(text)]
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


_SURROGATE = re.compile("[\ud800-\udfff]")


def _not_text(texts: str | Sequence) -> DataError | None:
    """The error for the first text (a str, or a list of them) holding a UTF-16 surrogate
    code point, which no UTF-8 encoder (SentencePiece, Arrow) accepts: SentencePiece's own
    error is a bare "Unable to cast Python instance" (a traceback and bug report at the CLI).
    Such text comes from bytes decoded with errors="surrogateescape" (a command-line argument
    in another encoding than UTF-8) or a JSON "\\ud800" escape. None when every text is text."""
    items = [texts] if isinstance(texts, str) else texts if isinstance(texts, (list, tuple, np.ndarray)) else ()
    for k, text in enumerate(items):
        m = _SURROGATE.search(text) if isinstance(text, str) else None
        if m:
            where = "text" if isinstance(texts, str) else f"text #{k}"
            return DataError(f"{where} holds a lone UTF-16 surrogate U+{ord(m.group()):04X} at character "
                             f"{m.start()}: not Unicode text, so it cannot be tokenized; give it as UTF-8")
    return None


def _sp_encode(sp: spm.SentencePieceProcessor, texts, of=None, **kwargs):
    """`sp.encode(texts, **kwargs)`, with text that is not Unicode (`_not_text`) a DataError
    naming where it is in `of` (the text `texts` was cut from; default `texts`)."""
    try:
        return sp.encode(texts, **kwargs)
    except (RuntimeError, TypeError) as e:
        bad = _not_text(texts if of is None else of)
        if bad is not None:
            raise bad from e
        raise


def _take_sample(texts: Iterable[str], sample_bytes: int) -> tuple[list[str], int]:
    """Documents in order until `sample_bytes` UTF-8 bytes; the last one is truncated."""
    docs: list[str] = []
    total = 0
    for k, text in enumerate(texts):
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: was a bare UnicodeEncodeError traceback
            raise DataError(f"tokenizer training document #{k}: {_not_text(text) or e}") from e
        if total + len(data) > sample_bytes:
            cut = _utf8_prefix(data, sample_bytes - total)
            if cut:
                docs.append(data[:cut].decode("utf-8"))
                total += cut
            break
        if data:
            docs.append(text)
            total += len(data)
    return docs, total


def _check_out(out: Path) -> None:
    """Refuse an output that retraining would destroy or cannot rename into place: only a
    missing path or a tokenizer directory (nothing but our two files) is replaced."""
    if out.name in ("", ".."):  # ".", "..", "/": a directory in use cannot be renamed away
        raise OutputExistsError(f"{out}: cannot be replaced by a tokenizer directory; name a new "
                                f"directory, e.g. {out / 'tokenizer'}")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out}: already exists and is a file; write the tokenizer to a new directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in (META_FILE, MODEL_FILE) or not p.is_file())
    if others:
        raise OutputExistsError(f"{out}: already exists and holds {others[0]}"
                                f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}, so it is not a "
                                f"tokenizer directory; write the tokenizer to a new directory")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the complete `tmp` into place; an existing `out` is removed only afterwards."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "d")
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def usable_cpus() -> int:
    """The CPUs this process may use: those its CPU affinity allows (a container's or pod's
    cpuset, `taskset`), where the OS tells, else the machine's count; inside a Ray task or
    actor, no more than the CPUs Ray assigned it. os.cpu_count() counts the machine's, however
    few of them the process may run on, and threads sized by it oversubscribe those few."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cpus = os.cpu_count() or 1
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        context = ray.get_runtime_context()
        if context.worker.mode == ray.WORKER_MODE:  # a task or actor, not a driver
            assigned = context.get_assigned_resources().get("CPU", 0)
            if assigned > 0:
                cpus = min(cpus, max(1, int(assigned)))
    return max(1, cpus)


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str,
    vocab_size: int,
    *,
    source: str = "",
    sample_bytes: int = 20_000_000,
    character_coverage: float = 0.9995,
    seed: int = 0,
) -> Tokenizer:
    """Train a BPE tokenizer on at most `sample_bytes` of `texts`; write it to `out_dir`."""
    _check_out(Path(out_dir))  # before the work, so a bad --out fails at once
    docs, used = _take_sample(texts, sample_bytes)
    if used == 0:
        raise DataError(f"tokenizer training corpus is empty (source: {source or '?'})")

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            # Fed from memory: no temp text file. Chunks keep every sentence under
            # max_sentence_length, so nothing is silently dropped. A chunk is cut inside each
            # chat marker string, as documents are encoded (`_plain_parts`): the trainer sees
            # them as the text they are in pre-training, not as marker symbols.
            sentence_iterator=(p for d in docs for c in _chunks(d) for p in _plain_parts(c)),
            max_sentence_length=_CHUNK_BYTES,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,  # else "x" and " x" decode alike and pieces shift
            normalization_rule_name="identity",
            unk_id=_UNK_ID,
            bos_id=_BOS_ID,
            eos_id=_EOS_ID,
            pad_id=_PAD_ID,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            user_defined_symbols=[*ROLE_TOKENS.values(), END, _NEWLINE],
            num_threads=usable_cpus(),
            train_extremely_large_corpus=False,
            minloglevel=2,  # errors only; the trainer is very chatty at INFO
        )
    except RuntimeError as e:
        msg = str(e)
        m = re.search(r"Vocabulary size too high .*? <= (\d+)", msg)
        if m:
            # A sample cut at sample_bytes holds less than the corpus: more of it is the remedy.
            more = (f"a larger tokenizer.sample_bytes (the sample stopped at {sample_bytes})"
                    if used >= sample_bytes else "more text")
            raise ConfigError(
                f"vocab_size={vocab_size} is too large for the {used}-byte tokenizer corpus "
                f"(source: {source or '?'}); use vocab_size <= {m.group(1)} or {more}"
            ) from None
        if "smaller than required_chars" in msg:
            # SentencePiece says how many it needs ("270 vs 278"): the number a user must give.
            need = re.search(r"required_chars\. \d+ vs (\d+)", msg)
            raise ConfigError(
                f"vocab_size={vocab_size} is too small to hold the specials, 256 byte pieces "
                f"and the corpus characters (source: {source or '?'}); use "
                f"{f'vocab_size >= {need.group(1)}' if need else 'a larger vocab_size'} or lower "
                f"character_coverage"
            ) from None
        if "all_chars_count" in msg or "sentences_.empty()" in msg:
            raise DataError(
                f"tokenizer training corpus is empty (source: {source or '?'})"
            ) from None
        raise

    model_bytes = _without_machine_facts(model.getvalue())
    tok = Tokenizer(model_bytes, {}, out_dir)
    meta = {
        "vocab_size": tok.vocab_size,
        "special_ids": tok.special_ids,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "source": source,
        "sha256": hashlib.sha256(model_bytes).hexdigest(),
        "sample_bytes": used,
        "sentencepiece_version": spm.__version__,
        "model_type": "bpe",
    }
    tok = Tokenizer(model_bytes, meta, out_dir)

    # Write into a sibling temp dir and rename it into place: a reader (or a crash) never
    # sees a model without its sidecar, or a sidecar describing a different model.
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / MODEL_FILE).write_bytes(model_bytes)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is a normal directory
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tok



def _without_machine_facts(model_bytes: bytes) -> bytes:
    """The trained model with its trainer's thread count cleared: SentencePiece records it in
    the model, so the same corpus and seed gave a different sha256 (and a prepared dataset
    keyed by it was refused) on a machine with another number of cores. The pieces and scores
    do not depend on it."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
    proto.trainer_spec.ClearField("num_threads")
    return proto.SerializeToString()

class Tokenizer:
    """A trained SentencePiece model plus its metadata. Picklable, for Ray actors."""

    def __init__(self, model_bytes: bytes, meta: dict, path: str = "") -> None:
        self._model_bytes = model_bytes
        self.meta = dict(meta)
        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self.vocab_size: int = self._sp.get_piece_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.pad_id: int = self._sp.pad_id()
        self.special_ids: dict[str, int] = {t: self._sp.piece_to_id(t) for t in SPECIAL_TOKENS}
        self._segments: SegmentCache | None = None  # built on first encode_flat, per process
        # piece_to_id returns unk for unknown pieces: a model without our symbols is unusable.
        unk = self._sp.unk_id()
        missing = [t for t in (*SPECIAL_TOKENS, _NEWLINE) if self._sp.piece_to_id(t) == unk]
        if missing:
            raise ConfigError(f"tokenizer model {self.path or '?'} lacks special tokens {missing}")

    # ------------------------------------------------------------------ loading / pickling

    @classmethod
    def load(cls, dir: str, s3=None) -> Tokenizer:
        """The tokenizer in directory `dir`, local or `s3://` (`s3`: a `raylm.config.S3Config`).
        From object storage only its two files are read, straight into memory: no copy of
        the whole prefix (a run directory named by mistake holds checkpoints), and errors
        name the URI, not a temporary directory."""
        if str(dir).startswith("s3://"):
            from raylm import storage  # boto3: only for s3://, not in every tokenizer actor

            model_path, meta_path = storage.join(dir, MODEL_FILE), storage.join(dir, META_FILE)
            for p in (model_path, meta_path):
                if not storage.exists(p, s3):
                    raise ConfigError(f"tokenizer file not found: {p}")
            return cls._from_files(storage.read_bytes(model_path, s3), storage.read_bytes(meta_path, s3),
                                   model_path, meta_path, str(dir))
        d = Path(dir)
        model_path, meta_path = d / MODEL_FILE, d / META_FILE
        for p in (model_path, meta_path):
            if not p.is_file():
                raise ConfigError(f"tokenizer file not found: {p}")
        return cls._from_files(model_path.read_bytes(), meta_path.read_bytes(), model_path, meta_path, str(d))

    @classmethod
    def _from_files(cls, model_bytes: bytes, meta_bytes: bytes, model_path, meta_path, path: str) -> Tokenizer:
        """The tokenizer of a model file and its sidecar, checked to belong together."""
        redo = "retrain the tokenizer (raylm tokenizer train) or copy its directory again"
        try:
            meta = json.loads(meta_bytes)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise ConfigError(f"{meta_path}: not valid JSON ({e}); {redo}") from e
        except RecursionError:  # nested past the parser's limit
            raise ConfigError(f"{meta_path}: not valid JSON (nested too deeply to read); {redo}") from None
        if not isinstance(meta, dict):
            raise ConfigError(f"{meta_path}: not a JSON object; {redo}")
        digest = hashlib.sha256(model_bytes).hexdigest()
        if meta.get("sha256") != digest:
            raise ConfigError(
                f"tokenizer model {model_path} has sha256 {digest[:12]}..., but {meta_path} "
                f"records {str(meta.get('sha256'))[:12]}...; the files do not belong together"
            )
        # A sidecar written for the file it names, but not by raylm's training: SentencePiece
        # refused it with a bare "ParseFromArray" traceback, and an empty file loaded as a
        # tokenizer of no pieces at all.
        if not model_bytes:
            raise ConfigError(f"{model_path}: empty, not a SentencePiece model; {redo}")
        try:
            tok = cls(model_bytes, meta, path)
        except RuntimeError as e:
            raise ConfigError(f"{model_path}: not a SentencePiece model (it does not parse); {redo}") from e
        # The sidecar's description of the model must be the model's: a hand-edited vocab_size
        # (or ids) was ignored in silence, every reader getting the model's own.
        for key, have in (("vocab_size", tok.vocab_size), ("bos_id", tok.bos_id), ("eos_id", tok.eos_id),
                          ("pad_id", tok.pad_id)):
            if key in meta and meta[key] != have:
                raise ConfigError(f"{meta_path}: records {key} {meta[key]!r}, but {model_path} has {have}; "
                                  f"the files do not belong together; {redo}")
        return tok

    @property
    def model_bytes(self) -> bytes:
        """The SentencePiece model file's bytes: what exports write (the directory the
        tokenizer was loaded from may have been a temporary copy)."""
        return self._model_bytes

    def __getstate__(self) -> dict:
        # The C++ processor cannot be pickled; the model bytes rebuild it exactly.
        return {"model_bytes": self._model_bytes, "meta": self.meta, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_bytes"], state["meta"], state["path"])

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
            f"sha256={self.sha256[:12]})"
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as markup: a chat marker string in it becomes the marker's id
        (as the HF export's tokenizer reads text: the markers are added tokens it matches). No
        bos/eos is added (the caller decides document framing). Raw prompts (`raylm generate`
        without --chat, the server's /v1/completions) and eval task text, which may be a
        rendered chat, are encoded so: their author writes the markup. Documents and other
        plain text: `encode_plain` / `encode_flat`; chat messages: `encode_chat`."""
        return _sp_encode(self._sp, text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text (markup: marker strings become marker ids)."""
        # One thread: parallelism comes from many Ray actors, each pinned to a CPU;
        # SentencePiece's own thread pool would oversubscribe the cores.
        return _sp_encode(self._sp, list(texts), num_threads=1)

    def fork(self) -> "Tokenizer":
        """The same tokenizer with a segment cache of its own, for another thread."""
        other = copy.copy(self)
        other._segments = None
        return other

    def encode_flat(self, texts: pa.Array | pa.ChunkedArray | list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Ids of many documents at once: one int32 array and int64 offsets (len(texts) + 1),
        so document i is ids[offsets[i]:offsets[i + 1]]. Documents are plain text: the same
        ids as `encode_plain` of each (a chat marker string is ordinary pieces, never a marker
        id; text without one encodes as `encode_batch` does), faster on bulk text: see
        `SegmentCache`."""
        if self._segments is None:
            self._segments = SegmentCache(self._sp)
        if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
            try:
                texts = pa.array(texts, pa.large_string())
            except UnicodeEncodeError as e:
                raise (_not_text(texts) or e) from e
        return self._segments.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control ids (bos/eos/pad) decode to the empty string.

        The one text that does not come back is "▁" (U+2581): SentencePiece writes a space as
        that character, so a "▁" in encoded text is the space's piece and decodes as " ". Ids
        that kept it (its UTF-8 bytes as byte pieces) would differ from those of the HF and
        GGUF exports' tokenizers and of every dataset already prepared, so it stays a limit."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    # ------------------------------------------------------------------ chat

    def encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with any chat marker string in it as ordinary pieces, never a marker id.
        SentencePiece matches its user-defined symbols anywhere in its input, so the text is
        cut inside each marker ("...<|" + "user|>...") and the parts are encoded alone: no part
        holds a whole marker. Text without markers encodes exactly as `encode` does, and
        decoding gives `text` back (no dummy prefix: a part adds no space), but for a "▁"
        (U+2581), which comes back as a space (see `decode`). Pre-training
        documents (`encode_flat`) and a bits-per-byte corpus are encoded so."""
        parts = _plain_parts(text)
        if len(parts) == 1:
            return _sp_encode(self._sp, text)
        return [i for ids in _sp_encode(self._sp, parts, text, num_threads=1) for i in ids]

    def _chat_segments(
        self, messages: Sequence[dict], add_generation_prompt: bool
    ) -> list[tuple[str, bool, bool]]:
        """The template as (text, is_assistant_target, is_content) pieces, each boundary at a
        symbol; content is plain text, the rest markup."""
        segs: list[tuple[str, bool, bool]] = []
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if not isinstance(role, str) or role not in ROLE_TOKENS:  # a list or dict: unhashable
                raise DataError(
                    f"chat message {i} has role {role!r}; expected one of {', '.join(CHAT_ROLES)}"
                )
            if not isinstance(content, str):
                raise DataError(
                    f"chat message {i} content must be a str, got {type(content).__name__}"
                )
            target = role == "assistant"
            segs += [(ROLE_TOKENS[role] + "\n", False, False), (content, target, True), (END, target, False),
                     ("\n", False, False)]
        if add_generation_prompt:
            segs.append((ROLE_TOKENS["assistant"] + "\n", False, False))
        return segs

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> str:
        """`<|role|>\\n{content}<|end|>\\n` per message, then `<|assistant|>\\n` if asked. Encode
        chats with `encode_chat`: encoding this text reads marker strings in content as markers."""
        return "".join(t for t, _, _ in self._chat_segments(messages, add_generation_prompt))

    def encode_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Ids of the rendered chat and a mask that is True on assistant reply tokens.

        The mask covers each assistant message's content and its closing `<|end|>` (the
        model must learn to stop), not role markers or the other turns: SFT computes the
        loss only there. Content is plain text (`encode_plain`): a marker string in a message
        is not a marker, so no message can open another turn; a "▁" (U+2581) in it decodes as
        a space (see `decode`). Each segment starts and ends at an atomic symbol (a role marker,
        `<|end|>` or "\\n"), so for content without marker strings the concatenated ids equal
        `encode(apply_chat_template(...))`.
        """
        ids: list[int] = []
        mask: list[bool] = []
        for n, (text, target, content) in enumerate(self._chat_segments(messages, add_generation_prompt)):
            try:
                piece = self.encode_plain(text) if content else self._sp.encode(text)
            except DataError as e:  # content's: markup is ours (4 segments a message)
                raise DataError(f"chat message {n // 4} content: {e}") from e
            ids += piece
            mask += [target] * len(piece)
        return ids, mask


# --------------------------------------------------------------------------- bulk encoding


_SPACE = "\u2581"  # how SentencePiece writes " " inside pieces


def segment_split(sp: spm.SentencePieceProcessor) -> str | None:
    """Where text can be cut into independently encodable segments under this model.

    BPE only ever merges adjacent symbols into a vocabulary piece, so a cut that no piece
    can span never changes the result: encode(a + b) == encode(a) + encode(b). SentencePiece
    writes a space as U+2581 ("▁", and a literal "▁" in the text reads the same), and with
    its whitespace pre-splitting pieces carry "▁" only at their start, or are runs of it
    (allow_whitespace_only_pieces). Hence:
      * "every-space": no piece holds "▁" after its first character, so every space starts
        a segment;
      * "space-runs": no piece holds "▁" right after another character, so a segment starts
        at each space that follows a character other than a space or "▁" (runs stay whole);
      * None: some piece spans such a cut, or the model is not one this reasoning covers
        (not BPE; a normaliser that is not the identity, adds a dummy prefix, collapses
        spaces or moves whitespace to the end of pieces, any of which acts across a cut).
    User-defined symbols (the chat markers) hold no spaces and are matched greedily from
    left to right, which a cut before a space cannot change either."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # needs protobuf; without it, no cut is assumed safe
        return None
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(sp.serialized_model_proto())
    norm, trainer = model.normalizer_spec, model.trainer_spec
    if (trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE or norm.name != "identity"
            or norm.add_dummy_prefix or norm.remove_extra_whitespaces or not norm.escape_whitespaces
            or trainer.treat_whitespace_as_suffix):
        return None
    return split_rule(sp.id_to_piece(i) for i in range(sp.get_piece_size()))


def split_rule(pieces: Iterable[str]) -> str | None:
    """The vocabulary half of `segment_split`."""
    pieces = list(pieces)
    if not any(_SPACE in p[1:] for p in pieces):
        return "every-space"
    if not any(re.search(f"[^{_SPACE}]{_SPACE}", p) for p in pieces):
        return "space-runs"
    return None


class SegmentCache:
    """Plain-text SentencePiece encoding (`Tokenizer.encode_plain` of each document) through
    a cache of text segments (a space and a word, mostly).

    Natural text repeats its words: after a few MB nearly every segment has been seen, and
    looking it up (a hash in Arrow, then a numpy gather) costs a fraction of running BPE
    again. Only the misses go to SentencePiece, in one call. `segment_split` proves the
    cut exact for the model; where it cannot, or where a text holds the NUL used to mark
    the cuts, encoding falls back to SentencePiece on whole documents.

    Documents are plain text: the new segments (and fallback documents) are encoded as
    `encode_plain` encodes, cut inside each chat marker string they hold, so a segment holding
    one is cached with the ids of its text, never a marker id. A marker holds no space, so the
    space cuts never split one: the segments' plain ids joined are the document's
    `encode_plain` ids. The marker check runs on the misses only (a substring search each), not
    on the whole batch, so text without markers costs what it did.

    Memory is bounded whatever the corpus: segments longer than `max_chars` (text without
    spaces: CJK, minified code, base64) are encoded for their batch only, never kept, and
    the cache is cleared when it would pass `max_segments` entries or `max_ids` ids."""

    def __init__(self, sp: spm.SentencePieceProcessor, max_segments: int = 1 << 19, max_ids: int = 1 << 23,
                 max_chars: int = 64):
        self.sp, self.max_segments, self.max_ids, self.max_chars = sp, max_segments, max_ids, max_chars
        self.split = segment_split(sp)
        self._clear()

    def _clear(self) -> None:
        self.slot: dict[str, int] = {}  # segment -> row i, its ids being ids[bounds[i]:bounds[i + 1]]
        self.bounds = np.zeros(1, dtype=np.int64)
        self.ids = np.zeros(0, dtype=np.int32)

    def encode(self, texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        # large_string before combining: a batch over 2 GiB would overflow 32-bit offsets.
        texts = texts.cast(pa.large_string())
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        if self.split is None or (len(texts) and pc.any(pc.match_substring(texts, "\x00")).as_py()):
            return _encode_plain(self.sp, texts.to_pylist())
        if self.split == "every-space":
            marked = pc.replace_substring(texts, " ", "\x00 ")
        else:
            marked = pc.replace_substring_regex(texts, f"([^ {_SPACE}]) ", "\\1\x00 ")
        segments = pc.split_pattern(marked, "\x00")  # list<string>, one list per document
        coded = pc.dictionary_encode(pc.list_flatten(segments))
        unique = coded.dictionary
        if len(self.slot) + len(unique) > self.max_segments or len(self.ids) > self.max_ids:
            self._clear()
        long = pc.greater(pc.utf8_length(unique), self.max_chars).to_numpy(zero_copy_only=False)
        slots = self._rows(unique.to_pylist(), long)[coded.indices.to_numpy(zero_copy_only=False)]
        # Gather: token j of the output is ids[bounds[slot] + (j - first output token of its segment)].
        starts = self.bounds[slots]
        lengths = self.bounds[slots + 1] - starts
        seg_offsets = np.zeros(len(slots) + 1, dtype=np.int64)
        np.cumsum(lengths, out=seg_offsets[1:])
        positions = np.arange(seg_offsets[-1], dtype=np.int64) + np.repeat(starts - seg_offsets[:-1], lengths)
        ids = self.ids[positions]
        # Long segments sit after the cached rows, for this batch only: cut them off.
        self.bounds = self.bounds[:len(self.slot) + 1]
        self.ids = self.ids[:self.bounds[-1]]
        return ids, seg_offsets[segments.offsets.to_numpy(zero_copy_only=False)]

    def _rows(self, unique: list[str], long: np.ndarray) -> np.ndarray:
        """Table rows of the `unique` segments. New short segments are encoded and cached;
        long ones are encoded into rows after them, for this batch only. One lookup per
        segment, in C (`map` over `dict.get`); only the misses are touched in Python.
        Against a Python pass to find the misses and a second one for the rows, encode_flat
        on a cold 50 MB corpus ran about 16% faster (benchmarks/tokenize_throughput.py, four
        alternating pairs, faster in each)."""
        rows = np.fromiter(map(self.slot.get, unique, itertools.repeat(-1)), dtype=np.int64, count=len(unique))
        new = rows < 0  # long segments are never cached, so they are all here
        if new.any():
            missing = np.flatnonzero(new & ~long)
            once = np.flatnonzero(new & long)
            texts = [unique[i] for i in missing.tolist()]
            ids, offsets = _encode_plain(self.sp, texts + [unique[i] for i in once.tolist()])
            first = len(self.slot)
            self.ids = np.concatenate([self.ids, ids])
            self.bounds = np.concatenate([self.bounds, self.bounds[-1] + offsets[1:]])
            self.slot.update(zip(texts, range(first, first + len(texts))))
            rows[missing] = np.arange(first, first + len(missing))
            rows[once] = np.arange(first + len(missing), first + len(missing) + len(once))
        return rows


def _encode_plain(sp: spm.SentencePieceProcessor, texts: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """`Tokenizer.encode_plain` of each text (None as ""), as `_flatten` gives them: the
    parts of every text (`_plain_parts`) go to SentencePiece in one call. Texts without "<|"
    (nearly all) cost one substring search each."""
    if not any(_MARKER_HEAD in t for t in texts if t):
        return _flatten(sp.encode([t or "" for t in texts], num_threads=1))
    parts: list[str] = []
    counts = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        split = _plain_parts(text or "")
        parts += split
        counts[i] = len(split)
    ids, offsets = _flatten(sp.encode(parts, num_threads=1))
    return ids, offsets[np.concatenate([[0], np.cumsum(counts)])]


def _flatten(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """SentencePiece's lists of ids as one int32 array and int64 offsets."""
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    # chain.from_iterable walks the lists in C: 0.16 s against a generator expression's 0.22 s
    # for 2.1M ids, which resumed a Python frame per id.
    return np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(offsets[-1])), offsets
