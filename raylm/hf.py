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
  interleaved pairs, do need one; raylm rotates halves like HF).

transformers itself is not imported here: it is a test dependency, and the export only
writes JSON and tensors.
"""

from __future__ import annotations

import torch

from raylm.config import ModelConfig

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
        raise ValueError(
            "model.qk_norm=true has no LlamaForCausalLM equivalent (Llama has no q/k norm); "
            "export with model.qk_norm=false, or as a Qwen3 model, which has q_norm/k_norm"
        )


def hf_llama_config(
    cfg: ModelConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """The `config.json` content under which `LlamaForCausalLM` computes what raylm does."""
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
        "vocab_size": cfg.vocab_size,
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


def to_hf_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """raylm `state_dict()` -> `LlamaForCausalLM` names. Tensors are shared, not copied."""
    _check_llama(cfg)
    out = {}
    for name, t in sd.items():
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
        # A tied checkpoint may or may not carry the head; raylm has nowhere to put it.
        sd.pop("lm_head.weight", None)
    return {
        _rename(name, top, layer, "model.layers.", "layers."): t
        for name, t in sd.items()
        # RoPE frequencies that older transformers saved as buffers; raylm recomputes them.
        if not name.endswith("rotary_emb.inv_freq")
    }


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
