"""Export a raylm model and tokenizer as one GGUF file for llama.cpp (architecture `llama`).

The file is what llama.cpp's own `convert_hf_to_gguf.py` would write for the Hugging Face
export of the same checkpoint (`raylm.export.hf`), written directly with llama.cpp's Python
package `gguf`:

* metadata: the `llama.*` hyperparameters, `general.file_type` and
  `general.quantization_version`, and raylm's provenance
  (`raylm.step`, `raylm.source`, `raylm.tokenizer_sha256`, as in the HF export's marker);
* tokenizer: SentencePiece's vocabulary as llama.cpp's `llama` (SPM) tokenizer reads it:
  pieces, scores and token types, no BOS/EOS added and no space prefix (raylm adds neither),
  and the HF export's Jinja chat template;
* tensors under the converter's names, q_proj/k_proj permuted to llama.cpp's RoPE layout
  (see `permute_for_llama_cpp`), in f32, f16 or q8_0 (1-D norm weights always f32); the
  embedding and head keep the tokenizer's rows only, as the HF export's do (raylm pads its
  vocabulary to a multiple of 64, and llama.cpp would sample the padding ids). Weights that
  an f16 tensor or q8_0's float16 block scales would make inf are refused (`_check_range`).

Completeness. A local export is written to a hidden temporary sibling and linked to `out`
only once closed (`_place`: never over a file there), so `out` either does not exist or is a
complete file; a temporary that a killed export left is removed by the next export to `out`
(`raylm.export.hf.remove_dead_temps`). Object storage has
no rename, but an object appears only when its upload completes: an s3:// export is built
locally and uploaded as one object, then `<out>.raylm_export.json` (the HF export's marker
content) is written last, so a reader can also tell a finished export by that marker.
`<out>.raylm_export.pending.json`, written before the upload and deleted after the marker,
says the object at `out` is this export's: a rerun removes what a failed export left there
(an object whose marker never arrived) and exports again, where any other object is refused.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from raylm.errors import ConfigError, OutputExistsError
from raylm import storage
from raylm.config import S3Config
from raylm.export.hf import (CHAT_TEMPLATE, _to_stderr, check_fits_float16, check_local_out, check_out_outside_run,
                             check_vocab, local_out, remove_dead_temps, temp_prefix)
from raylm.hf import _check_llama, fold_logit_scale, trim_vocab
from raylm.progress import Progress
from raylm.tokenizer import END, ROLE_TOKENS, Tokenizer

MARKER_SUFFIX = ".raylm_export.json"  # s3:// only: `<out>` + this, written after `<out>`
PENDING_SUFFIX = ".raylm_export.pending.json"  # s3:// only: `<out>` + this, while `<out>` is uploaded

# Names in gguf's enums (`gguf` itself is imported only when an export runs: an optional extra).
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
_QTYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}

# raylm name -> llama.cpp name (gguf.TENSOR_NAMES for the `llama` architecture).
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight"}
_LAYER = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the `gguf` package: pip install -e '.[export]'") from None
    return gguf


def gguf_name(name: str) -> str:
    """raylm parameter name -> llama.cpp tensor name; unknown parameters are refused (a
    file without them would load and silently compute something else)."""
    if name in _TOP:
        return _TOP[name]
    prefix, idx, rest = (name.split(".", 2) + ["", ""])[:3]
    if prefix == "layers" and idx.isdigit() and rest in _LAYER:
        return f"blk.{idx}.{_LAYER[rest]}"
    raise KeyError(f"no llama.cpp `llama` equivalent for parameter {name!r}")


def permute_for_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q_proj/k_proj rows from the rotate-halves RoPE layout to llama.cpp's interleaved one.

    raylm (like HF Llama) rotates the pair (x[i], x[i + d/2]) of each head; llama.cpp's
    `llama` architecture (ggml_rope, mode 0) rotates (x[2i], x[2i + 1]). Reordering each
    head's output rows from [0..d/2, d/2..d] to [0, d/2, 1, d/2+1, ...] makes the two agree,
    and attention scores are unchanged because q and k are reordered alike. This is
    `LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py, applied to every HF Llama
    (for k, with the KV head count)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_from_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_for_llama_cpp`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _check(model, tok: Tokenizer) -> None:
    cfg = model.cfg
    _check_llama(cfg)  # qk_norm: one-line ValueError naming it (llama has no q/k norm either)
    check_vocab(cfg, tok)
    if cfg.head_dim % 2:
        raise ConfigError(f"head_dim={cfg.head_dim} is odd: RoPE needs pairs")


def _vocab(tok: Tokenizer, gguf) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and llama.cpp token types, as convert_hf_to_gguf's SentencePiece vocab:
    one per tokenizer id, as many as the exported embedding's rows (llama.cpp wants a token for
    every row; a padded model's extra rows are not exported, see `_plan`)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # SentencePiece's processor cannot say which pieces are user-defined
        raise ConfigError("GGUF export needs protobuf to read the tokenizer's piece types: "
                          "pip install -e '.[export]'") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    # SentencePiece's piece types are numbered as gguf.TokenType (NORMAL=1 ... BYTE=6), so they
    # carry over: <unk> UNKNOWN, bos/eos/pad CONTROL, <0xNN> BYTE, "\n" and the chat markers
    # USER_DEFINED. The chat markers become CONTROL, as llama.cpp expects of chat markers:
    # they are not printed when detokenizing, a prompt matches them from text when tokenized
    # with parse_special (what chat templates use), and llama.cpp treats <|end|> as
    # end-of-generation. "\n" stays USER_DEFINED: ordinary text, always one token, as in raylm.
    # A known difference: with parse_special, llama.cpp also matches bos/eos/pad (CONTROL) in
    # text, where raylm never does; without it, it matches no chat marker, where raylm does.
    # No llama.cpp token type is "special, never matched from text", so it stays as it is.
    control = {*ROLE_TOKENS.values(), END}
    tokens, scores, types = [], [], []
    for p in proto.pieces:
        tokens.append(p.piece)
        scores.append(p.score)
        types.append(int(gguf.TokenType.CONTROL if p.piece in control else gguf.TokenType(p.type)))
    return tokens, scores, types


def _plan(model, dtype: str, gguf, vocab_size: int) -> list[tuple[str, torch.Tensor, object]]:
    """(gguf name, tensor, quantization type) per tensor, in the order they are written. The
    embedding and head keep the tokenizer's `vocab_size` rows: raylm pads its vocabulary to a
    multiple of 64, and llama.cpp would sample the padding ids, which raylm never does."""
    cfg = model.cfg
    q = gguf.GGMLQuantizationType
    plan = []
    for name, t in trim_vocab(fold_logit_scale(model.cfg, model.state_dict()), vocab_size).items():
        out = gguf_name(name)
        if out.endswith("attn_q.weight"):
            t = permute_for_llama_cpp(t, cfg.n_heads)
        elif out.endswith("attn_k.weight"):
            t = permute_for_llama_cpp(t, cfg.kv_heads)
        qtype = q[_QTYPES[dtype]]
        if t.ndim <= 1:
            qtype = q.F32  # norm weights: tiny, and precision-sensitive (the converter's rule too)
        elif qtype == q.Q8_0 and t.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
            qtype = q.F16  # rows must be whole 32-value blocks; the converter falls back to f16 too
        plan.append((out, t, qtype))
    # Tied embeddings: no `output.weight`; llama.cpp reuses token_embd when it is missing.
    return plan


def _check_range(model, dtype: str, gguf, vocab_size: int) -> None:
    """Refuse weights that the plan's float16 would make inf: the f16 tensors' values, and q8_0's
    block scales (float16 too, of a block's largest magnitude / 127). f32 tensors hold anything."""
    if dtype == "f32":
        return
    q = gguf.GGMLQuantizationType
    plan = _plan(model, dtype, gguf, vocab_size)
    check_fits_float16([(name, t) for name, t, qtype in plan if qtype == q.F16],
                       f"GGUF export dtype {dtype}", "export with dtype f32")
    check_fits_float16([(name, t) for name, t, qtype in plan if qtype == q.Q8_0],
                       "GGUF export dtype q8_0", "export with dtype f32", scale=127.0,
                       why="q8_0 keeps a block's largest magnitude / 127 as a float16 scale: it would become inf")


def _array(t: torch.Tensor, qtype, gguf) -> np.ndarray:
    q = gguf.GGMLQuantizationType
    a = t.detach().to("cpu", torch.float32).numpy()
    if qtype == q.F32:
        return np.ascontiguousarray(a)
    if qtype == q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)  # uint8 blocks, (rows, bytes per row)


def _write(model, tok: Tokenizer, meta: dict, path: Path, dtype: str, every_s: float | None = None) -> None:
    gguf = _gguf()
    cfg = model.cfg
    w = gguf.GGUFWriter(None, "llama")
    w.add_name("raylm")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    # Explicit: llama.cpp otherwise derives them as dim / n_heads, which need not be raylm's
    # head_dim (dim // n_heads) times n_heads.
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(tok.vocab_size)  # the exported rows (_plan)
    w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[dtype]])
    # The converter writes it in every file; readers other than llama.cpp refuse a quantized
    # file without it (llama.cpp assumes the current version).
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, scores, types = _vocab(tok, gguf)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_unk_token_id(tok._sp.unk_id())
    w.add_eot_token_id(tok.special_ids[END])  # a chat reply ends there (raylm's chat_reply)
    w.add_add_bos_token(False)  # raylm never adds BOS or EOS
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)  # raylm trains with add_dummy_prefix=False
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_uint64("raylm.step", int(meta.get("step") or 0))
    w.add_string("raylm.source", str(meta.get("source") or ""))
    w.add_string("raylm.tokenizer_sha256", tok.sha256)

    # Streamed: tensor infos first, then one converted tensor at a time, so the export never
    # holds a second copy of the whole model.
    plan = _plan(model, dtype, gguf, len(tokens))  # llama.cpp wants a token per embedding row
    for name, t, qtype in plan:
        shape = tuple(t.shape)
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    w.write_header_to_file(path)
    try:
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # Quantizing a 7B model to q8_0 takes minutes: progress on stderr (stdout is the JSON).
        progress = Progress("export: gguf", sum(t.numel() for _, t, _ in plan), unit="M params", scale=1e6,
                            log=_to_stderr, stream=sys.stderr, every_s=every_s)
        done = 0
        for name, t, qtype in plan:
            w.write_tensor_data(_array(t, qtype, gguf))
            done += t.numel()
            progress.update(done, name)
        progress.close()
        for f in w.fout:
            f.flush()
            os.fsync(f.fileno())  # content on disk before the rename makes it visible
    finally:
        w.close()


def _check_dtype(dtype: str) -> None:
    if dtype not in _QTYPES:
        raise ConfigError(f"GGUF export dtype {dtype!r}: expected one of {', '.join(_QTYPES)}")


def _check_local_file(out: str) -> Path:
    if out.endswith(("/", os.sep)):  # Path() would drop the slash and write a file of the directory's name
        raise ConfigError(f"{out}: a GGUF export is one file; name it, e.g. {out.rstrip('/' + os.sep)}/model.gguf")
    check_local_out(Path(out), "export to a new file")
    return Path(out)


def export_gguf(model, tokenizer: Tokenizer, meta: dict, out_path: str, dtype: str = "f32",
                progress_every_s: float | None = None) -> str:
    """Write `model` (a raylm Transformer) and `tokenizer` to the new local file `out_path` as
    GGUF (`dtype`: "f32", "f16" or "q8_0"); return its path. `meta`: the checkpoint's meta
    (its step and source are recorded). An existing `out_path` is refused rather than
    replaced; on any error nothing is left at `out_path`."""
    _check_dtype(dtype)
    _check(model, tokenizer)
    out = _check_local_file(out_path)
    with torch.no_grad():
        _check_range(model, dtype, _gguf(), tokenizer.vocab_size)  # refused before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(out, is_dir=False)
    fd, name = tempfile.mkstemp(prefix=temp_prefix(out), dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with torch.no_grad():
            _write(model, tokenizer, meta, tmp, dtype, progress_every_s)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is a normal file
        _place(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(out)


def _place(tmp: Path, out: Path) -> None:
    """Make the finished `tmp` appear at `out` at once, never over a file that appeared there
    during the export (another export to the same path): a rename would replace it, a hard
    link fails instead. A filesystem without hard links gets the rename."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise OutputExistsError(f"{out}: appeared during the export; export to a new file") from None
    except OSError:
        os.rename(tmp, out)  # atomic on one filesystem
        return
    tmp.unlink()


def export_run_gguf(uri: str, out: str, s3: S3Config | None = None, checkpoint: str | None = None,
                    dtype: str = "f32") -> str:
    """Export a run's newest complete checkpoint (or `checkpoint`: a checkpoint directory, or
    the name of one inside the run) to the GGUF file `out`, local or s3://."""
    from raylm.generate import load_for_inference

    src = uri
    if checkpoint:
        src = checkpoint if storage.is_s3(checkpoint) or os.sep in checkpoint or "/" in checkpoint \
            else storage.join(uri, checkpoint)
    # Whatever refuses the output or the dtype does so before the load (minutes, for a big
    # model), not after it.
    _check_dtype(dtype)
    if not storage.is_s3(out):
        out = local_out(out)
    check_out_outside_run(src, out)
    if storage.is_s3(out):
        _check_s3_out(out, s3)
    else:
        _check_local_file(out)
    model, tok, meta = load_for_inference(src, s3)
    meta = {**meta, "source": src}
    if not storage.is_s3(out):
        return export_gguf(model, tok, meta, out, dtype)
    parent, _, name = out.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="raylm-export-") as tmp:
        # The directory holds only the finished file (export_gguf renames its temporary into
        # place), so uploading it writes exactly the object `out`.
        export_gguf(model, tok, meta, str(Path(tmp) / name), dtype)
        storage.write_bytes(out + PENDING_SUFFIX, b"{}\n", s3)  # first: a rerun knows `out` is ours
        storage.upload_dir(tmp, parent, s3, log=_to_stderr)  # a line every few seconds past 256 MB
    marker = {"format": "gguf-llama", "step": meta.get("step"), "source": src,
              "tokenizer_sha256": tok.sha256, "dtype": dtype}
    storage.write_bytes(out + MARKER_SUFFIX, json.dumps(marker, indent=2).encode() + b"\n", s3)  # complete
    storage.delete(out + PENDING_SUFFIX, s3)
    return out


def _check_s3_out(out: str, s3: S3Config | None) -> None:
    """Refuse an s3:// output that is not a new object key: a bucket alone or a key ending in
    "/" (no file name: the upload would go elsewhere), a key with an empty, "." or ".." path
    segment (the upload and the marker would not agree on its object), a finished export, or
    any object already at `out` but a failed export's (its pending marker there), which is
    removed. An object appears only once its upload is complete, so an object there is a
    whole file, someone's or an earlier export's; it is never written over, as a local output
    is not."""
    key = out[len("s3://"):].partition("/")[2]
    if not key or out.endswith("/"):
        raise ConfigError(f"{out}: a GGUF export is one file; name its object, e.g. {out.rstrip('/')}/model.gguf")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ConfigError(f"{out}: an empty, '.' or '..' path segment in the object key; name the object plainly")
    if storage.exists(out + MARKER_SUFFIX, s3):
        raise OutputExistsError(f"{out}: already holds a complete export; export to a new key")
    if storage.exists(out + PENDING_SUFFIX, s3):  # a failed export of ours: redo it
        bucket, key = storage._split_s3(out)
        with storage._errors(out, s3):  # that object only: storage.delete would empty `out/` too
            storage.boto3_client(s3).delete_object(Bucket=bucket, Key=key)
        storage.delete(out + PENDING_SUFFIX, s3)  # last: a failure before it can retry
    if storage.exists(out, s3):
        raise OutputExistsError(f"{out}: already exists; export to a new key")
