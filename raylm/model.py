"""A Llama-style decoder as single-device math.

Token embedding -> N x [RMSNorm -> GQA attention with RoPE -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> LM head.

Nothing here knows about Ray, process groups or sharding: `raylm.parallel` wraps this
module from the outside. Build it on the meta device, move it with `to_empty`, then call
`init_weights()`, which is the single place where parameters and RoPE tables get values
(a model whose weights come from a checkpoint calls only `init_buffers()`, the RoPE part):

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()

muP (`model.width_scaling="mup"`, off by default) changes three things, all relative to the
width multiplier m = dim / base_dim: hidden matrices start with std / sqrt(m), the optimizer
gives them lr / m (`raylm.train.make_optimizer`), and the final hidden states are divided by
m before the head. At m = 1 it is the standard model exactly.

Init scheme: embeddings and every input projection ~ N(0, init_std); the two projections
that write into the residual stream (attention `wo`, MLP `w2`) ~ N(0, init_std / sqrt(2 L)),
as in GPT-2, so the residual's variance does not grow with depth; norms start at 1. An
untied LM head uses N(0, 1/sqrt(dim)) so initial logits have unit scale.

Document masking (`doc_sep=`, training only): a packed row `doc1 EOS doc2 EOS ...` is several
independent sequences. Each token attends only to earlier tokens of its own document, and
RoPE positions restart at 0 at each document's first token, so a document's logits are the
ones it would get alone in a row. Both are derived from the tokens (`document_positions`),
not from an extra batch column. The attention kernel is SDPA with a boolean block-causal
mask; FlexAttention (`doc_mask_kernel = "flex"`) is the alternative that
benchmarks/attention_mask.py measures against it (see `Transformer.doc_mask_kernel`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x: (B, H, T, D) by position (HF Llama layout).

    cos/sin: (T, D/2) when every row has the same positions, or (B, T, D/2) gathered per
    token (document masking); either way they broadcast over the heads."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


def document_positions(tokens: torch.Tensor, sep_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, positions), both (B, T) long, of packed rows `doc1 EOS doc2 EOS ...`.

    The EOS that ends a document belongs to it, so a new document starts at the token after
    each EOS: doc_ids is the running count of EOS strictly before a token, and a position is
    the distance to its document's first token. A row starts a document at column 0 even
    when it was cut from the middle of one (nothing earlier is visible anyway), a row may end
    without EOS (the last document is cut short), and consecutive EOS make one-token documents.
    Pure tensor code on the tokens' device, for the model and for loss or data code alike."""
    B, T = tokens.shape
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] = tokens[:, :-1] == sep_id
    doc_ids = starts.long().cumsum(1)
    col = torch.arange(T, device=tokens.device).expand(B, T)
    first = torch.where(starts, col, 0).cummax(1).values  # column of each token's document start
    return doc_ids, col - first


def document_mask(doc_ids: torch.Tensor, kernel: str = "sdpa"):
    """Block-causal attention mask of (B, T) document ids: query q sees key k iff k <= q and
    both are in the same document.

    kernel "sdpa": a (B, 1, T, T) boolean tensor for `F.scaled_dot_product_attention` (True =
    attend), broadcast over heads. kernel "flex": a FlexAttention `BlockMask`, whose kernel
    skips the key blocks no query of a block can see."""
    B, T = doc_ids.shape
    if kernel == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def visible(b, h, q, k):
            return (doc_ids[b, q] == doc_ids[b, k]) & (k <= q)

        return create_block_mask(visible, B, None, T, T, device=doc_ids.device)
    if kernel != "sdpa":
        raise ValueError(f"document mask kernel {kernel!r}: expected 'sdpa' or 'flex'")
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal


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

    def forward(self, x, cos, sin, cache: KVCache | None = None, start: int | torch.Tensor = 0, doc_mask=None):
        """`start`: the first query's position (int), or every query's position as a (T,)
        long tensor for fixed-shape decoding into `cache` (see KVCache), or (B, T) with each
        row at its own positions (raylm.serve.engine.SlotCache). `doc_mask`: the
        block-causal mask of document masking (see `document_mask`), without a cache."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if doc_mask is not None and not isinstance(doc_mask, torch.Tensor):  # a FlexAttention BlockMask
            from torch.nn.attention.flex_attention import flex_attention

            # Fused only inside torch.compile (train.compile compiles each block); eager
            # flex_attention materialises the scores, and it has no backward on CPU.
            y = flex_attention(q, k, v, block_mask=doc_mask, enable_gqa=self.kv_heads != self.n_heads)
            return self.wo(y.transpose(1, 2).reshape(B, T, -1))
        if doc_mask is not None:
            mask, causal = doc_mask, False
        elif cache is not None and isinstance(start, torch.Tensor):  # static shapes (see KVCache)
            mask, causal = cache.visible(start), False
            k, v = cache.write(start, k, v)
        elif cache is not None:
            k, v = cache.update(start, k, v)
            if start > 0:  # queries at start..start+T-1 see every key up to their own position
                causal = False
                if T > 1:
                    pos_q = torch.arange(start, start + T, device=x.device)[:, None]
                    mask = torch.arange(k.shape[2], device=x.device)[None, :] <= pos_q
        y = attend(q, k, v, mask, causal and mask is None)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           causal: bool) -> torch.Tensor:
    """SDPA for q (B, H, T, D) over k, v (B, KV, S, D), KV dividing H (GQA), with a boolean
    `mask` broadcastable to (B, 1, T, S) or `causal`; returns (B, H, T, D).

    GQA never materialises repeated K/V. Unmasked, SDPA's `enable_gqa` broadcasts the kv
    heads (flash takes it). Masked, CUDA's flash kernel takes no mask and its memory-efficient
    kernel no `enable_gqa`, so that call would run on the slow math kernel: instead the query
    heads sharing a kv head are folded into the query length, (B, KV, G*T, D) with the mask
    repeated G times along T, which is plain attention the memory-efficient kernel takes.
    Every query row attends exactly as before (query head h reads kv head h // G)."""
    H, KV = q.shape[1], k.shape[1]
    if H == KV or mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != KV)
    B, _, T, D = q.shape
    G = H // KV
    folded = q.reshape(B, KV, G * T, D)  # heads h = kv * G + g are contiguous: a view
    rows = mask.repeat(*([1] * (mask.dim() - 2)), G, 1)  # row g * T + t is query t's
    y = F.scaled_dot_product_attention(folded, k, v, attn_mask=rows, is_causal=False)
    return y.reshape(B, H, T, D)


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

    def forward(self, x, cos, sin, cache: KVCache | None = None, start: int | torch.Tensor = 0, doc_mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, start, doc_mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    # Attention kernel of document masking, "sdpa" or "flex" (see `document_mask`). SDPA with
    # a boolean mask on every device. On CPU it is the only choice that trains (FlexAttention
    # has no CPU backward in torch 2.13). benchmarks/attention_mask.py, tiny shape on a busy
    # 2-core CPU: a step costs about what plain causal SDPA's does at seq 128 and 1.1-1.4x at
    # seq 512, where the causal kernel's skipping of the blocks above the diagonal (a mask
    # makes it visit every block) starts to count. On CUDA that benchmark also times
    # compiled FlexAttention, which skips the blocks outside every document; it has not run on
    # a GPU yet: set "flex" (with train.compile) where it measures faster.
    doc_mask_kernel: str = "sdpa"

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
        self.init_buffers()
        # muP: hidden matrices' std falls as 1/sqrt(fan_in), relative to the base width.
        hidden_std = cfg.init_std / math.sqrt(cfg.width_multiplier) if cfg.width_scaling == "mup" else cfg.init_std
        out_std = hidden_std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=cfg.init_std)
        for layer in self.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
                        layer.feed_forward.w1, layer.feed_forward.w3):
                nn.init.normal_(lin.weight, std=hidden_std)
            for lin in (layer.attention.wo, layer.feed_forward.w2):
                nn.init.normal_(lin.weight, std=out_std)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.reset_parameters()
        if not cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=cfg.dim ** -0.5)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Compute the state that is not a parameter (the RoPE tables) on the model's device:
        all a model materialised from meta needs besides weights loaded from a checkpoint.
        The tables are fp32 whatever the parameters' dtype (`apply_rope` rotates in fp32), so
        they are replaced rather than copied into: a model cast to bf16 gets fp32 ones back."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def hidden_states(self, tokens: torch.Tensor, caches: list[KVCache] | None = None,
                      start: int | torch.Tensor = 0, doc_sep: int | None = None,
                      between_layers: Callable[[], None] | None = None):
        """Final-norm hidden states (B, T, dim). `doc_sep`: the token id that ends each packed
        document (EOS); attention then stays within documents and positions restart per
        document (see the module docstring). None (the default) is one sequence per row.
        `between_layers`: called between one layer and the next, changing nothing here (a
        serving engine runs a newcomer's prefill there, in cache slots this forward does not
        read: raylm.serve.engine)."""
        T = tokens.shape[1]
        doc_mask = None
        if doc_sep is not None:
            if caches is not None or not isinstance(start, int) or start != 0:
                raise ValueError("doc_sep= is for whole packed rows (training); decode without it")
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
            doc_ids, positions = document_positions(tokens, doc_sep)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B, T, D/2)
            doc_mask = document_mask(doc_ids, self.doc_mask_kernel)  # built once, shared by the layers
        elif isinstance(start, torch.Tensor):
            # Static decoding: the first position as a 0-d long tensor on the device, so a
            # compiled step is one graph for every position. Nothing here reads its value
            # (that would sync with the device), so the caller checks the length limit.
            # A (B,) tensor gives each row its own first position (continuous batching:
            # raylm.serve.engine's slotted cache); positions are then (B, T) and so are
            # cos/sin, which `apply_rope` takes per token as with document masking.
            if caches is None:
                raise ValueError("a tensor `start` is for decoding into KV caches; pass caches=")
            first = start.reshape(()) if start.dim() == 0 else start[:, None]
            start = first + torch.arange(T, device=tokens.device)
            cos, sin = self.rope_cos[start], self.rope_sin[start]
        else:
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            if between_layers is not None and i:
                between_layers()
            if doc_mask is None:  # the call every other path makes, unchanged
                h = layer(h, cos, sin, caches[i] if caches is not None else None, start)
            else:
                h = layer(h, cos, sin, doc_mask=doc_mask)
        if self.cfg.width_scaling == "mup" and self.cfg.width_multiplier != 1:
            # muP's 1/width logit multiplier, applied here so that every head (plain, tied,
            # chunked loss) multiplies by it: logits = W (s h) = s (W h).
            return self.norm(h) / self.cfg.width_multiplier
        return self.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, start: int | torch.Tensor = 0,
                doc_sep: int | None = None):
        """Logits (B, T, vocab), and the mean next-token loss when `targets` is given.

        Targets equal to -100 are ignored, which is how SFT masks prompt tokens. With
        `caches`, `tokens` continue the cached sequence at position `start`: an int, or a
        0-d long tensor for fixed-shape decoding (see KVCache). `doc_sep`: document masking
        of packed rows (see `hidden_states`); the target at each separator is the next
        document's first token, which callers mask with -100 if it should not count. The
        softmax runs over all `cfg.vocab_size` logits, the rows that pad the vocabulary past
        the tokenizer's included (see raylm.losses); callers that sample slice them off."""
        logits = self.logits(self.hidden_states(tokens, caches, start, doc_sep))
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
