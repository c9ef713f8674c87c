"""Sampling from a checkpoint: load weights into a plain model, decode with a KV cache."""

from __future__ import annotations

import tempfile

import torch

from raylm import checkpoint, storage
from raylm.config import S3Config, from_dict
from raylm.model import Transformer
from raylm.tokenizer import Tokenizer


def load_tokenizer(uri: str, s3: S3Config | None = None) -> Tokenizer:
    """A tokenizer directory, local or in object storage."""
    if not storage.is_s3(uri):
        return Tokenizer.load(uri)
    with tempfile.TemporaryDirectory(prefix="raylm-tok-") as tmp:
        storage.download_dir(uri, tmp, s3)
        tok = Tokenizer.load(tmp)
    tok.path = uri
    return tok


def resolve_checkpoint(uri: str, s3: S3Config | None = None) -> str:
    """A checkpoint directory, or a run directory meaning its newest complete checkpoint."""
    if storage.exists(storage.join(uri, checkpoint.COMMIT_MARKER), s3):
        return uri
    found = checkpoint.latest_complete(uri, s3)
    if found is None:
        raise FileNotFoundError(f"{uri}: no complete checkpoint (neither a checkpoint nor a run directory with one)")
    return found


def load_for_inference(uri: str, s3: S3Config | None = None, device: str = "cpu"):
    """(model, tokenizer, meta) from a checkpoint or run directory, weights only."""
    ckpt = resolve_checkpoint(uri, s3)
    meta = checkpoint.read_meta(ckpt, s3)
    cfg = from_dict(meta["config"])
    with torch.device("meta"):
        model = Transformer(cfg.model)
    model.to_empty(device=device)
    model.init_weights()  # RoPE tables; weights are overwritten next
    checkpoint.load_model_weights(model, ckpt, s3)
    model.eval()
    tok = load_tokenizer(meta["tokenizer"], s3)
    if tok.sha256 != meta["tokenizer_sha256"]:
        raise ValueError(f"{meta['tokenizer']}: tokenizer hash {tok.sha256[:12]} differs from the one "
                         f"{ckpt} was trained with ({meta['tokenizer_sha256'][:12]})")
    return model, tok, meta


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 50, eos_id: int | None = None, seed: int = 0) -> list[int]:
    """Autoregressive sampling with a preallocated KV cache: one prefill, then one token a step."""
    device = model.tok_embeddings.weight.device
    limit = model.cfg.max_seq_len
    prompt = prompt[-(limit - 1):] or [eos_id or 0]
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
    gen = torch.Generator(device=device).manual_seed(seed)
    caches = model.make_caches(1, len(prompt) + max_new_tokens)
    x = torch.tensor([prompt], device=device)
    logits, _ = model(x, caches=caches, start=0)
    out, pos = [], len(prompt)
    for _ in range(max_new_tokens):
        nxt = sample_token(logits[0, -1], temperature, top_k, gen)
        if eos_id is not None and nxt == eos_id:
            break
        out.append(nxt)
        logits, _ = model(torch.tensor([[nxt]], device=device), caches=caches, start=pos)
        pos += 1
    return out


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


def complete(model: Transformer, tok: Tokenizer, prompts, max_new_tokens: int, temperature: float,
             top_k: int, seed: int = 0) -> list[str]:
    return [prompt + tok.decode(generate(model, tok.encode(prompt), max_new_tokens, temperature, top_k,
                                         tok.eos_id, seed + i))
            for i, prompt in enumerate(prompts)]
