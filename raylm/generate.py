"""Sampling from a checkpoint: load weights into a plain model, decode with a static KV cache.

Decoding is one prefill of the prompt, then one token per step through `last_logits` with the
position as a 0-d device tensor (`start=pos`), so every step has the same shapes and no
Python value that changes: `torch.compile(last_logits, mode="reduce-overhead")` captures it
once as a CUDA graph (benchmarks/decode_throughput.py --compile), and the same function
runs eagerly for `raylm generate`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection

import torch

from raylm.errors import CheckpointError, ConfigError, PathNotFoundError
from raylm import checkpoint, storage
from raylm.config import ModelConfig, S3Config, recorded_config
from raylm.model import Transformer
from raylm.tokenizer import Tokenizer


def load_tokenizer(uri: str, s3: S3Config | None = None) -> Tokenizer:
    """A tokenizer directory, local or in object storage (its two files read, nothing else
    under it: a run directory given by mistake is not downloaded whole)."""
    return Tokenizer.load(uri, s3)


def resolve_checkpoint(uri: str, s3: S3Config | None = None) -> str:
    """A checkpoint directory, or a run directory meaning its newest complete checkpoint."""
    if storage.exists(storage.join(uri, checkpoint.COMMIT_MARKER), s3):
        return uri
    found = checkpoint.latest_complete(uri, s3)
    if found is None:
        from raylm.hf import is_hf_dir

        hint = ("; it is a Hugging Face model directory: start a raylm run from it with `raylm pretrain "
                "--init-from-hf DIR`, then name that run"
                if is_hf_dir(uri, s3) else "")
        raise PathNotFoundError(f"{uri}: no complete checkpoint (neither a checkpoint nor a run directory with "
                                f"one){hint}")
    return found


INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inference_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A parameter dtype for inference: a torch dtype or its name; None means float32."""
    if dtype is None:
        return torch.float32
    name = str(dtype).removeprefix("torch.")
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(INFERENCE_DTYPES)}")
    return INFERENCE_DTYPES[name]


def load_for_inference(uri: str, s3: S3Config | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype | str | None = None):
    """(model, tokenizer, meta) from a checkpoint or run directory (local or s3://), weights
    only, with parameters in `dtype` (float32, bfloat16 or float16; default float32) on
    `device`. The model is built on meta and its memory filled once, by the checkpoint's
    weights: no random init is drawn and thrown away, and the caller's RNG is left as it was.
    The RoPE tables stay fp32 whatever `dtype` is."""
    dtype = inference_dtype(dtype)
    ckpt = resolve_checkpoint(uri, s3)
    meta = checkpoint.read_meta(ckpt, s3)
    if not isinstance(meta.get("config"), dict):
        raise checkpoint.CheckpointError(f"{storage.join(ckpt, checkpoint.META)}: no 'config'; not written by raylm")
    model_cfg = checkpoint_model_config(ckpt, meta)
    model = checked_meta_model(ckpt, model_cfg, s3)
    check_fits(ckpt, model_cfg, dtype, device)
    model.to(dtype)  # on meta: only the dtype changes, nothing is allocated
    model.to_empty(device=device)
    model.init_buffers()
    checkpoint.load_model_weights(model, ckpt, s3)  # every parameter (a missing one is an error), cast to dtype
    model.eval()
    tok_uri = tokenizer_of(ckpt, meta, s3)
    tok = load_tokenizer(tok_uri, s3)
    if meta.get("tokenizer_sha256") and tok.sha256 != meta["tokenizer_sha256"]:
        raise CheckpointError(f"{storage.redact_url(tok_uri)}: tokenizer hash {tok.sha256[:12]} differs from the one "
                              f"{storage.redact_url(ckpt)} was trained with ({str(meta['tokenizer_sha256'])[:12]})")
    # Where meta.json records no hash (written empty where the data's manifest lacked one), a
    # tokenizer with ids past the model's embedding failed on the first prompt with an
    # IndexError traceback from torch.
    if tok.vocab_size > model_cfg.vocab_size:
        raise CheckpointError(f"{storage.redact_url(tok_uri)}: tokenizer of {tok.vocab_size} ids, more than the "
                              f"{model_cfg.vocab_size} of the model in {storage.redact_url(ckpt)}: not the tokenizer "
                              f"it was trained with")
    return model, tok, meta


def checked_meta_model(ckpt: str, model_cfg: ModelConfig, s3: S3Config | None = None) -> Transformer:
    """`model_cfg`'s model on meta (nothing allocated), refused unless its parameters are the
    checkpoint's entries, shape for shape (`checkpoint.check_model_shapes`, one line naming
    meta.json and the first differing tensor). A config claiming more layers than the
    checkpoint holds is told from a model of one layer more, not built whole: 10^5 layers take
    minutes to build even on meta."""
    entries = checkpoint.model_entries(ckpt, s3)
    _check_buildable(ckpt, model_cfg)
    saved_layers = {int(n.split(".")[1]) for n in entries if n.split(".")[0] == "layers" and n.split(".")[1].isdigit()}
    cap = max(saved_layers, default=-1) + 2  # the checkpoint's layers and one more
    shape_cfg = dataclasses.replace(model_cfg, n_layers=min(model_cfg.n_layers, cap))
    with torch.device("meta"):
        model = Transformer(shape_cfg)
    checkpoint.check_model_shapes(model, ckpt, s3, entries)  # refuses a capped model: its extra layer is not saved
    return model


def _check_buildable(ckpt: str, cfg: ModelConfig) -> None:
    """Refuse, in one line naming meta.json, sizes whose largest tensor (fp32) has more bytes than
    torch can count (2^63): building even on meta raised a RuntimeError traceback (a dim of 2^40).
    Smaller sizes are built on meta and compared with the checkpoint's entries, tensor by tensor."""
    largest = max((cfg.vocab_size * cfg.dim, "model.vocab_size x model.dim"),
                  (cfg.n_heads * cfg.head_dim * cfg.dim, "model.dim x model.dim"),
                  (cfg.hidden_dim * cfg.dim, "model.ffn_dim x model.dim"),
                  (cfg.max_seq_len * (cfg.head_dim // 2), "model.max_seq_len x head dim / 2 (RoPE)"))
    if largest[0] * 4 >= 2**63:
        raise CheckpointError(f"{storage.join(ckpt, checkpoint.META)}: its config's model does not match the "
                              f"checkpoint's weights: a tensor of {largest[1]} = {largest[0]:,} elements, more than "
                              f"any tensor holds (a meta.json from another checkpoint, or altered)")


def check_fits(ckpt: str, model_cfg: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> None:
    """Refuse, in one line naming the checkpoint's meta.json, a model whose weights (in
    `dtype`) and RoPE tables (fp32, max_seq_len rows, which no checkpoint entry records) need
    more than all of `device`'s memory, rather than a traceback from the allocator (or the OS
    killing the process). Devices other than CPU and CUDA are not checked."""
    from raylm.model import count_params

    device = torch.device(device)
    if device.type == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    elif device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        return
    weights = count_params(model_cfg) * dtype.itemsize
    rope = 2 * model_cfg.max_seq_len * (model_cfg.head_dim // 2) * 4
    if weights + rope > total:
        raise CheckpointError(f"{storage.join(ckpt, checkpoint.META)}: its model needs {(weights + rope) / 2**30:.1f} "
                              f"GiB ({weights / 2**30:.1f} GiB of {str(dtype).removeprefix('torch.')} weights, "
                              f"{rope / 2**30:.1f} GiB of RoPE tables for max_seq_len={model_cfg.max_seq_len}), more "
                              f"than the {total / 2**30:.1f} GiB of memory on {device}")


def checkpoint_model_config(ckpt: str, meta: dict) -> ModelConfig:
    """The model settings of a checkpoint's recorded config (`config.recorded_config`: its
    training settings are not checked again). A refused config names the checkpoint's meta.json."""
    try:
        return recorded_config(meta["config"]).model
    except ConfigError as e:
        raise CheckpointError(f"{storage.join(ckpt, checkpoint.META)}: its config: {e}") from None


def tokenizer_of(ckpt: str, meta: dict, s3: S3Config | None = None) -> str:
    """Where a checkpoint's tokenizer is: meta.json names it relative to the run (older runs:
    an absolute path, which no longer holds once a run is copied elsewhere, so then the run's
    own `tokenizer/` is used)."""
    run_dir = storage.parent(ckpt)
    path = meta.get("tokenizer") or "tokenizer"
    if not storage.is_s3(path) and not path.startswith(("/", "file://")):
        return storage.join(run_dir, path)
    own = storage.join(run_dir, "tokenizer")
    if not storage.exists(path, s3) and storage.exists(own, s3):
        return own
    return path


def last_logits(model: Transformer, tokens: torch.Tensor, caches, start: int | torch.Tensor) -> torch.Tensor:
    """Logits (B, vocab) for the last position of `tokens` (B, T), which continue the cached
    sequence at `start`. The head runs on that position only: a prefill never builds the
    (B, T, vocab) logits it would throw away.

    `start` an int: the prefill (causal attention over the slice written so far). `start` a
    0-d long tensor on the model's device: a fixed-shape decode step (see raylm.model.KVCache).
    Nothing checks the length limit on the tensor path (reading the value would sync with the
    device): callers keep start + T <= model.cfg.max_seq_len and <= the caches' length."""
    h = model.hidden_states(tokens, caches, start)
    return model.logits(h[:, -1])


@torch.no_grad()
def greedy_decode(model: Transformer, prompt: torch.Tensor, new_tokens: int, step=last_logits) -> torch.Tensor:
    """(B, new_tokens) greedy continuations of `prompt` (B, P): one prefill, then fixed-shape
    steps. `step` is `last_logits` or a compiled version of it."""
    B, P = prompt.shape
    if new_tokens < 0:
        raise ValueError(f"new_tokens={new_tokens}: expected 0 or more")
    if new_tokens == 0:  # the prefill would pick a token nobody asked for
        return prompt.new_empty((B, 0))
    if P + new_tokens > model.cfg.max_seq_len:
        raise ConfigError(f"prompt of {P} + {new_tokens} new tokens exceeds model.max_seq_len={model.cfg.max_seq_len}")
    caches = model.make_caches(B, P + new_tokens)
    pos = torch.tensor(P, device=prompt.device)
    _step_begins()
    nxt = step(model, prompt, caches, 0).argmax(-1, keepdim=True)
    out = [nxt]
    for _ in range(new_tokens - 1):
        _step_begins()
        nxt = step(model, nxt, caches, pos).argmax(-1, keepdim=True)
        pos += 1
        out.append(nxt)
    return torch.cat(out, dim=1)


def _step_begins() -> None:
    """Tell CUDA graphs (a step compiled with mode="reduce-overhead") that a new decode step
    starts, so the previous replay's outputs may be overwritten: each step's logits are used
    (argmax, sampling) before the next step runs. Without it, cudagraph trees cannot tell
    decode steps apart from one long iteration, and they keep re-recording or refuse to
    replay. Eager and CPU: a counter increment, nothing else."""
    torch.compiler.cudagraph_mark_step_begin()


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 50, eos_id: int | None = None, seed: int = 0, step=last_logits,
             stop_ids: Collection[int] = (), vocab_size: int | None = None, top_p: float = 1.0) -> list[int]:
    """Autoregressive sampling with a preallocated KV cache: one prefill, then one token a step
    through the fixed-shape path (`step`: `last_logits` or a compiled version of it). The
    sequence ends before `eos_id` or any of `stop_ids`. `vocab_size`: only ids below it are
    sampled, the tokenizer's size where the model's vocabulary is padded past it (rounded up
    to a multiple of 64): the padding rows have no text. `top_p`: nucleus sampling as the
    server's (`sample_token`; 1 = off), so a seeded server request with top_p has its
    `generate` to compare with."""
    device = model.tok_embeddings.weight.device
    limit = model.cfg.max_seq_len
    prompt = prompt[-(limit - 1):] or [eos_id or 0]
    max_new_tokens = min(max_new_tokens, limit - len(prompt))
    gen = torch.Generator(device=device).manual_seed(seed)
    caches = model.make_caches(1, len(prompt) + max_new_tokens)
    _step_begins()
    logits = step(model, torch.tensor([prompt], device=device), caches, 0)
    pos = torch.tensor(len(prompt), device=device)  # advanced in place: the step's inputs keep their shapes
    x = torch.zeros((1, 1), dtype=torch.long, device=device)
    stops = {*stop_ids, *([] if eos_id is None else [eos_id])}
    out = []
    for i in range(max_new_tokens):
        nxt = sample_token(logits[0, :vocab_size], temperature, top_k, gen, top_p)
        if nxt in stops:
            break
        out.append(nxt)
        if i == max_new_tokens - 1:
            break  # the token is chosen; its logits would go unused
        x.fill_(nxt)
        _step_begins()
        logits = step(model, x, caches, pos)
        pos += 1
    return out


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator,
                 top_p: float = 1.0) -> int:
    """One token from `logits` (vocab,): greedy at temperature 0, else one draw from `gen`
    after temperature, top-k (0 = off) and top-p (nucleus: the smallest set of most likely
    tokens whose probability reaches top_p; 1 = off, which leaves results as they were)."""
    if temperature <= 0:
        return int(logits.argmax())
    # Not below float32's smallest normal number, which the division would round to zero.
    scaled = logits.float() / max(temperature, torch.finfo(torch.float32).tiny)
    if torch.isinf(scaled.max()):  # so small a temperature that the division overflows (and the
        return int(logits.argmax())  # softmax would be NaN): its limit, the greedy choice
    logits = scaled
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Drop a token once the tokens ranked above it already hold top_p; the first is always kept.
        sorted_p = sorted_p.masked_fill(sorted_p.cumsum(0) - sorted_p >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def complete(model: Transformer, tok: Tokenizer, prompts, max_new_tokens: int, temperature: float,
             top_k: int, seed: int = 0, top_p: float = 1.0) -> list[str]:
    """Each prompt with its continuation (prompt i: seed + i, as the server seeds a list of prompts).
    A prompt of no tokens is refused, as the server refuses it: `generate` would start from EOS,
    a continuation of nothing the user wrote, which the server never gives."""
    encoded = [tok.encode(prompt) for prompt in prompts]
    empty = next((i for i, ids in enumerate(encoded) if not ids), None)
    if empty is not None:
        raise ConfigError(f"--prompt #{empty + 1} {prompts[empty]!r}: encodes to no tokens; give some text "
                          f"(or --chat, where it is a user turn)")
    return [prompt + tok.decode(generate(model, ids, max_new_tokens, temperature, top_k,
                                         tok.eos_id, seed + i, vocab_size=tok.vocab_size, top_p=top_p))
            for i, (prompt, ids) in enumerate(zip(prompts, encoded))]


def chat_reply(model: Transformer, tok: Tokenizer, messages: list[dict], max_new_tokens: int,
               temperature: float = 0.0, top_k: int = 50, seed: int = 0, top_p: float = 1.0) -> str:
    """The assistant's next turn: the chat template (the one SFT trained on) with the
    assistant's turn opened, decoded until the end-of-turn token or EOS (a model that ends
    the document ends its reply: what follows EOS is another document), as serving and the
    exports' generation settings stop."""
    from raylm.tokenizer import END

    ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
    return tok.decode(generate(model, ids, max_new_tokens, temperature, top_k, tok.eos_id, seed,
                               stop_ids=(tok.special_ids[END],), vocab_size=tok.vocab_size, top_p=top_p))


def compile_decode_step(mode: str = "reduce-overhead"):
    """`last_logits` under torch.compile: one graph for the prefill, one for every decode step
    (fixed shapes, dynamic=False), each a CUDA graph on GPUs with mode="reduce-overhead"
    (on CPU that mode is plain inductor). `greedy_decode` and `generate` mark each step's
    start for CUDA graphs; other callers call `torch.compiler.cudagraph_mark_step_begin()`
    before each step once the previous step's outputs are no longer needed."""
    return torch.compile(last_logits, mode=mode, fullgraph=True, dynamic=False)
