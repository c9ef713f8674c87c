"""A Llama-style decoder as single-device math.

Token embedding -> N x [RMSNorm -> GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head.

Nothing here knows about Ray, process groups or sharding: `raylm.parallel` wraps this
module from the outside. Build it on the meta device, move it with `to_empty`, then call
`init_weights()`, which is the single place where parameters and RoPE tables get values:

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()

Init scheme: embeddings and every input projection ~ N(0, init_std); the two projections
that write into the residual stream (attention `wo`, MLP `w2`) ~ N(0, init_std / sqrt(2 L)),
as in GPT-2, so the residual's variance does not grow with depth; norms start at 1. An
untied LM head uses N(0, 1/sqrt(dim)) so initial logits have unit scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raylm.config import ModelConfig


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim // 2), in fp32 for accuracy at long range."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x: (B, H, T, D) by position (HF Llama layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose the small components.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class KVCache(nn.Module):
    """Preallocated keys/values for incremental decoding, one per layer.

    Two ways to write into it; `Attention` picks by the type of the position it is given:
      update(start: int)       returns the keys/values up to the last written position, a
                               slice whose length grows with the position: right for a
                               prefill of any length (causal attention, flash kernels).
      write(positions: tensor) scatters in place at a (T,) long tensor of positions on the
                               device and returns the whole buffer: every decode step has
                               the same shapes and no Python value that changes, which is
                               what torch.compile captures once and CUDA graphs replay.
                               `visible` masks the slots after each query's position, which
                               hold zeros or stale keys from an earlier sequence.
    """

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)
        # Fixed addresses: CUDA graphs may then update the buffers in place instead of
        # copying them in and out of the graph on every replay.
        for t in (self.k, self.v, self.slots):
            torch._dynamo.mark_static_address(t)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static-shape update: k/v (B, H, T, D) go to `positions` (T,); the full buffers return."""
        self.k.index_copy_(2, positions, k.to(self.k.dtype))
        self.v.index_copy_(2, positions, v.to(self.v.dtype))
        return self.k, self.v

    def visible(self, positions: torch.Tensor) -> torch.Tensor:
        """(T, max_len) boolean mask: query at position p sees slots 0..p and nothing later."""
        return self.slots[None, :] <= positions[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, cos, sin, cache: KVCache | None = None, start: int | torch.Tensor = 0):
        """`start`: the first query's position (int), or every query's position as a (T,)
        long tensor for fixed-shape decoding into `cache` (see KVCache)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if cache is not None and isinstance(start, torch.Tensor):  # static shapes (see KVCache)
            mask, causal = cache.visible(start), False
            k, v = cache.write(start, k, v)
        elif cache is not None:
            k, v = cache.update(start, k, v)
            if start > 0:  # queries at start..start+T-1 see every key up to their own position
                causal = False
                if T > 1:
                    pos_q = torch.arange(start, start + T, device=x.device)[:, None]
                    mask = torch.arange(k.shape[2], device=x.device)[None, :] <= pos_q
        # GQA without materialising repeated K/V: SDPA broadcasts kv heads over query groups.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None,
            enable_gqa=self.kv_heads != self.n_heads,
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, cache: KVCache | None = None, start: int | torch.Tensor = 0):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, start)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size is unresolved (0): call cfg.with_vocab(tokenizer.vocab_size)")
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # A tied head reuses the embedding matrix in `logits` rather than sharing a Parameter
        # object: `to_empty` and sharding replace parameters one module at a time, which would
        # silently untie a shared one.
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Give every parameter and buffer its initial value (see the module docstring).

        Draws from the global RNG, so callers seed it; that also works on sharded (DTensor)
        parameters, where each rank draws its own shard consistently."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=cfg.init_std)
        for layer in self.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                        layer.feed_forward.w1, layer.feed_forward.w3):
                nn.init.normal_(lin.weight, std=cfg.init_std)
            for lin in (layer.attention.wo, layer.feed_forward.w2):
                nn.init.normal_(lin.weight, std=out_std)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()
        if not cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=cfg.dim ** -0.5)

    def hidden_states(self, tokens: torch.Tensor, caches: list[KVCache] | None = None,
                      start: int | torch.Tensor = 0):
        T = tokens.shape[1]
        if isinstance(start, torch.Tensor):
            # Static decoding: the first position as a 0-d long tensor on the device, so a
            # compiled step is one graph for every position. Nothing here reads its value
            # (that would sync with the device), so the caller checks the length limit.
            if caches is None:
                raise ValueError("a tensor `start` is for decoding into KV caches; pass caches=")
            start = start.reshape(()) + torch.arange(T, device=tokens.device)
            cos, sin = self.rope_cos[start], self.rope_sin[start]
        else:
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, caches[i] if caches is not None else None, start)
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, start: int | torch.Tensor = 0):
        """Logits (B, T, vocab), and the mean next-token loss when `targets` is given.

        Targets equal to -100 are ignored, which is how SFT masks prompt tokens. With
        `caches`, `tokens` continue the cached sequence at position `start`: an int, or a
        0-d long tensor for fixed-shape decoding (see KVCache)."""
        logits = self.logits(self.hidden_states(tokens, caches, start))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def make_caches(self, batch: int, max_len: int | None = None, dtype=None) -> list[KVCache]:
        cfg, w = self.cfg, self.tok_embeddings.weight
        return [KVCache(batch, cfg.kv_heads, max_len or cfg.max_seq_len, cfg.head_dim, dtype or w.dtype, w.device)
                for _ in range(cfg.n_layers)]


def count_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Parameter count from the shape alone (no model needed)."""
    d, L, hd = cfg.dim, cfg.n_layers, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2
    mlp = 3 * d * cfg.hidden_dim
    norms = 2 * d + (2 * hd if cfg.qk_norm else 0)
    body = L * (attn + mlp + norms) + d
    emb = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return body if non_embedding else body + emb + head


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None) -> Transformer:
    """Meta-device construction followed by materialisation on `device` (no sharding)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model
