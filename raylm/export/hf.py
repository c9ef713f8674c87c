"""Export a raylm model and tokenizer as a Hugging Face `LlamaForCausalLM` directory.

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` and computes what raylm computes: the weight names and
`config.json` come from `raylm.hf` (whose parity test shows raylm's RoPE already uses HF's
rotate-half layout, so no q/k permutation is applied), the tokenizer is raylm's own
SentencePiece model. Only JSON and safetensors are written: no pickle anywhere, and
transformers is not imported here.

Completeness. A local export is written into a hidden sibling directory and renamed to `out`
only once every file is in it, so `out` either does not exist or is complete; anything that
appeared at `out` while the export ran is kept and the export refused (`_place`). A sibling
that a killed export left is removed by the next export to `out` once its process is known to
be gone (`remove_dead_temps`). Weights that float16 would make inf are refused before anything
is written (`check_fits_float16`). Object storage
has no rename: an s3:// export is built locally, uploaded, and `EXPORT_MARKER` is uploaded
last, `config.json` just before it (what HF readers, which know no marker, look for first:
a cut upload leaves none); an s3:// export is complete exactly when that marker exists (it
is in local exports too, with the same provenance). The marker lists the export's files, and readers
(`raylm.hf.hf_weight_files`) take the weights it lists. Before uploading, `PENDING_MARKER`
names the files about to be uploaded, so a retry after a failed upload removes exactly those
(uploads overwrite but never delete, and a stale index beside new weights would be read as
the model); a prefix holding anything else is refused, never deleted.

Vocabulary. raylm pads its embedding to a multiple of 64 rows (model.vocab_size=0) and its
own generation samples from the tokenizer's ids only. The export keeps the tokenizer's rows
only (`vocab_size` in config.json is the tokenizer's), so `generate` cannot sample an id the
tokenizer lacks, log-probs are normalised over the ids raylm's are, and the real ids' logits
are raylm's. `--init-from-hf` from such an export builds the unpadded model.

Tokenizer. transformers 5's `LlamaTokenizer` (a `tokenizers` BPE with byte fallback, built
from `tokenizer.model` at load time; transformers 4's `LlamaTokenizerFast` too) gives raylm's
ids exactly under these settings:
`add_prefix_space: false` (raylm trains with add_dummy_prefix=False; the default would
prepend "▁" to every text), `legacy: false`, no BOS/EOS added (raylm never adds them), and
the special tokens registered by id in `added_tokens_decoder`. The chat markers are
registered as non-special added tokens, so they are matched from raw text as one id each, as
SentencePiece's user-defined symbols are. BOS, EOS, PAD and UNK are special, and
`split_special_tokens: true` keeps special tokens from being matched in text, as
SentencePiece never matches its control pieces: a document containing the text "<|eos|>"
encodes as that text, not as the EOS id, in both. "\\n" (a user-defined symbol too) needs no
registration: it is one vocabulary piece that no merge contains, so it stays a token of its
own. The chat template is rendered as a string, so a chat marker typed inside a message's
content is encoded as the marker, as raylm's own tokenizer once did; it cannot be told apart
from the template's markers there.

A reply keeps its `<|end|>`. transformers gives an added token one flag for two things: a
special token is dropped by `decode(..., skip_special_tokens=True)` and, under
`split_special_tokens`, split into text pieces when encoding (tokenizers' `special`, in
transformers 4.46 and 5 alike). The chat markers must be matched and the control tokens' text
must stay text, so the markers cannot be special: with them special, the template's markers
are split; without `split_special_tokens`, the text "<|eos|>" becomes the EOS id. So a reply
that `generate` stopped at `<|end|>` (generation_config.json's stop) decodes, even with
skip_special_tokens=True, to its text followed by "<|end|>", and the `text-generation`
pipeline's chat reply ends with it too; `.removesuffix("<|end|>")` gives raylm's `chat_reply`
(`tests/unit/test_hf_export_chat_reply.py`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from raylm.errors import CheckpointError, ConfigError, OutputExistsError
from raylm import storage
from raylm.config import S3Config
from raylm.hf import EXPORT_MARKER, hf_llama_config, to_hf_state_dict
from raylm.progress import Progress
from raylm.tokenizer import BOS, CHAT_ROLES, END, EOS, MODEL_FILE, PAD, SPECIAL_TOKENS, UNK, Tokenizer

PENDING_MARKER = "raylm_export.pending.json"  # an s3:// upload in progress: {"files": [...]}
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size ("5GB")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# raylm's template (`Tokenizer.apply_chat_template`): `<|role|>\n{content}<|end|>\n` per message,
# then `<|assistant|>\n` when a generation prompt is asked for. Whitespace control (`-`) keeps
# the template's own layout out of the output; unknown roles fail as raylm's do.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in " + repr(list(CHAT_ROLES)) + " -%}"
    "{{ raise_exception('chat message role must be one of " + ", ".join(CHAT_ROLES) + "') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '" + END + "\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"export dtype {dtype}: expected one of {', '.join(_DTYPES)}")
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _shards(hf_sd: dict[str, torch.Tensor], dtype: torch.dtype, max_bytes: int) -> list[list[str]]:
    """Names grouped in order into shards of at most `max_bytes` at `dtype` (a larger tensor
    gets a shard of its own: tensors are not split)."""
    item = torch.empty((), dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in hf_sd.items():
        n = t.numel() * item
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _hf_tensors(model, vocab_size: int) -> dict[str, torch.Tensor]:
    """The tensors the export writes, under their HF names."""
    cfg = model.cfg
    # Views of the parameters, no copies; the tokenizer's rows only (see check_vocab).
    hf_sd = to_hf_state_dict(cfg, model.state_dict(), vocab_size)
    if cfg.tie_embeddings:
        # One tensor under two names: safetensors refuses shared storage, and HF's own
        # save_pretrained drops the head too; tie_word_embeddings=True re-ties it on load.
        del hf_sd["lm_head.weight"]
    return hf_sd


class WeightRangeError(ConfigError):
    """A weight too large for the export's float16 (or float16-scaled) values: converted, it
    would become inf, and the exported model would compute NaNs."""


# float16's largest finite value is 65504; from 65520 on (65504 plus half its step of 32) a
# value rounds to inf when converted, in torch and numpy alike.
F16_MAX = 65504.0
_F16_INF_FROM = 65520.0


def largest_magnitude(t: torch.Tensor) -> float:
    """The largest finite |value| in `t` (0.0 for none). NaN and inf already in the weights are
    left out: no conversion makes them, and every dtype exports them as they are."""
    t = t.detach()
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t)  # no copy of the tensor
    if torch.isfinite(lo) and torch.isfinite(hi):
        return max(-float(lo), float(hi))
    a = t.abs()
    return float(a.masked_fill(~torch.isfinite(a), 0).max())


def check_fits_float16(tensors, what: str, fix: str, scale: float = 1.0,
                       why: str = "float16's largest value: it would become inf") -> None:
    """Refuse, naming the first tensor and its largest magnitude, any of the (name, tensor)
    pairs whose finite values would become inf as float16 (divided by `scale` first: q8_0's
    float16 block scales)."""
    for name, t in tensors:
        big = largest_magnitude(t)
        if big / scale >= _F16_INF_FROM:
            raise WeightRangeError(f"{what}: {name} holds a value of magnitude {big:.7g}, beyond "
                                   f"±{F16_MAX * scale:.7g} ({why}); {fix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (PermissionError), or cannot tell
        return True
    return True


def _instance_tag() -> str | None:
    """A short hash naming this kernel's boot and this process's PID namespace, within which a
    process id names one process; None where /proc cannot tell them (not Linux, or a /proc
    mounted from another PID namespace)."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{boot} {ns}".encode()).hexdigest()[:12] if boot and ns else None


def _temp_base(out: Path) -> str:
    return f".{out.name[:200]}.tmp-"  # cut: the tag, pid and random part must fit a name too


def temp_prefix(out: Path) -> str:
    """The name prefix of `out`'s hidden temporary sibling: `.NAME.tmp-`, then (where
    `_instance_tag` can tell) this kernel boot's and PID namespace's tag and this process's id,
    so that a later export can tell a killed export's leftover (`remove_dead_temps`)."""
    tag = _instance_tag()
    return _temp_base(out) + ("" if tag is None else f"{tag}-{os.getpid()}-")


def remove_dead_temps(out: Path, is_dir: bool) -> None:
    """Remove the temporaries that exports to `out` which were killed before they finished
    left beside it (a killed process cleans nothing up): those whose name carries this kernel
    boot's and PID namespace's tag and the id of a process that no longer exists. A live
    export's temporary is never removed (its process exists: another export to the same path,
    in this process or another), nor one made on another machine sharing the filesystem or in
    another container (another tag), nor one whose name gives no process (an older raylm's):
    whether its process still runs cannot be told from here. A process id reused since only
    keeps a leftover."""
    tag = _instance_tag()
    if tag is None:
        return
    # tempfile's random part is [a-z0-9_]: no "." or "-", so no other output's temporary matches.
    pattern = re.compile(re.escape(f"{_temp_base(out)}{tag}-") + r"([1-9][0-9]{0,9})-[a-z0-9_]+")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or _alive(int(m[1])):
            continue
        path = out.parent / name
        try:
            mode = os.lstat(path).st_mode
            if is_dir and stat.S_ISDIR(mode):
                shutil.rmtree(path)
            elif not is_dir and stat.S_ISREG(mode):
                path.unlink()
            else:
                continue
        except OSError:  # removed meanwhile, or not ours to remove: left as it is
            continue
        _to_stderr(f"export: removed {path}, left by an export to {out} that was stopped before it finished")


def _write_weights(model, out: Path, dtype: torch.dtype, max_shard_bytes: int, vocab_size: int,
                   every_s: float | None = None) -> None:
    hf_sd = _hf_tensors(model, vocab_size)
    shards = _shards(hf_sd, dtype, max_shard_bytes)
    names = [WEIGHTS] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    weight_map, total = {}, 0
    # A 7B model's shards take minutes: progress on stderr (stdout is the command's JSON).
    progress = Progress("export: weights", sum(hf_sd[k].numel() for keys in shards for k in keys) * dtype.itemsize,
                        unit="GB", scale=1e9, log=_to_stderr, stream=sys.stderr, every_s=every_s)
    for file, keys in zip(names, shards):
        # Only this shard's converted copies live at once (a no-op `.to` shares the parameter).
        tensors = {k: hf_sd[k].detach().to("cpu", dtype).contiguous() for k in keys}
        save_file(tensors, str(out / file), metadata={"format": "pt"})  # "pt": what HF loaders expect
        os.chmod(out / file, 0o644)  # safetensors leaves its file private (0600); the export is for others to read
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, file))
        del tensors
        progress.update(total, file)
    progress.close()
    if len(shards) > 1:
        _write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _write_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    (out / MODEL_FILE).write_bytes(tok.model_bytes)
    extra = [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)]  # the role markers and END
    added = {
        str(tok._sp.piece_to_id(t)): {
            # Special (never matched from text under split_special_tokens): what SentencePiece
            # never matches either. The chat markers it does match, so they are not special.
            "content": t, "special": t not in extra, "normalized": False,
            "lstrip": False, "rstrip": False, "single_word": False,
        }
        for t in (UNK, *SPECIAL_TOKENS)
    }
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # text "<|eos|>" is text, as in raylm (see the module docstring)
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        # The chat markers are not listed as additional (extra) special tokens: transformers 4's
        # fast tokenizer makes every listed token special, which split_special_tokens then
        # splits into text pieces, so its chat template's markers were not marker ids.
        "added_tokens_decoder": added,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(out / "special_tokens_map.json", {
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
    })


def check_vocab(cfg, tok: Tokenizer) -> None:
    """The model's embedding covers every id the tokenizer emits. It may have more rows: raylm
    rounds the vocabulary up to a multiple of 64 (model.vocab_size=0). Those padding rows are
    not exported (`raylm.hf.trim_vocab`): the exported vocabulary is the tokenizer's, so a
    loader samples and normalises over the ids raylm's own generation does, and no other."""
    if cfg.vocab_size < tok.vocab_size:
        raise CheckpointError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}: "
                              "its last ids would have no embedding")


def _write_all(model, tok: Tokenizer, meta: dict, out: Path, dtype: torch.dtype, max_shard_bytes: int,
               every_s: float | None = None) -> dict:
    cfg = model.cfg
    config = hf_llama_config(cfg, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size)  # refuses non-Llama first
    check_vocab(cfg, tok)  # a padded embedding (model.vocab_size=0 rounds up to 64s) loses its padding
    config["torch_dtype"] = config["dtype"] = _dtype_name(dtype)  # < 5 and >= 5 spellings
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": tok.bos_id,
        # A chat reply ends with <|end|> (raylm's chat_reply stops there), a document with EOS.
        "eos_token_id": [tok.eos_id, tok.special_ids[END]],
        "pad_token_id": tok.pad_id,
    })
    _write_tokenizer(tok, out, cfg.max_seq_len)
    _write_weights(model, out, dtype, max_shard_bytes, tok.vocab_size, every_s)
    return {
        "format": "hf-llama",
        "step": meta.get("step"),
        "source": meta.get("source"),
        "tokenizer_sha256": tok.sha256,
        "dtype": _dtype_name(dtype),
    }


def _check_options(dtype: torch.dtype | str, max_shard_bytes: int) -> torch.dtype:
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes={max_shard_bytes}: must be positive")
    return _dtype(dtype)


def local_out(out: str) -> str:
    """A local output path as raylm's storage layer reads one (`raylm.storage`): a `file://`
    prefix dropped and `~` the home directory (else the export went to `./file:/...` or
    `./~/...` under the working directory); another scheme than s3:// is refused in one line,
    not made a local directory. A relative path stays relative."""
    if "://" in out and not out.startswith("file://"):
        storage._local(out)  # a StorageError naming the unsupported scheme
    return os.path.expanduser(out.removeprefix("file://"))


def check_out_outside_run(src: str, out: str) -> None:
    """Refuse an output inside the directory of the run that `src` (a run, or one of its
    checkpoints, `ckpt-N`) belongs to: the run deletes what it owns there as it trains on
    (retention removes `ckpt-N/` whole, an export inside it too; a restarted run its
    `eval/ckpt-N/` and `report/`), so an export there would be lost without a word. Told
    from the paths alone: nothing is read."""
    from raylm.checkpoint import step_of

    if storage.is_s3(out) != storage.is_s3(src):
        return
    if storage.is_s3(src):
        src, there = src.rstrip("/"), out
    else:  # a link to the run (or a path through one) is the run
        src, there = os.path.realpath(local_out(src)), os.path.realpath(local_out(out))
    run_dir = storage.parent(src) if step_of(src.rpartition("/")[2]) is not None else src
    try:
        storage.relative(there, run_dir)
    except ValueError:
        return
    raise ConfigError(f"{out}: inside the run directory {run_dir}, whose checkpoints, eval results and report "
                      f"the run deletes as it trains on; export outside it")


def check_local_out(out: Path, fix: str) -> None:
    """Refuse a local output path that cannot become a new export: anything already there (a
    dangling link too: a rename would replace it), or a path under a file."""
    if os.path.lexists(out):
        raise OutputExistsError(f"{out}: already exists; {fix}")
    parent = out.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{out}: {parent} is not a directory; {fix}")


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` unless anything is at `dst` (FileExistsError), atomically: Linux's
    renameat2(RENAME_NOREPLACE). False where the C library or the filesystem lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux (TypeError: Windows)
        return False
    at_fdcwd, rename_noreplace = -100, 1  # <fcntl.h>, <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))  # EEXIST: a FileExistsError


def _place(tmp: Path, out: Path) -> None:
    """Make the finished directory `tmp` appear at `out` at once, never over anything that
    appeared at `out` during the export (another export to the same path, a directory someone
    made): a plain rename replaces an empty directory and fails with a bare OSError on the
    rest. Without renameat2, what appears between the check and the rename (an instant) gets
    the rename's own refusal, and only an empty directory made in that instant is replaced."""
    appeared = OutputExistsError(f"{out}: appeared during the export; export into a new directory")
    try:
        if _rename_noreplace(tmp, out):
            return
        if os.path.lexists(out):
            raise appeared
        os.rename(tmp, out)  # atomic on one filesystem
    except OSError as e:
        if e is appeared or e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        raise appeared from None


def export_hf(model, tokenizer: Tokenizer, meta: dict, out_dir: str, dtype: torch.dtype | str = torch.float32,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress_every_s: float | None = None) -> str:
    """Write `model` (a raylm Transformer) and `tokenizer` to the new local directory
    `out_dir` as a Hugging Face Llama; return its path. `meta`: the checkpoint's meta
    (its step and source are recorded in `EXPORT_MARKER`). An existing `out_dir` is refused
    rather than replaced; on any error nothing is left at `out_dir`. Progress goes to stderr
    every `progress_every_s` (raylm.progress's default when None)."""
    dtype = _check_options(dtype, max_shard_bytes)
    out = Path(out_dir)
    check_local_out(out, "export into a new directory")
    if dtype == torch.float16:  # refused before anything is written
        check_vocab(model.cfg, tokenizer)
        check_fits_float16(_hf_tensors(model, tokenizer.vocab_size).items(), "export dtype float16",
                           "export with dtype bfloat16 or float32")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(out, is_dir=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        marker = _write_all(model, tokenizer, meta, tmp, dtype, max_shard_bytes, progress_every_s)
        marker["files"] = sorted(p.name for p in tmp.iterdir())  # what readers take as this export
        _write_json(tmp / EXPORT_MARKER, marker)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is a normal directory
        # Content on disk before the rename makes it visible: a crash after a rename that
        # reached the disk first would leave a complete-looking export (marker included)
        # with empty or short weights, which a recipe rerun takes as done.
        storage.make_durable(str(tmp))
        _place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def export_run(uri: str, out: str, s3: S3Config | None = None, checkpoint: str | None = None,
               dtype: str = "float32", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Export a run's newest complete checkpoint (or `checkpoint`: a checkpoint directory, or
    the name of one inside the run, e.g. "ckpt-00001000") to `out`, local or s3://."""
    from raylm.generate import load_for_inference

    src = uri
    if checkpoint:
        src = checkpoint if storage.is_s3(checkpoint) or os.sep in checkpoint or "/" in checkpoint \
            else storage.join(uri, checkpoint)
    # Whatever refuses the output or the options does so before the load (minutes, for a big
    # model), not after it.
    _check_options(dtype, max_shard_bytes)
    if not storage.is_s3(out):
        out = local_out(out)
    check_out_outside_run(src, out)
    if storage.is_s3(out):
        _clear_failed_upload(out, s3)
    else:
        check_local_out(Path(out), "export into a new directory")
    model, tok, meta = load_for_inference(src, s3)
    meta = {**meta, "source": src}
    if not storage.is_s3(out):
        return export_hf(model, tok, meta, out, dtype, max_shard_bytes)
    with tempfile.TemporaryDirectory(prefix="raylm-export-") as tmp:
        local = Path(export_hf(model, tok, meta, str(Path(tmp) / "hf"), dtype, max_shard_bytes))
        marker = (local / EXPORT_MARKER).read_bytes()
        (local / EXPORT_MARKER).unlink()
        pending = storage.join(out, PENDING_MARKER)
        files = sorted(p.name for p in local.iterdir())
        storage.write_bytes(pending, json.dumps({"files": files}).encode(), s3)  # first: a retry knows them
        # config.json after the rest: HF readers (transformers, vLLM, --init-from-hf) know no
        # marker and take a prefix with config.json for a model, so a cut upload leaves none.
        config = (local / "config.json").read_bytes()
        (local / "config.json").unlink()
        storage.upload_dir(str(local), out, s3, log=_to_stderr)  # a line every few seconds past 256 MB
        storage.write_bytes(storage.join(out, "config.json"), config, s3)
        storage.write_bytes(storage.join(out, EXPORT_MARKER), marker, s3)  # last: the export is complete
        storage.delete(pending, s3)
    return out


def _clear_failed_upload(out: str, s3: S3Config | None) -> None:
    """Make the prefix `out` empty for an upload: remove what a failed upload of ours left there
    (the files its `PENDING_MARKER` names), and refuse a complete export or any other file."""
    found = {f.uri[len(out.rstrip("/")) + 1:]: f.uri for f in storage.list_files(out, s3, pattern=False)}
    if EXPORT_MARKER in found:
        raise OutputExistsError(f"{out}: already holds a complete export; export to a new prefix")
    ours = {PENDING_MARKER}
    if PENDING_MARKER in found:
        try:
            ours |= set(json.loads(storage.read_bytes(found[PENDING_MARKER], s3))["files"])
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: '[[[[...' nested
            raise OutputExistsError(f"{found[PENDING_MARKER]}: not a raylm export's file list ({e}); "
                                    f"export to a new prefix") from None
    others = sorted(name for name in found if name not in ours)
    if others:
        raise OutputExistsError(f"{found[others[0]]}: {out} holds files that no raylm export wrote; "
                                f"export to a new or empty prefix")
    for name in sorted(found, key=lambda n: n == PENDING_MARKER):  # the list last: a failure here can retry
        storage.delete(found[name], s3)
