"""The Llama-style decoder: shapes, loss, causality, GQA, RoPE, KV cache, init, parameter counts."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from raylm.config import ModelConfig
from raylm.model import Transformer, apply_rope, build_model, count_params, rope_tables

VOCAB = 128
CFG = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                  ffn_multiple_of=16)


def _tokens(B=2, T=16, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0).eval()


# --------------------------------------------------------------------------- forward


def test_output_shapes(model):
    tokens = _tokens(3, 10)
    logits, loss = model(tokens)
    assert logits.shape == (3, 10, VOCAB) and loss is None
    assert model.hidden_states(tokens).shape == (3, 10, CFG.dim)


def test_loss_is_cross_entropy(model):
    tokens, targets = _tokens(2, 12, seed=1), _tokens(2, 12, seed=2)
    targets[0, :3] = -100  # ignored positions (SFT prompt masking)
    logits, loss = model(tokens, targets)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    # At init the loss is near log(vocab): logits are small.
    assert abs(loss.item() - math.log(VOCAB)) < 0.5


@pytest.mark.parametrize("t,k", [(0, 1), (5, 1), (5, 7), (14, 1)])
def test_causality(model, t, k):
    a = _tokens(1, 16, seed=3)
    b = a.clone()
    b[0, t + k] = (a[0, t + k] + 1) % VOCAB
    la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[:, : t + k], lb[:, : t + k], rtol=0, atol=1e-6)
    assert not torch.allclose(la[:, t + k], lb[:, t + k])  # the changed position itself does change


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = build_model(CFG, seed=1).eval()
    assert CFG.kv_heads < CFG.n_heads
    mha_cfg = replace(CFG, n_kv_heads=None)
    mha = build_model(mha_cfg, seed=2).eval()
    group, hd = CFG.n_heads // CFG.kv_heads, CFG.head_dim
    state = {}
    for name, w in gqa.state_dict().items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # kv head j serves query heads j*group .. (j+1)*group - 1
            w = w.view(CFG.kv_heads, hd, CFG.dim).repeat_interleave(group, dim=0).reshape(-1, CFG.dim)
        state[name] = w
    mha.load_state_dict(state)
    tokens = _tokens(2, 16, seed=4)
    torch.testing.assert_close(gqa(tokens)[0], mha(tokens)[0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- RoPE


def test_rope_preserves_norm():
    cos, sin = rope_tables(16, 64, 10000.0)
    x = torch.randn(2, 3, 64, 16, generator=torch.Generator().manual_seed(0))
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])  # it does rotate


def test_rope_at_position_zero_is_identity():
    cos, sin = rope_tables(16, 8, 10000.0)
    x = torch.randn(1, 2, 1, 16)
    torch.testing.assert_close(apply_rope(x, cos[:1], sin[:1]), x)


@pytest.mark.parametrize("m,n,shift", [(3, 1, 5), (10, 10, 20), (0, 7, 33), (40, 2, 17)])
def test_rope_scores_depend_only_on_relative_position(m, n, shift):
    cos, sin = rope_tables(16, 128, 10000.0)
    g = torch.Generator().manual_seed(m * 100 + n)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(pq, pk):
        rq = apply_rope(q, cos[pq:pq + 1], sin[pq:pq + 1])
        rk = apply_rope(k, cos[pk:pk + 1], sin[pk:pk + 1])
        return (rq * rk).sum()

    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=1e-4, atol=1e-5)
    if m != n:  # but they do depend on the relative position
        assert not torch.allclose(score(m, n), score(m, m), atol=1e-4)


def test_rope_tables_shape():
    cos, sin = rope_tables(8, 10, 10000.0)
    assert cos.shape == sin.shape == (10, 4)
    torch.testing.assert_close(cos[0], torch.ones(4))
    torch.testing.assert_close(sin[0], torch.zeros(4))


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("qk_norm", [False, True])
def test_kv_cache_token_by_token_matches_full_forward(qk_norm):
    model = build_model(replace(CFG, qk_norm=qk_norm), seed=5).eval()
    tokens = _tokens(2, 12, seed=6)
    with torch.no_grad():
        full, _ = model(tokens)
        caches = model.make_caches(2)
        prefill, _ = model(tokens[:, :5], caches=caches, start=0)
        steps = [model(tokens[:, t:t + 1], caches=caches, start=t)[0] for t in range(5, 12)]
    got = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_multi_token_chunk_after_prefill():
    model = build_model(CFG, seed=7).eval()
    tokens = _tokens(2, 14, seed=8)
    with torch.no_grad():
        full, _ = model(tokens)
        caches = model.make_caches(2, max_len=16)
        a, _ = model(tokens[:, :4], caches=caches, start=0)
        b, _ = model(tokens[:, 4:9], caches=caches, start=4)  # chunk of 5 at start > 0
        c, _ = model(tokens[:, 9:10], caches=caches, start=9)
        d, _ = model(tokens[:, 10:14], caches=caches, start=10)
    torch.testing.assert_close(torch.cat([a, b, c, d], dim=1), full, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- parameters / init


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_param_count_matches_count_params(tie, qk_norm):
    cfg = replace(CFG, tie_embeddings=tie, qk_norm=qk_norm)
    model = build_model(cfg, seed=0)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_params(cfg)
    emb = cfg.vocab_size * cfg.dim
    assert count_params(cfg, non_embedding=True) == n - emb - (0 if tie else emb)


def test_untied_has_one_more_vocab_by_dim_matrix():
    tied = build_model(CFG, seed=0)
    untied = build_model(replace(CFG, tie_embeddings=False), seed=0)
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == VOCAB * CFG.dim
    assert tied.output is None and untied.output is not None
    # A tied head really is the embedding matrix.
    h = torch.randn(1, 2, CFG.dim)
    torch.testing.assert_close(tied.logits(h), h @ tied.tok_embeddings.weight.T)


def test_build_model_deterministic_per_seed():
    a, b, c = build_model(CFG, seed=11), build_model(CFG, seed=11), build_model(CFG, seed=12)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["tok_embeddings.weight"], sc["tok_embeddings.weight"])
    assert not torch.equal(sa["layers.0.attention.wq.weight"], sc["layers.0.attention.wq.weight"])


def test_init_scheme():
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=16, tie_embeddings=False)
    model = build_model(cfg, seed=0)
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for layer in model.layers:
        for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                    layer.feed_forward.w1, layer.feed_forward.w3):
            assert lin.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
        for lin in (layer.attention.wo, layer.feed_forward.w2):
            assert lin.weight.std().item() == pytest.approx(out_std, rel=0.1)
        assert layer.attention.wo.weight.std() < 0.75 * layer.attention.wq.weight.std()
        assert torch.equal(layer.attention_norm.weight, torch.ones(cfg.dim))
        assert torch.equal(layer.ffn_norm.weight, torch.ones(cfg.dim))
    assert model.tok_embeddings.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert model.output.weight.std().item() == pytest.approx(cfg.dim ** -0.5, rel=0.1)
    torch.testing.assert_close(model.rope_cos, rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)[0])


def test_qk_norm_path_is_used():
    cfg = replace(CFG, qk_norm=True)
    model = build_model(cfg, seed=3).eval()
    assert model.layers[0].attention.q_norm is not None
    tokens = _tokens(2, 8, seed=9)
    logits, loss = model(tokens, tokens)
    assert logits.shape == (2, 8, VOCAB) and torch.isfinite(loss)
    loss.backward()
    assert model.layers[0].attention.q_norm.weight.grad is not None
    # Same weights without the norms give different logits: the norms really are applied.
    plain = build_model(CFG, seed=0).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "_norm.weight" not in k
                           or "attention_norm" in k or "ffn_norm" in k})
    assert not torch.allclose(plain(tokens)[0], logits.detach(), atol=1e-4)


def test_sequence_longer_than_max_seq_len_raises(model):
    model(_tokens(1, CFG.max_seq_len))  # exactly max is fine
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(1, CFG.max_seq_len + 1))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_tokens(1, 4), caches=model.make_caches(1), start=CFG.max_seq_len - 2)


def test_unresolved_vocab_raises_clear_error():
    with pytest.raises(ValueError, match="vocab_size.*with_vocab"):
        Transformer(replace(CFG, vocab_size=0))
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(replace(CFG, vocab_size=0))


def test_invalid_shape_rejected_at_construction():
    with pytest.raises(ValueError, match="n_heads"):
        Transformer(replace(CFG, n_heads=3, n_kv_heads=None))
