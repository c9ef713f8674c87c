"""The decoder's math at the shapes the config allows beyond the usual ones: query heads per
KV head of 1, 3 and all of them (MQA), head dims of 2 and 6, QK-norm and muP's logit scale.
Every way of decoding into a KV cache (token by token or in uneven chunks, with an int
position or a tensor one) gives the full forward's logits at every position; and a bf16
model keeps its RoPE tables and its loss in fp32."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from raylm.config import ModelConfig
from raylm.model import apply_rope, attend, build_model, rope_tables

VOCAB, B, T = 50, 3, 19

SHAPES = {  # name: (n_heads, n_kv_heads, dim, extra)
    "gqa-3-per-kv": (6, 2, 36, {}),
    "mqa-qk-norm": (6, 1, 36, {"qk_norm": True}),
    "mha-head-dim-2": (4, 4, 8, {}),
    "gqa-mup": (4, 2, 40, {"width_scaling": "mup", "base_dim": 20}),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _model(name: str):
    heads, kv, dim, extra = SHAPES[name]
    cfg = ModelConfig(vocab_size=VOCAB, dim=dim, n_layers=2, n_heads=heads, n_kv_heads=kv, max_seq_len=24,
                      tie_embeddings=False, init_std=0.2, **extra)  # larger weights: attention is not uniform
    return build_model(cfg, seed=0).eval()


def _tokens(seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _decode(model, tokens, chunks, tensor_start: bool):
    caches, out, s = model.make_caches(B), [], 0
    for n in chunks:
        start = torch.tensor(s) if tensor_start else s
        out.append(model(tokens[:, s:s + n], caches=caches, start=start)[0])
        s += n
    assert s == tokens.shape[1]
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("tensor_start", [False, True], ids=["int-start", "tensor-start"])
@pytest.mark.parametrize("chunks", [(1,) * T, (5, 7, 7), (4, 1, 6, 8)], ids=["token-by-token", "chunks-a", "chunks-b"])
def test_kv_cache_decoding_equals_the_full_forward_at_every_position(name, tensor_start, chunks):
    model = _model(name)
    tokens = _tokens()
    with torch.no_grad():
        full, _ = model(tokens)
        got = _decode(model, tokens, chunks, tensor_start)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", SHAPES)
def test_attention_equals_explicit_softmax_with_repeated_kv_heads(name):
    """`attend` (SDPA, GQA folded into the query length when masked) against attention
    written out: K/V heads repeated, scores / sqrt(d), masked, fp32 softmax."""
    heads, kv, dim, _ = SHAPES[name]
    d = dim // heads
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, h, 7, d, generator=g) for h in (heads, kv, kv))
    mask = torch.rand(2, 1, 7, 7, generator=g) < 0.6
    mask |= torch.eye(7, dtype=torch.bool)  # every query sees at least itself
    kr, vr = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
    scores = (q @ kr.transpose(-1, -2)) / math.sqrt(d)
    want = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vr
    torch.testing.assert_close(attend(q, k, v, mask, False), want, rtol=1e-5, atol=1e-5)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    want = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vr
    torch.testing.assert_close(attend(q, k, v, None, True), want, rtol=1e-5, atol=1e-5)


def test_rope_is_the_complex_rotation_of_the_half_split_pairs():
    """HF Llama's layout: pair i is (x[i], x[i + d/2]), turned by position * theta^(-2i/d)."""
    d, n, theta = 6, 9, 10000.0
    x = torch.randn(1, 2, n, d, generator=torch.Generator().manual_seed(3))
    cos, sin = rope_tables(d, n, theta)
    got = apply_rope(x, cos, sin)
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freqs
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], -1).float(), rtol=1e-5, atol=1e-5)


def test_a_bf16_model_keeps_rope_tables_and_loss_in_fp32():
    model = _model("gqa-3-per-kv").to(torch.bfloat16)
    model.init_buffers()  # what every bf16 loader does after the cast
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    tokens = _tokens()
    with torch.no_grad():
        logits, loss = model(tokens, tokens)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()))
        got = _decode(model, tokens, (5, 7, 7), tensor_start=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), logits.float(), rtol=0.05, atol=0.05)


def test_rms_norm_of_bf16_input_is_computed_in_fp32():
    """Normalising in bf16 would round the sum of squares; the fp32 result, then rounded once."""
    from raylm.model import RMSNorm

    norm = RMSNorm(64, 1e-5)
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(4)) * 30).bfloat16()
    want = (x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(norm(x), want)


def test_heads_config_limits():
    """The shapes above are all ones the config accepts; an odd head dim is refused."""
    from raylm.errors import ConfigError

    for heads, kv, dim, extra in SHAPES.values():
        ModelConfig(vocab_size=VOCAB, dim=dim, n_heads=heads, n_kv_heads=kv, **extra).validate()
    with pytest.raises(ConfigError, match="even"):
        replace(ModelConfig(vocab_size=VOCAB), dim=30, n_heads=6).validate()
