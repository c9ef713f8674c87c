"""raylm's decoder computes what transformers' LlamaForCausalLM computes, under raylm.hf's mapping.

This is the proof behind the HF export: load `to_hf_state_dict` into transformers' own Llama
and compare logits and loss in fp32 with tight tolerances, for plain multi-head attention
with tied embeddings, GQA with an untied head, and non-default RoPE base / MLP width / eps.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from raylm.config import ModelConfig  # noqa: E402
from raylm.hf import from_hf_state_dict, hf_llama_config, to_hf_state_dict  # noqa: E402
from raylm.model import build_model  # noqa: E402
from tests.weights import redraw_at_unit_scale  # noqa: E402

TINY = dict(dim=64, n_layers=2, vocab_size=128, max_seq_len=64, n_heads=4)
CONFIGS = {
    "mha-tied": ModelConfig(**TINY, tie_embeddings=True),
    "gqa-untied": ModelConfig(**TINY, n_kv_heads=2, tie_embeddings=False),
    "mqa-theta-ffn": ModelConfig(
        **TINY, n_kv_heads=1, rope_theta=500000.0, ffn_dim=96, norm_eps=1e-6, tie_embeddings=False
    ),
}
B, T = 2, 32
TOL = dict(atol=1e-5, rtol=1e-4)


def _raylm(cfg: ModelConfig):
    model = build_model(cfg, seed=0).eval()
    # raylm's init (std 0.02, norms at 1) makes attention nearly uniform and every norm weight
    # equal, so a RoPE or norm mix-up would hide below the tolerance. Redraw at unit scale:
    # matrices ~ N(0, 1/fan_in) give O(1) attention scores, norms get distinct weights.
    return redraw_at_unit_scale(model, seed=1)


def _hf(cfg: ModelConfig, sd: dict, attn: str):
    config = transformers.LlamaConfig(**hf_llama_config(cfg), attn_implementation=attn)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.load_state_dict(sd, strict=True)  # strict: the key sets must match exactly
    return model


def _tokens(cfg: ModelConfig, seed: int = 0):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_loss_match_llama(name, attn):
    cfg = CONFIGS[name]
    model = _raylm(cfg)
    hf = _hf(cfg, to_hf_state_dict(cfg, model.state_dict()), attn)
    tokens = _tokens(cfg)
    # HF shifts labels inside its loss; raylm takes targets already aligned with the inputs.
    # Mask some labels (-100, as SFT masks prompts) so ignore_index handling is compared too.
    labels = tokens.clone()
    labels[0, :5] = -100
    targets = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], dim=1)
    with torch.no_grad():
        logits, loss = model(tokens, targets)
        out = hf(input_ids=tokens, labels=labels)
    assert logits.abs().max() > 1  # the comparison is not of near-zero numbers
    torch.testing.assert_close(logits, out.logits, **TOL)
    torch.testing.assert_close(loss, out.loss, **TOL)


def test_rope_layout_is_hf_without_permutation():
    """Meta-format checkpoints permute wq/wk rows to turn interleaved pairs into HF's halves.
    raylm already rotates halves, so applying that permutation must break parity: this shows
    the logits test is sensitive to the layout and that no permutation belongs in the mapping."""
    cfg = CONFIGS["gqa-untied"]
    model = _raylm(cfg)
    sd = to_hf_state_dict(cfg, model.state_dict())
    hd = cfg.head_dim

    def permute(w):  # transformers' convert_llama_weights_to_hf.permute
        return w.view(-1, hd // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    sd = {k: permute(v) if k.endswith(("q_proj.weight", "k_proj.weight")) else v for k, v in sd.items()}
    hf = _hf(cfg, sd, "eager")
    tokens = _tokens(cfg)
    with torch.no_grad():
        diff = (model(tokens)[0] - hf(input_ids=tokens).logits).abs().max()
    assert diff > 1e-2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip(name):
    cfg = CONFIGS[name]
    sd = build_model(cfg, seed=0).state_dict()
    hf_sd = to_hf_state_dict(cfg, sd)
    if cfg.tie_embeddings:
        assert hf_sd["lm_head.weight"] is hf_sd["model.embed_tokens.weight"]
    back = from_hf_state_dict(cfg, hf_sd)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_config_is_read_as_written():
    cfg = CONFIGS["mqa-theta-ffn"]
    c = transformers.LlamaConfig(**hf_llama_config(cfg, bos_token_id=3, eos_token_id=4))
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 96, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 1, 16)
    assert c.rms_norm_eps == 1e-6 and c.max_position_embeddings == 64 and c.vocab_size == 128
    theta = c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta
    assert theta == 500000.0
    assert (c.bos_token_id, c.eos_token_id) == (3, 4)


def test_qk_norm_is_refused():
    cfg = dataclasses.replace(CONFIGS["mha-tied"], qk_norm=True)
    with pytest.raises(ValueError, match="model.qk_norm"):
        hf_llama_config(cfg)
    with pytest.raises(ValueError, match="model.qk_norm"):
        to_hf_state_dict(cfg, build_model(cfg, seed=0).state_dict())
