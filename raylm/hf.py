"""The mapping between raylm's decoder and Hugging Face `LlamaForCausalLM`.

raylm's `Transformer` is a Llama: the same RMSNorm, SwiGLU MLP, grouped-query attention and
RoPE in HF's "rotate half" layout. Only the parameter names differ. This module holds that
correspondence in one place, for two users:

* the HF-format export, which writes `hf_llama_config(cfg)` as `config.json` and
  `to_hf_state_dict(cfg, sd)` as the weights, so transformers, vLLM and llama.cpp's
  converter load a raylm checkpoint as an ordinary Llama;
* `tests/unit/test_hf_parity.py`, which loads those weights into transformers'
  implementation and checks that its logits and loss equal raylm's. That test is what
  shows no q/k permutation is needed (Meta's original checkpoints, which rotate
  interleaved pairs, do need one; raylm rotates halves like HF);
* `raylm pretrain --init-from-hf DIR` (init_from naming a directory with a `config.json`),
  which derives the model shape from `config.json` (`model_config_from_hf`) and reads the
  safetensors weights back into raylm's names (`read_hf_weights`). Pickle weights
  (`pytorch_model.bin`) are refused, never loaded: unpickling runs code from the file.

transformers itself is not imported here: it is a test dependency, and the export only
writes JSON and tensors.
"""

from __future__ import annotations

import json
import re

import torch

from raylm import storage
from raylm.errors import ConfigError
from raylm.config import ModelConfig, check_rope_memory

# raylm name suffix -> HF name suffix, inside `layers.{i}.` / `model.layers.{i}.`.
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",  # the SiLU-gated branch
    "feed_forward.w3.weight": "mlp.up_proj.weight",  # the linear branch
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _check_llama(cfg: ModelConfig) -> None:
    # Llama has no per-head query/key norm. Qwen3 does (same place: before RoPE), but
    # exporting under another architecture is a separate decision, not a silent fallback.
    if cfg.qk_norm:
        raise ConfigError(
            "model.qk_norm=true has no LlamaForCausalLM equivalent (Llama has no q/k norm); "
            "export with model.qk_norm=false, or as a Qwen3 model, which has q_norm/k_norm"
        )


def hf_llama_config(
    cfg: ModelConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    vocab_size: int | None = None,
) -> dict:
    """The `config.json` content under which `LlamaForCausalLM` computes what raylm does.
    `vocab_size`: the embedding rows exported (`trim_vocab`), the model's own by default."""
    _check_llama(cfg)
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size is unresolved (0): call cfg.with_vocab(tokenizer.vocab_size)")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 and most other loaders read the top-level key; transformers >= 5
        # reads `rope_parameters` (and converts the legacy key too). Write both, equal.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "vocab_size": vocab_size or cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        # Explicit, even when None: LlamaConfig otherwise assumes Llama 2's ids 1 and 2.
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


def fold_logit_scale(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """raylm state dict with muP's logit multiplier folded into the final norm's weight, for
    formats whose Llama has no such multiplier: RMSNorm(h) / m is RMSNorm with weight w / m,
    so tied and untied heads alike give raylm's logits. Unchanged (the same tensors) otherwise."""
    if cfg.width_scaling != "mup" or cfg.width_multiplier == 1:
        return sd
    return {**sd, "norm.weight": sd["norm.weight"] / cfg.width_multiplier}


_VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")  # one row per token id


def trim_vocab(sd: dict[str, torch.Tensor], vocab_size: int | None) -> dict[str, torch.Tensor]:
    """raylm state dict with the embedding and head cut to their first `vocab_size` rows (views,
    not copies), for exports: raylm pads its vocabulary to a multiple of 64 (model.vocab_size=0)
    and its own generation never samples a padding id (it slices the logits to the tokenizer's
    size), but a loader that is given the padded head would, and would normalise log-probs over
    ids the tokenizer does not have. The real ids' logits are unchanged. None: unchanged."""
    if vocab_size is None:
        return sd
    out = dict(sd)
    for name in _VOCAB_ROWS:
        if name in out:
            rows = out[name].shape[0]
            if not 0 < vocab_size <= rows:
                raise ValueError(f"vocab_size={vocab_size}: {name} has {rows} rows")
            out[name] = out[name][:vocab_size]
    return out


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor],
                     vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """raylm `state_dict()` -> `LlamaForCausalLM` names. Tensors are shared, not copied (but
    for a muP model's final norm: `fold_logit_scale`). `vocab_size`: keep only that many
    embedding and head rows (`trim_vocab`; pair it with `hf_llama_config(vocab_size=...)`)."""
    _check_llama(cfg)
    out = {}
    for name, t in trim_vocab(fold_logit_scale(cfg, sd), vocab_size).items():
        out[_rename(name, _TOP_KEYS, _LAYER_KEYS, "layers.", "model.layers.")] = t
    if cfg.tie_embeddings:
        # raylm ties in `Transformer.logits` and stores no head; HF loaders expect the key
        # (safetensors export must still dedupe it, as HF's save_pretrained does).
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def from_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`LlamaForCausalLM` names -> raylm `state_dict()` names (inverse of `to_hf_state_dict`)."""
    _check_llama(cfg)
    top = {v: k for k, v in _TOP_KEYS.items()}
    layer = {v: k for k, v in _LAYER_KEYS.items()}
    sd = dict(sd)
    if cfg.tie_embeddings:
        # A tied checkpoint may carry the embedding, the head or both (safetensors'
        # save_model de-duplicates a tied pair by keeping `lm_head.weight`, and transformers
        # loads that). raylm keeps the embedding alone: the head where it is the only copy.
        head = sd.pop("lm_head.weight", None)
        if head is not None and "model.embed_tokens.weight" not in sd:
            sd["model.embed_tokens.weight"] = head
    out = {}
    for name, t in sd.items():
        if name.endswith("rotary_emb.inv_freq"):  # RoPE frequencies that older transformers saved
            continue  # as buffers; raylm recomputes them
        try:
            out[_rename(name, top, layer, "model.layers.", "layers.")] = t
        except KeyError:
            # _rename's own words are the export's direction: here the HF tensor is the stranger.
            raise KeyError(f"{name} is not a parameter raylm's decoder has (it has no biases, no q/k norm "
                           f"and no other tensors than LlamaForCausalLM's)") from None
    return out


def _rename(name: str, top: dict, layer: dict, src_prefix: str, dst_prefix: str) -> str:
    if name in top:
        return top[name]
    if name.startswith(src_prefix):
        idx, _, rest = name[len(src_prefix):].partition(".")
        if idx.isdigit() and rest in layer:
            return f"{dst_prefix}{idx}.{layer[rest]}"
    # An unknown key means the model grew a parameter this mapping does not know: refuse,
    # rather than export a checkpoint that silently loads without it.
    raise KeyError(f"no Hugging Face Llama equivalent for parameter {name!r}")


# --------------------------------------------------------------------------- reading HF directories

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
# raylm's HF export writes it last; it lists the files of that export (raylm.export.hf).
EXPORT_MARKER = "raylm_export.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A Llama config.json is about a kilobyte; the index of a model of a thousand shards, tens of KB.
_JSON_MAX_BYTES = 16 << 20


def _json(path: str, s3=None):
    """The JSON document at `path`; one that nests past the parser's recursion limit ('[[[[...',
    thousands deep: no Llama file does) is refused in one line naming it, as malformed JSON is
    by its readers, not a RecursionError traceback. Only a regular file of at most
    _JSON_MAX_BYTES is read: a directory given to --init-from-hf may be someone else's (a
    cloned model repository), and a link there to a pipe waited for ever, one to /dev/zero
    filled memory."""
    found = storage.list_files(path, s3, pattern=False)  # a regular file, or nothing
    if not found:
        raise ConfigError(f"{path}: not a regular file (a link to a device or a pipe?); raylm reads JSON "
                          f"files only there")
    if found[0].size > _JSON_MAX_BYTES:
        raise ConfigError(f"{path}: {found[0].size:,} bytes, more than a model's JSON file holds "
                          f"({_JSON_MAX_BYTES:,} at most)")
    text = storage.read_text(path, s3)
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply to read (a damaged or altered file)") from None


def is_hf_dir(uri: str, s3=None) -> bool:
    """A Hugging Face model directory (it has `config.json`); raylm runs and checkpoints never do."""
    return storage.exists(storage.join(uri, HF_CONFIG), s3)


def read_hf_config(uri: str, s3=None) -> dict:
    """`config.json` of a Llama directory; anything raylm's decoder does not compute is refused."""
    path = storage.join(uri, HF_CONFIG)
    if not storage.exists(path, s3):
        raise ConfigError(f"{path}: not found; --init-from-hf needs a Hugging Face model directory")
    try:
        config = _json(path, s3)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    arch = config.get("architectures")
    if arch != ["LlamaForCausalLM"]:
        raise ConfigError(f"{path}: architectures={arch}; only LlamaForCausalLM weights map onto raylm's decoder")
    if config.get("model_type", "llama") != "llama":
        # transformers builds the model of model_type (Mistral's sliding window, Qwen2's biases),
        # whatever architectures says.
        raise ConfigError(f"{path}: model_type={json.dumps(config['model_type'])}; only Llama models "
                          f"(model_type=\"llama\") map onto raylm's decoder")
    quant = config.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ConfigError(f"{path}: quantization_config (quant_method={json.dumps(method)}); raylm reads "
                          f"unquantized weights only: start from the unquantized checkpoint")
    # transformers' ACT2FN maps "swish" to SiLU too (torch.nn.SiLU): the same function.
    for key, want, also in (("hidden_act", "silu", ("swish",)), ("attention_bias", False, ()),
                            ("mlp_bias", False, ())):
        value = config.get(key, want)
        if value != want and not (isinstance(value, str) and value in also):
            alias = "".join(f" (or {a!r}, the same function)" for a in also)
            raise ConfigError(f"{path}: {key}={value!r}; raylm's decoder has {key}={want!r}{alias}")
    for key in ("rope_scaling", "rope_parameters"):  # either may carry the RoPE type; both must be plain
        scaling = config.get(key)
        if scaling is None:
            continue
        if not isinstance(scaling, dict):
            raise ConfigError(f"{path}: {key}={json.dumps(scaling)}; expected an object or null")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"{path}: RoPE scaling {kind!r} ({key}); raylm's decoder has plain RoPE only")
    if config.get("head_dim") is not None:
        # Types first (one line naming the key, as model_config_from_hf does): the check
        # divides hidden_size by num_attention_heads.
        head_dim = _value(config, "head_dim", int, path)
        heads = _value(config, "num_attention_heads", int, path)
        hidden = _value(config, "hidden_size", int, path)
        if heads > 0 and head_dim != hidden // heads:
            raise ConfigError(f"{path}: head_dim={head_dim} is not hidden_size/num_attention_heads; "
                              f"raylm's decoder derives it from them")
    return config


_REQUIRED = object()


def _value(config: dict, key: str, kind: type, where: str, default=_REQUIRED, name: str = ""):
    """config[key] (`default` where absent), refused in one line naming `where` and the key
    unless it is a `kind`: int (not a bool), float (any JSON number, given as a float) or bool."""
    name = name or key
    if key not in config:
        if default is _REQUIRED:
            raise ConfigError(f"{where}: no {name!r}; a Llama config.json has it")
        return default
    value = config[key]
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok:
        expected = {int: "an integer", float: "a number", bool: "true or false"}[kind]
        raise ConfigError(f"{where}: {name}={json.dumps(value)}; expected {expected}")
    return float(value) if kind is float else value


def _rope_theta(config: dict, where: str = HF_CONFIG) -> float:
    # transformers >= 5 writes `rope_parameters`, earlier versions the top-level key. Reading,
    # transformers >= 5 takes the base from `rope_scaling` where that is given, else from
    # `rope_parameters`, and the top-level key only where neither has one; earlier versions
    # read the top-level key alone. Where two of them are given they must agree: otherwise
    # the RoPE base depends on the reader.
    found = []
    for key in ("rope_scaling", "rope_parameters"):
        params = config.get(key)
        if isinstance(params, dict) and "rope_theta" in params:
            found.append((f"{key}.rope_theta", _value(params, "rope_theta", float, where, name=f"{key}.rope_theta")))
    if not found or config.get("rope_theta") is not None:  # null beside another: absent, as transformers has it
        found.append(("rope_theta", _value(config, "rope_theta", float, where, 10000.0)))
    (key, theta), *others = found
    for other, value in others:
        if value != theta:
            raise ConfigError(f"{where}: {key}={theta:g} but {other}={value:g}; which RoPE base applies depends "
                              f"on the transformers version: make them equal")
    return theta


def model_config_from_hf(config: dict, where: str = HF_CONFIG) -> ModelConfig:
    """The raylm model shape of a Llama `config.json`. Defaults where a key is absent are
    `LlamaConfig`'s (untied head, rms_norm_eps 1e-6), which is what transformers assumes.
    A key of the wrong JSON type (a string, null) is refused, naming it."""
    heads = _value(config, "num_attention_heads", int, where)
    kv_heads = config.get("num_key_value_heads")  # null: num_attention_heads, as LlamaConfig has it
    cfg = ModelConfig(
        vocab_size=_value(config, "vocab_size", int, where), dim=_value(config, "hidden_size", int, where),
        n_layers=_value(config, "num_hidden_layers", int, where), n_heads=heads,
        n_kv_heads=heads if kv_heads is None else _value(config, "num_key_value_heads", int, where),
        ffn_dim=_value(config, "intermediate_size", int, where),
        max_seq_len=_value(config, "max_position_embeddings", int, where, 2048),
        rope_theta=_rope_theta(config, where), norm_eps=_value(config, "rms_norm_eps", float, where, 1e-6),
        tie_embeddings=_value(config, "tie_word_embeddings", bool, where, False),
    )
    try:
        cfg.validate()
    except ConfigError as e:
        # validate's words are the run's settings (model.n_kv_heads); the user edits config.json.
        msg = re.sub(r"\bmodel\.(\w+)", lambda m: _HF_NAMES.get(m.group(1), m.group(0)), str(e))
        raise ConfigError(f"{where}: {msg}") from None
    return cfg


# ModelConfig field -> the config.json key it is read from (model_config_from_hf).
_HF_NAMES = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
             "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
             "ffn_dim": "intermediate_size", "max_seq_len": "max_position_embeddings",
             "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps"}


def check_hf_shape(config: dict, model: ModelConfig, where: str = HF_CONFIG) -> None:
    """Refuse, naming the key and both values, an HF model whose weights do not fit `model`."""
    hf = model_config_from_hf(config, where)
    for hf_key, raylm_key, theirs, ours in (
        ("hidden_size", "model.dim", hf.dim, model.dim),
        ("num_hidden_layers", "model.n_layers", hf.n_layers, model.n_layers),
        ("num_attention_heads", "model.n_heads", hf.n_heads, model.n_heads),
        ("num_key_value_heads", "model.n_kv_heads", hf.kv_heads, model.kv_heads),
        ("vocab_size", "model.vocab_size", hf.vocab_size, model.vocab_size),
        ("intermediate_size", "model.ffn_dim", hf.hidden_dim, model.hidden_dim),
        ("rope_theta", "model.rope_theta", hf.rope_theta, model.rope_theta),
        ("tie_word_embeddings", "model.tie_embeddings", hf.tie_embeddings, model.tie_embeddings),
        ("rms_norm_eps", "model.norm_eps", hf.norm_eps, model.norm_eps),
    ):
        if theirs != ours:
            raise ConfigError(f"{where}: {hf_key}={theirs} but this run has {raylm_key}={ours}; "
                              f"drop the model.* setting to take the checkpoint's shape")
    if model.qk_norm != hf.qk_norm:
        # Llama has no per-head q/k norm: its weights are not there, and the run would compute
        # another function of the checkpoint's weights (see _check_llama).
        raise ConfigError(f"{where}: a LlamaForCausalLM checkpoint has no q/k norm but this run has "
                          f"model.qk_norm=true; drop model.qk_norm to start from its weights")
    if model.width_scaling == "mup" and model.width_multiplier != 1:
        # muP divides the logits by the width multiplier: another function of the same weights.
        # ("sqrt" scales learning rates only, and muP at multiplier 1 is the standard model.)
        raise ConfigError(f"{where}: this run has model.width_scaling=mup with model.base_dim={model.base_dim}, "
                          f"which divides the logits by {model.width_multiplier:g}; Llama weights have no such "
                          f"step: drop model.width_scaling=mup or model.base_dim")


def _export_files(uri: str, s3=None) -> set[str] | None:
    """The files a raylm export wrote, as its marker lists them; None where there is no such
    list (not a raylm export, or one from before markers listed their files)."""
    marker = storage.join(uri, EXPORT_MARKER)
    if not storage.exists(marker, s3):
        return None
    try:
        files = _json(marker, s3).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ConfigError(f"{marker}: not a raylm export marker ({e})") from None
    if files is not None and not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        raise ConfigError(f"{marker}: 'files' is not a list of file names")
    return None if files is None else set(files)


def hf_weight_files(uri: str, s3=None) -> list[str]:
    """The safetensors files of an HF directory: `model.safetensors`, or the shards its index
    names. A raylm export's own are the ones its marker lists (a file beside them is not its
    weights); a directory holding both, without that list, is refused: which is current is
    unknown (transformers would take the one file, raylm once took the index). A directory
    with pickle weights only is refused."""
    index, single = storage.join(uri, HF_INDEX), storage.join(uri, HF_WEIGHTS)
    listed = _export_files(uri, s3)
    has_index, has_single = ((listed is None or name in listed) and storage.exists(storage.join(uri, name), s3)
                             for name in (HF_INDEX, HF_WEIGHTS))
    if has_index and has_single:
        raise ConfigError(f"{uri}: holds both {HF_WEIGHTS} and {HF_INDEX}, which may be different weights; "
                          f"remove the stale one")
    if has_index:
        try:
            names = set(_json(index, s3)["weight_map"].values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{index}: not a safetensors index (no weight_map: {e})") from None
        for name in names:
            # Names only: an index must not point outside its directory.
            if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors"):
                raise ConfigError(f"{index}: weight file {name!r} is not a .safetensors file in the directory")
        if not names:
            raise ConfigError(f"{index}: weight_map is empty; it names no weight files")
        files = [storage.join(uri, n) for n in sorted(names)]  # sorted once all are names
        for file in files:
            # Checked here, before any cluster work: a download that stopped part way leaves
            # the index and some of its shards.
            if not storage.exists(file, s3):
                raise ConfigError(f"{file}: not found, though {HF_INDEX} names it; the download is incomplete")
        return files
    if has_single:
        return [single]
    pickles = [f.uri for f in storage.list_files(uri, s3) if f.uri.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise ConfigError(f"{pickles[0]}: pickle weights are not read (loading them runs code from the file); "
                          f"convert to safetensors, e.g. save_pretrained(dir, safe_serialization=True)")
    raise ConfigError(f"{uri}: no {HF_WEIGHTS} or {HF_INDEX}")


def _read_safetensors(uri: str, s3) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        if storage.is_s3(uri):
            return load(storage.read_bytes(uri, s3))  # the file's bytes and its tensors: twice a shard at peak
        return load_file(uri)
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{uri}: not a readable safetensors file ({e})") from None


# safetensors' dtype names (the header's); another reads as float32 here, and the read itself
# (`_read_safetensors`) has the real dtype.
_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                  "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
                  "BOOL": torch.bool}


def _read_header(uri: str, s3=None) -> dict[str, torch.Tensor]:
    """The tensors of a local safetensors file as meta tensors of their shapes and dtypes: its
    header alone is read (and checked, as reading the file checks it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(uri, "pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return {name: torch.empty(sl.get_shape(), dtype=_HEADER_DTYPES.get(sl.get_dtype(), torch.float32),
                                      device="meta") for name, sl in slices.items()}
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{uri}: not a readable safetensors file ({e})") from None


def read_hf_weights(uri: str, model: ModelConfig, s3=None, _read=_read_safetensors) -> dict[str, torch.Tensor]:
    """raylm's full state dict (fp32) from the HF Llama directory `uri`, whose `config.json`
    must describe `model` (`check_hf_shape`). Every parameter must be there, each with its
    shape; a tensor raylm has no place for is refused, not dropped. A tied model's embedding
    may come as `lm_head.weight` alone (in any shard), as safetensors' save_model leaves it;
    where it has both, they must be equal (transformers >= 5 keeps a pair that differs apart,
    an untied model). A tensor in two files, or one not of floating point, is refused."""
    from raylm.model import Transformer

    check_hf_shape(read_hf_config(uri, s3), model, storage.join(uri, HF_CONFIG))
    files = hf_weight_files(uri, s3)
    check_weights_hold(uri, files, model, s3)  # before the model is built, even on meta
    with torch.device("meta"):
        want = Transformer(model).state_dict()
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}  # HF tensor name -> the file that holds it
    head: tuple[str, torch.Tensor] | None = None  # a tied checkpoint's lm_head.weight, and its file
    for file in files:
        part = _read(file, s3)
        for name, t in part.items():
            if name in seen:  # the later copy would replace the earlier, unseen
                raise ConfigError(f"{file}: holds {name}, which {seen[name]} holds too; which copy is the "
                                  f"model is unknown")
            seen[name] = file
            if not t.is_floating_point():  # a cast to fp32 would take quantized codes for weights
                raise ConfigError(f"{file}: {name} is {str(t.dtype).removeprefix('torch.')}; raylm reads "
                                  f"floating-point weights only")
        if model.tie_embeddings and "lm_head.weight" in part:
            # The embedding's only copy where no shard has model.embed_tokens.weight (see
            # from_hf_state_dict), which is known after the last shard.
            head = (file, part.pop("lm_head.weight"))
        try:
            mapped = from_hf_state_dict(model, part)
        except KeyError as e:
            raise ConfigError(f"{file}: {e.args[0]}") from None
        for name, t in mapped.items():
            _check_shape(file, name, t, want)
            out[name] = t.to(torch.float32)
        del part, mapped
        if head is not None and "tok_embeddings.weight" in out:
            _check_tied_head(*head, out["tok_embeddings.weight"], want)
            head = None
    if head is not None:
        file, t = head
        _check_shape(file, "tok_embeddings.weight (from lm_head.weight: tied, and no model.embed_tokens.weight)",
                     t, want, "tok_embeddings.weight")
        out["tok_embeddings.weight"] = t.to(torch.float32)
    missing = [k for k in want if k not in out]
    if "output.weight" in missing:
        # Most often a tied checkpoint (saved with the embedding alone) under a config.json that
        # says untied: transformers would start such a head at random.
        raise ConfigError(f"{uri}: no lm_head.weight, but {HF_CONFIG} has tie_word_embeddings false or absent (a "
                          f"head of its own); set tie_word_embeddings to true in {HF_CONFIG} if the embedding is "
                          f"the head")
    if missing:
        raise ConfigError(f"{uri}: no weight for {missing[0]} ({len(missing)} missing)")
    return out


def check_weights_hold(uri: str, files: list[str], model: ModelConfig, s3=None) -> None:
    """Refuse, in one line naming config.json, a model larger than its weight files could hold
    at half a byte a parameter (less than any floating-point dtype takes): a config.json
    claiming 10^9 layers or a width of 2^40 (altered, or beside the wrong weights) is refused
    from the files' sizes, where building its model, even on meta, took hours or failed with
    a traceback from torch, and training allocated it."""
    from raylm.model import count_params

    need = count_params(model)
    have = 0
    for file in files:
        found = storage.list_files(file, s3, pattern=False)  # a regular file, or nothing
        if not found:  # opening a pipe waits for a writer for ever, in C code no signal stops
            raise ConfigError(f"{file}: not a regular file (a link to a device or a pipe?); raylm reads "
                              f"safetensors files only there")
        have += sum(f.size for f in found)
    if need > 2 * have:
        raise ConfigError(f"{storage.join(uri, HF_CONFIG)}: describes a model of {need:,} parameters (hidden_size="
                          f"{model.dim}, num_hidden_layers={model.n_layers}, vocab_size={model.vocab_size}, "
                          f"intermediate_size={model.hidden_dim}), more than its weight files' {have:,} bytes "
                          f"hold; the weights and {HF_CONFIG} disagree")


def _check_tied_head(file: str, head: torch.Tensor, embedding: torch.Tensor, want: dict) -> None:
    """A tied checkpoint that carries both matrices: raylm has one, so they must be equal."""
    _check_shape(file, "lm_head.weight (tied to model.embed_tokens.weight)", head, want, "tok_embeddings.weight")
    if not head.is_meta and not torch.equal(head.to(torch.float32), embedding):
        raise ConfigError(f"{file}: lm_head.weight differs from model.embed_tokens.weight, but {HF_CONFIG} has "
                          f"tie_word_embeddings=true (one matrix for both; transformers keeps such a pair apart): "
                          f"set tie_word_embeddings to false in {HF_CONFIG} to start from both")


def _check_shape(file: str, name: str, t: torch.Tensor, want: dict, key: str = "") -> None:
    if (key or name) not in want:  # e.g. a layer past config.json's num_hidden_layers
        raise ConfigError(f"{file}: holds {name}, which the model that {HF_CONFIG} describes has no place for; "
                          f"the weights and {HF_CONFIG} disagree")
    need = tuple(want[key or name].shape)
    if tuple(t.shape) != need:
        raise ConfigError(f"{file}: {name} has shape {tuple(t.shape)}, the model needs {need}")


def init_from_hf_settings(uri: str, s3=None) -> dict:
    """Config settings (a mapping beneath the user's file and overrides) that start a run from
    the HF Llama directory `uri`: init_from, and the model shape its config.json describes."""
    import dataclasses

    model = model_config_from_hf(read_hf_config(uri, s3), storage.join(uri, HF_CONFIG))
    return {"init_from": uri, "model": dataclasses.asdict(model)}


def check_init_from_hf(cfg) -> None:
    """Before any cluster work: the run's model is the directory's shape, and the tokenizer is
    given (one trained now would number its pieces differently from the weights' rows), and
    the weights are safetensors. In a local directory, their headers hold every parameter
    and nothing else, each of its shape (what `read_hf_weights` checks again, reading them)."""
    where = storage.join(cfg.init_from, HF_CONFIG)
    check_hf_shape(read_hf_config(cfg.init_from, cfg.s3), cfg.model, where)
    if storage.is_s3(cfg.init_from):
        # A header there is a request per shard: checked when read. The sizes come with a listing.
        check_weights_hold(cfg.init_from, hf_weight_files(cfg.init_from, cfg.s3), cfg.model, cfg.s3)
    else:
        read_hf_weights(cfg.init_from, cfg.model, cfg.s3, _read=_read_header)
    # RoPE tables: fp32 cos and sin for every position, which no weight file backs. Training
    # allocated them on every worker: max_position_embeddings=10^15 was the allocator's traceback.
    check_rope_memory(cfg.model, where, key="max_position_embeddings")
    if not cfg.tokenizer.path:
        raise ConfigError(f"--init-from-hf {cfg.init_from}: set tokenizer.path=DIR, the raylm tokenizer these "
                          f"weights were trained with (vocab {cfg.model.vocab_size})")
    check_export_tokenizer(cfg.init_from, cfg.tokenizer.path, cfg.s3)


def check_export_tokenizer(uri: str, tokenizer: str, s3=None) -> None:
    """A raylm export's marker names the tokenizer its weights were trained with: another one of
    the same size numbers its pieces differently, and the run would train on, silently, from
    rows that mean other tokens."""
    marker = storage.join(uri, EXPORT_MARKER)
    if not storage.exists(marker, s3):
        return
    try:
        want = _json(marker, s3).get("tokenizer_sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ConfigError(f"{marker}: not a raylm export marker ({e})") from None
    if not isinstance(want, str):
        return
    from raylm.tokenizer import Tokenizer

    have = Tokenizer.load(tokenizer, s3).sha256
    if have != want:
        raise ConfigError(f"tokenizer.path={tokenizer}: tokenizer sha256 {have[:12]}..., but {marker} says its "
                          f"weights were trained with {want[:12]}...; give the tokenizer of the run it was "
                          f"exported from")
