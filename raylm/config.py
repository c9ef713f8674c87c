"""Configuration: one small frozen dataclass per concern, YAML files, dotted overrides.

A run is described by `Config`, which nests the per-concern configs. It loads from YAML
(`load_config`) and takes command-line overrides such as `train.lr=3e-4` or
`model.preset=gpt2-124m`. Unknown keys, values of the wrong type and numbers out of range
are errors that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import reprlib
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Sequence

import yaml


from raylm.errors import ConfigError  # noqa: E402,F401  (defined with raylm's other error types)


# --------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """The values a numeric field allows: `lo` and `hi` (None: unbounded), each inclusive
    unless marked open, plus `off`, a value outside them that switches the feature off.
    Every int and float field of a config class has one in its RANGES table, checked by
    `validate`, so a nonsensical value fails when the config loads and not minutes into a run."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    off: float | None = None
    note: str = ""  # what a special value means, appended to the error

    def check(self, key: str, value: int | float | None) -> None:
        if value is None or value == self.off or value == "auto":  # None/auto: resolved elsewhere
            return
        finite = isinstance(value, int) or math.isfinite(value)  # isfinite overflows past 1e308
        lo_ok = self.lo is None or value > self.lo or (value == self.lo and not self.lo_open)
        hi_ok = self.hi is None or value < self.hi or (value == self.hi and not self.hi_open)
        if finite and lo_ok and hi_ok:
            return
        kind = "an integer" if isinstance(value, int) else "a number" if finite else "a finite number"
        if self.lo is not None and self.hi is not None:
            bounds = f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            bounds = f"{'>' if self.lo_open else '>='} {self.lo}"
        else:
            bounds = f"{'<' if self.hi_open else '<='} {self.hi}"
        off = f"{self.off} (off) or " if self.off is not None else ""
        note = f" ({self.note})" if self.note else ""
        raise ConfigError(f"{key}={value!r}: expected {off}{kind} {bounds}{note}")


def at_least(lo: float, note: str = "") -> Range:
    return Range(lo=lo, note=note)


def above(lo: float, note: str = "", off: float | None = None) -> Range:
    return Range(lo=lo, lo_open=True, note=note, off=off)


def within(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False, note: str = "") -> Range:
    return Range(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, note=note)


def _check_ranges(obj: Any, prefix: str) -> None:
    for name, rng in obj.RANGES.items():
        rng.check(prefix + name, getattr(obj, name))


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the Llama-style decoder. Derived sizes are properties, not fields."""

    # 0 means "the tokenizer's vocabulary, rounded up to a multiple of 64": the embedding
    # must cover every id the tokenizer emits, and 64-multiples keep matmuls aligned.
    vocab_size: int = 0
    dim: int = 256  # residual width
    n_layers: int = 4
    n_heads: int = 4
    # None means n_heads (plain multi-head attention); fewer KV heads (GQA) shrink the KV cache.
    n_kv_heads: int | None = None
    # None derives Llama's SwiGLU width: 8/3 * dim rounded up to `ffn_multiple_of`, which
    # keeps the parameter count of a 4*dim GELU MLP.
    ffn_dim: int | None = None
    ffn_multiple_of: int = 64
    max_seq_len: int = 256  # RoPE tables are built for this many positions
    rope_theta: float = 10000.0  # Llama 2's base; raise it for long contexts
    norm_eps: float = 1e-5
    # Tying input and output embeddings saves vocab*dim parameters, which dominate small models.
    tie_embeddings: bool = True
    # Normalising queries and keys per head bounds attention logits; large runs that diverge
    # without it turn it on (issue: stability options). Off matches plain Llama.
    qk_norm: bool = False
    init_std: float = 0.02  # GPT-2 / Llama init for embeddings and input projections
    # Hyperparameter transfer across widths (`raylm tune` on a narrow proxy, then train wide).
    # The width multiplier is dim / base_dim (base_dim 0: this dim, multiplier 1). "none": the
    # standard parametrisation, unchanged. "sqrt": every learning rate times multiplier^-0.5
    # (nanochat's (d_model/768)^-0.5 with base_dim=768). "mup": maximal update parametrisation
    # (Tensor Programs V) for Adam: hidden matrices init std and learning rate divided by
    # sqrt(multiplier) and multiplier (their weight decay times multiplier, so AdamW's
    # lr x weight_decay a step stays the proxy's, as mup's MuAdamW), logits scaled by
    # 1/multiplier; embeddings and norms as at base width. Widen by adding heads (head_dim
    # fixed), as muP's attention assumes here.
    width_scaling: str = "none"
    base_dim: int = 0

    RANGES: ClassVar[dict[str, Range]] = {
        "vocab_size": at_least(0, "0: the tokenizer's"),
        "dim": at_least(1),
        "n_layers": at_least(1),
        "n_heads": at_least(1),
        "n_kv_heads": at_least(1, "null: model.n_heads"),
        "ffn_dim": at_least(1, "null: derived from model.dim"),
        "ffn_multiple_of": at_least(1),
        "max_seq_len": at_least(1),
        # RoPE's frequencies are rope_theta ** (-i / d): a base of 1 or less makes them all equal
        # or growing, so positions stop being told apart.
        "rope_theta": above(1),
        # RMSNorm divides by sqrt(mean(x^2) + eps): 0 gives NaN for a zero vector, and an eps of
        # 1 or more swamps the activations (usually 1e5 typed for 1e-5).
        "norm_eps": within(0, 1, lo_open=True, hi_open=True),
        "init_std": above(0),  # 0 would start every weight equal: nothing breaks the symmetry
        "base_dim": at_least(0, "0: model.dim, a width multiplier of 1"),
    }

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def width_multiplier(self) -> float:
        return self.dim / (self.base_dim or self.dim)

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        m = self.ffn_multiple_of
        return m * ((int(8 * self.dim / 3) + m - 1) // m)

    def validate(self) -> None:
        _check_ranges(self, "model.")  # first: the checks below divide by these
        if self.width_scaling not in ("none", "sqrt", "mup"):
            raise ConfigError(f"model.width_scaling={self.width_scaling!r}: expected none, sqrt or mup")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head dim {self.head_dim} (model.dim / model.n_heads) must be even for RoPE")

    def with_vocab(self, tokenizer_vocab: int) -> "ModelConfig":
        """Resolve vocab_size=0 against the tokenizer: its size rounded up to a multiple of 64.
        An explicit vocab_size must be that size or a rounding of it: smaller leaves ids
        without an embedding row, larger trains rows no id ever uses (a 32,000-row
        embedding beside a 2,048-id tokenizer)."""
        rounded = 64 * ((tokenizer_vocab + 63) // 64)
        if self.vocab_size == 0:
            return replace(self, vocab_size=rounded)
        if self.vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} ids"
            )
        if self.vocab_size > rounded:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size} does not match the tokenizer's {tokenizer_vocab} ids "
                f"(at most {rounded}, its size rounded up to a multiple of 64): set model.vocab_size=0 to "
                f"derive it, or train a tokenizer of that size (tokenizer.vocab_size={self.vocab_size})"
            )
        return self


# Presets are plain entries. `tiny` is tuned for the 2-core CPU quality benchmark (see README);
# the others follow published shapes so FLOP and memory figures compare with peers. None fixes
# the vocabulary: it comes from the run's tokenizer (ModelConfig.with_vocab), so a preset never
# carries embedding rows no id uses. PRESET_TOKENIZER_VOCAB names the tokenizer size each was
# designed for: train one of that size (tokenizer.vocab_size) for the published shape.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, max_seq_len=256),
    # GPT-2 small's shape with SwiGLU at 8/3 width (2048), which keeps its 124M parameters.
    "gpt2-124m": ModelConfig(dim=768, n_layers=12, n_heads=12, max_seq_len=1024),
    "350m": ModelConfig(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, max_seq_len=2048),
    "1b": ModelConfig(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        max_seq_len=2048, tie_embeddings=False, rope_theta=500000.0,
    ),
    "3b": ModelConfig(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
        max_seq_len=4096, tie_embeddings=False, rope_theta=500000.0,
    ),
    "7b": ModelConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        max_seq_len=4096, tie_embeddings=False, rope_theta=500000.0,
    ),
}
PRESET_TOKENIZER_VOCAB: dict[str, int] = {
    "tiny": 2048,  # tokenizer.vocab_size's default, from the same CPU sweep
    "gpt2-124m": 50257,  # GPT-2's BPE (50,304 rows once rounded to 64)
    "350m": 32000,  # Llama 2's SentencePiece size, as for the larger shapes
    "1b": 32000,
    "3b": 32000,
    "7b": 32000,
}


# --------------------------------------------------------------------------- storage


@dataclass(frozen=True)
class S3Config:
    """How to reach S3-compatible object storage. Credentials never live here: they come
    from the standard AWS chain (environment, profile, instance role)."""

    endpoint_url: str = ""  # empty: AWS itself, or $AWS_ENDPOINT_URL (MinIO, SeaweedFS, R2, ...)
    region: str = ""  # empty: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1
    max_attempts: int = 8  # retries with backoff on throttling and 5xx before giving up

    RANGES: ClassVar[dict[str, Range]] = {"max_attempts": at_least(1, "the first try counts")}

    def validate(self) -> None:
        _check_ranges(self, "s3.")


# --------------------------------------------------------------------------- tokenizer

# The smallest vocabulary SentencePiece can train with raylm's settings (raylm.tokenizer):
# 4 control ids (unk, bos, eos, pad), 5 user-defined symbols (3 chat roles, end, newline),
# 256 byte-fallback pieces, and at least one corpus character. Real corpora need more.
MIN_TOKENIZER_VOCAB = 4 + 5 + 256 + 1


@dataclass(frozen=True)
class TokenizerConfig:
    # Empty: train one into the run directory. Set: load this tokenizer directory instead.
    path: str = ""
    # 2048 won the CPU quality sweep (benchmarks/quality_cpu.py): a 4096 head costs the tiny
    # model half its speed, and a few minutes of training cannot use the extra ids.
    vocab_size: int = 2048
    # SentencePiece trains in memory; a 20 MB sample gives stable merges in seconds.
    sample_bytes: int = 20_000_000
    character_coverage: float = 0.9995  # byte fallback covers the rest

    RANGES: ClassVar[dict[str, Range]] = {
        "vocab_size": at_least(
            MIN_TOKENIZER_VOCAB, "room for the specials, 256 byte pieces and one character"),
        "sample_bytes": at_least(1),
        "character_coverage": within(0.98, 1.0, note="SentencePiece's own limits"),
    }

    def validate(self) -> None:
        _check_ranges(self, "tokenizer.")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    # Corpus: a file, directory or glob, local or s3://. Empty: the built-in offline corpus.
    path: str = ""
    text_field: str = "text"  # column holding the document in jsonl/parquet
    # Tokens per training sequence (blocks hold seq_len + 1). 128 won the CPU quality sweep at
    # equal tokens per step: 2.229 bits/byte against 2.241 for 256 at 520 steps, with 7% faster
    # steps (cheaper attention); 64 did worse (2.252). Long-context models set their own.
    seq_len: int = 128
    # Documents are held out for validation by a stable hash of their text, so the split
    # does not depend on file order or cluster size.
    val_fraction: float = 0.02
    val_path: str = ""  # an explicit held-out corpus instead of val_fraction
    # "document": whole documents by the hash above; "tail": the last val_fraction of every
    # document (one text file has only one document to split); "auto": tail for a corpus of
    # plain-text files too few to split by document, else document (raylm.documents.val_split_mode).
    val_split: str = "auto"
    min_chars: int = 1  # shorter documents are dropped as noise
    max_chars: int = 10_000_000  # longer ones are almost always dumps, not prose
    # Packed blocks pass through a seeded shuffle buffer of this many blocks: neighbouring
    # blocks of one document rarely share a batch, and the order stays a function of the seed.
    shuffle_window: int = 1024
    blocks_per_shard: int = 4096  # rows per prepared parquet shard (1 to 8 MB at seq 256-1024)
    tokenizer_actors: int = 0  # 0: auto (prepare: one per core, CPUs left for reads; stream: a share per worker)
    # `prepare` runs corpora smaller than this (MB) in the driver process, the same stages on
    # one thread per core, instead of on a Ray Data actor pool. Actors take seconds to start
    # and then move every batch between processes; below this size one process is done first
    # (raylm.data.runs_in_process; benchmarks/tokenize_throughput.py measures both). 0: always Ray Data.
    in_process_mb: float = 64.0
    max_bad_records: int = 0  # 0: the first bad record is an error
    # Duplicates waste compute and teach memorisation. "exact": same text after cleaning;
    # "near": also MinHash/LSH near-duplicates (an extra pass over the corpus); "none": off.
    # The first occurrence in corpus order is kept.
    dedup: str = "near"
    # Estimated Jaccard similarity of 5-word shingles above which two documents count as
    # near-duplicates; 0.8 is the usual choice for web text (boilerplate variants, mirrors).
    near_dup_threshold: float = 0.8
    minhash_perm: int = 128  # signature length: estimates within ~0.05 of true similarity
    # PII replaced by typed placeholders (<EMAIL>, ...) before tokenizing; on by default,
    # because a model memorises what it sees. An empty list turns redaction off.
    redact_pii: tuple[str, ...] = ("email", "phone", "ip", "card")
    # "prepare": write token shards (and a data card) first, then train from them; shards are
    # reused by later runs and read by any number of workers for free. "stream": train
    # straight from the raw corpus, each worker running read->tokenize->pack itself as it
    # trains, with no shards written; the same blocks in the same order.
    mode: str = "prepare"
    # Attention stays within each packed document, and RoPE positions restart at each, so a
    # document never conditions on the unrelated one packed before it. Off by default for
    # pre-training (the usual practice at short sequence lengths, and the faster kernel);
    # SFT rows always pack conversations this way, whatever this says.
    document_mask: bool = False

    RANGES: ClassVar[dict[str, Range]] = {
        "seq_len": at_least(1),
        # 1 would send every document to validation and leave nothing to train on.
        "val_fraction": within(0, 1, hi_open=True),
        "min_chars": at_least(0),
        "max_chars": at_least(1),
        "shuffle_window": at_least(1, "1: no shuffle"),
        "blocks_per_shard": at_least(1),
        "tokenizer_actors": at_least(0, "0: auto"),
        "in_process_mb": at_least(0, "0: always Ray Data"),
        "max_bad_records": at_least(0),
        # Both ends are degenerate: 0 calls every pair a duplicate, 1 only identical shingle sets.
        "near_dup_threshold": within(0, 1, lo_open=True, hi_open=True),
        "minhash_perm": at_least(1),
    }

    def validate(self) -> None:
        _check_ranges(self, "data.")
        if self.min_chars > self.max_chars:
            raise ConfigError(f"data.min_chars={self.min_chars} exceeds data.max_chars={self.max_chars}: "
                              f"every document would be dropped")
        if self.mode not in ("prepare", "stream"):
            raise ConfigError(f"data.mode={self.mode!r}: expected prepare or stream")
        if self.val_split not in ("auto", "document", "tail"):
            raise ConfigError(f"data.val_split={self.val_split!r}: expected auto, document or tail")
        if self.dedup not in ("none", "exact", "near"):
            raise ConfigError(f"data.dedup={self.dedup!r}: expected none, exact or near")
        from raylm.pii import PII_TYPES  # stdlib only; keeps one list of the types

        bad = [t for t in self.redact_pii if t not in PII_TYPES]
        if bad:
            raise ConfigError(f"data.redact_pii: unknown type {bad[0]!r}; expected some of {', '.join(PII_TYPES)}")


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    # Ray Train workers. "auto": one per GPU with use_gpu; on CPU, one per machine, holding
    # its cores (TrainConfig.resolve_workers): one process to start and nothing to shard. On
    # 2 cores (benchmarks/quality_cpu.py, fixed steps, back to back) one worker of 2 threads
    # reached its first step about 2 s sooner than two FSDP2 workers of one thread and ran
    # its steps about 2% slower: a tie there, and the simpler layout. Set a number for FSDP2
    # across CPU processes.
    num_workers: int | str = "auto"
    use_gpu: bool = False
    # CPUs Ray reserves for each worker, and its torch threads. "auto": 1 with use_gpu;
    # on CPU, a machine's cores shared among the workers on it.
    cpus_per_worker: float | str = "auto"
    micro_batch_size: int = 16  # sequences per worker per forward/backward
    # Sequences per optimizer step across all workers. Kept fixed when the worker count
    # changes, so a resumed run on other hardware follows the same optimisation. 4,096 tokens
    # a step won the CPU sweep: 16 x 256 beat 32 x 256 at equal time, and 8 x 256 (twice the
    # steps) did no better per token; 32 x 128 then beat 16 x 256 (data.seq_len).
    global_batch_size: int = 32
    max_steps: int = 600
    lr: float = 3e-3  # small models tolerate high rates; the CPU sweep picked this one
    # Cosine decays to lr * min_lr_ratio. Short budget runs gain from a high floor: on the CPU
    # quality benchmark (440 steps) 0.3 beat 0.1 by 0.026 bits/byte, and 0.0 lost 0.026.
    min_lr_ratio: float = 0.3
    warmup_steps: int = 30
    weight_decay: float = 0.1  # applied to matrices only, never to norms or biases
    beta1: float = 0.9
    beta2: float = 0.95  # LLM practice: faster second-moment adaptation than 0.999
    grad_clip: float = 1.0
    # "auto": bf16 on GPU, fp32 on CPU (bf16 matmuls are ~24x slower on CPUs without AMX).
    precision: str = "auto"
    # torch.compile each block; pays off on GPU, costs minutes of compiling on CPU. "auto": on
    # for CUDA, off elsewhere (TrainConfig.for_device).
    compile: bool | str = "auto"
    activation_checkpointing: bool = False  # trade recompute for memory on large models
    # float8 matmuls (torchao) in the blocks' linear layers: for H100-class GPUs at ~1B and
    # up, where matmuls dominate; off by default because elsewhere the casts cost more.
    float8: bool = False
    # False keeps each block's gathered parameters from forward to backward: one all-gather
    # fewer per block and step, for the memory of unsharded blocks. Worth it for small models.
    reshard_after_forward: bool = True
    # HSDP: >1 splits the workers into this many replicas, each sharding the model over
    # num_workers / replicate_degree of them, with one gradient all-reduce across replicas a
    # step; the node count keeps the per-block all-gathers on a node's own links. 1 is plain
    # FSDP over every worker: the least state per device, and all one node needs.
    replicate_degree: int = 1
    log_every: int = 10
    eval_every: int = 100
    # Validation set size, in global batches: each evaluation covers the first
    # eval_batches * global_batch_size validation rows (all of them if fewer), split over the
    # workers (raylm.batches.rank_val_batches), so val_loss is over the same rows whatever
    # num_workers and micro_batch_size are: across a resume on other workers, and between
    # runs or Tune trials that differ only in them. 4: the CPU default's 128 rows (4 x 32),
    # the set one worker evaluated when this counted micro-batches per worker (8 of 16);
    # and as a forward pass costs about a third of a training step, an evaluation costs
    # about eval_batches / 3 steps whatever the accumulation: 1.3% of training at
    # eval_every=100, 0.1-0.3% for the GPU recipes' pre-training (eval_every 500-1000).
    eval_batches: int = 4
    ckpt_every: int = 200
    keep_checkpoints: int = 2  # the newest complete checkpoint is never deleted
    z_loss: float = 0.0  # PaLM's log(Z)^2 penalty; 1e-4 helps very large runs stay stable
    # >0: compute the LM head and loss this many tokens at a time, never holding the full
    # logits; pays off on GPUs with large vocabularies. 0 keeps the plain path (fastest on CPU).
    # "auto": CUDA_LOSS_CHUNK on CUDA, 0 elsewhere (TrainConfig.for_device).
    loss_chunk_size: int | str = "auto"
    max_nonfinite_steps: int = 3  # consecutive NaN/inf steps skipped before the run stops
    # A loss above spike_factor x the median of the last spike_window losses is a spike:
    # "log" records it, "stop" ends the run naming the step, "rollback" restores the newest
    # complete checkpoint and goes on with the data after the spike (at most max_rollbacks times).
    spike_factor: float = 3.0
    spike_window: int = 50
    on_spike: str = "log"
    max_rollbacks: int = 3
    # Checkpoint writes and uploads run behind training; it waits only for the copy of the
    # state to host memory. The commit marker still comes last. False: save synchronously.
    async_checkpoint: bool = True
    timeout_s: float = 0.0  # 0: no limit; otherwise a run that exceeds it fails loudly
    # 0: the run is max_steps long. Otherwise it also ends, with its final evaluation and
    # checkpoint, once its training loop has run this many seconds (summed over resumes), and
    # the LR decay follows the elapsed share of this budget when that is ahead of the steps',
    # so the schedule completes whatever the machine's speed: fixed-time proxy runs and
    # benchmarks ("the best model in 4 minutes").
    time_budget_s: float = 0.0

    RANGES: ClassVar[dict[str, Range]] = {
        "num_workers": at_least(1),
        "replicate_degree": at_least(1, "1: plain FSDP"),
        # Ray reserves this many CPUs per worker; 0 would pack any number of workers on one core.
        "cpus_per_worker": above(0),
        "micro_batch_size": at_least(1),
        "global_batch_size": at_least(1),
        "max_steps": at_least(1),
        "lr": above(0),
        "min_lr_ratio": within(0, 1),  # the cosine floor, as a share of train.lr
        "warmup_steps": at_least(0),
        "weight_decay": at_least(0),
        "beta1": within(0, 1, hi_open=True),  # Adam's moment averages never update at 1
        "beta2": within(0, 1, hi_open=True),
        "grad_clip": at_least(0, "0: no clipping"),
        "log_every": at_least(1),  # the step counters are taken modulo these
        "eval_every": at_least(1),
        "ckpt_every": at_least(1),
        "eval_batches": at_least(1),
        # Retention never deletes the newest complete checkpoint, so 0 would silently act as 1.
        "keep_checkpoints": at_least(1),
        "z_loss": at_least(0, "0: off"),
        "loss_chunk_size": at_least(0, "0: unchunked"),
        "max_nonfinite_steps": at_least(0, "0: the first one stops the run"),
        # At 1 or less, half the steps or more would count as spikes.
        "spike_factor": above(1, off=0),
        "spike_window": at_least(1),
        "max_rollbacks": at_least(0),
        "timeout_s": at_least(0, "seconds; 0: no limit"),
        "time_budget_s": at_least(0, "seconds; 0: no limit"),
    }

    def validate(self) -> None:
        # Before the ranges, which compare numbers: "auto" is the only text these take.
        if self.compile != "auto" and not isinstance(self.compile, bool):
            raise ConfigError(f"train.compile={self.compile!r}: expected true, false or auto")
        if isinstance(self.loss_chunk_size, str) and self.loss_chunk_size != "auto":
            raise ConfigError(f"train.loss_chunk_size={self.loss_chunk_size!r}: expected an integer >= 0 or auto")
        for key in ("num_workers", "cpus_per_worker"):
            value = getattr(self, key)
            if isinstance(value, str) and value != "auto":
                raise ConfigError(f"train.{key}={value!r}: expected a number or auto")
        _check_ranges(self, "train.")  # first: the batch check below divides by these
        # A warmup longer than the run: the rate climbs to train.lr * max_steps / warmup_steps at
        # the last step (train.lr_at) and never decays, under train.time_budget_s too (max_steps
        # still ends the loop). Refused once the warmup is longer than the default's (30; SFT's
        # 10, DPO's 5): those are left to smoke runs of a few steps, whose rate matters to no one.
        if self.warmup_steps > max(self.max_steps, TrainConfig.warmup_steps):
            raise ConfigError(
                f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}: the learning "
                f"rate would end at {self.max_steps / self.warmup_steps:.0%} of train.lr and never decay; lower "
                f"train.warmup_steps or raise train.max_steps")
        if self.on_spike not in ("log", "stop", "rollback"):
            raise ConfigError(f"train.on_spike={self.on_spike!r}: expected log, stop or rollback")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision={self.precision!r}: expected auto, bf16 or fp32")
        if self.num_workers == "auto":  # checked again once resolve_workers knows the count
            if self.global_batch_size % self.micro_batch_size:
                raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                                  f"train.micro_batch_size={self.micro_batch_size}")
            return
        if self.global_batch_size % (self.micro_batch_size * self.num_workers):
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size * train.num_workers = {self.micro_batch_size} * {self.num_workers}"
            )
        if self.num_workers % self.replicate_degree:  # the workers are the world (one per device)
            raise ConfigError(f"train.replicate_degree={self.replicate_degree} does not divide "
                              f"train.num_workers={self.num_workers}: each replica shards over an equal share")

    def resolve_workers(self, cores: int, machines: int = 1, gpus: int = 0, spare: int = 0,
                        share: int = 1) -> "TrainConfig":
        """num_workers and cpus_per_worker "auto" made concrete, and checked, for a cluster of
        `machines` with `cores` CPUs each (`spare` of which each keeps for Ray Data's tasks)
        and `gpus` GPUs in all, shared by `share` runs at once (Tune's concurrent trials)."""
        if "auto" not in (self.num_workers, self.cpus_per_worker):
            return self
        workers = self.num_workers
        if workers == "auto":
            workers = max(1, gpus // share) if self.use_gpu else max(1, machines // share)
        cpus = self.cpus_per_worker
        if cpus == "auto":
            cpus = 1.0 if self.use_gpu else float(max(1, (cores - spare) * machines // (share * workers)))
        resolved = replace(self, num_workers=workers, cpus_per_worker=cpus)
        resolved.validate()
        return resolved

    def for_device(self, device_type: str) -> "TrainConfig":
        """This config with every "auto" setting made concrete for a device type ("cuda",
        "cpu", ...): the one place they resolve, used by the training worker and the
        benchmarks alike, so a benchmark measures what `raylm pretrain` runs."""
        auto = device_defaults(device_type)
        return replace(self, **{k: v for k, v in auto.items() if getattr(self, k) == "auto"})


# Rows of logits per chunk of the chunked cross-entropy where "auto" turns it on: at a 32k
# vocabulary 2,048 rows are 256 MB of fp32 logits, small beside a GPU's memory, and large
# enough that the LM-head matmuls stay efficient (benchmarks/train_throughput.py).
CUDA_LOSS_CHUNK = 2048


def device_defaults(device_type: str) -> dict[str, Any]:
    """What train.precision, train.compile and train.loss_chunk_size="auto" mean on a device.
    CUDA: bf16 compute, compiled blocks, the chunked loss (the full logits of a large
    vocabulary would otherwise dominate activation memory). Elsewhere: fp32 (CPUs without
    AMX run bf16 matmuls ~24x slower), eager (compiling costs minutes on CPU) and the plain
    loss (fastest on CPU)."""
    cuda = device_type == "cuda"
    return {"precision": "bf16" if cuda else "fp32", "compile": cuda,
            "loss_chunk_size": CUDA_LOSS_CHUNK if cuda else 0}


@dataclass(frozen=True)
class SampleConfig:
    prompts: tuple[str, ...] = ("The ", "def ", "In Python, ")
    max_new_tokens: int = 80
    temperature: float = 0.8
    top_k: int = 50

    RANGES: ClassVar[dict[str, Range]] = {
        "max_new_tokens": at_least(0),
        "temperature": at_least(0, "0: greedy"),
        "top_k": at_least(0, "0: no cut-off"),
    }

    def validate(self) -> None:
        _check_ranges(self, "sample.")


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation (raylm dpo): the loss on (prompt, chosen, rejected)."""

    # Strength of the pull towards the reference model; 0.1 is the DPO paper's and TRL's
    # default. Higher keeps the policy nearer the reference.
    beta: float = 0.1
    loss: str = "sigmoid"  # "sigmoid": DPO; "ipo": IPO, which regresses to a finite margin
    # Conservative DPO's assumed share of flipped labels (sigmoid loss only): it stops pushing
    # a pair once its margin is large enough. 0: plain DPO.
    label_smoothing: float = 0.0
    # True: one Ray Data pass computes the reference model's log-probabilities and stores them
    # beside the data (keyed by the reference checkpoint's and the data's hashes, so they are
    # reused), and training never holds the reference. False: a frozen copy of the starting
    # policy, sharded like it, runs beside it (twice the model memory, no extra pass).
    precompute_reference: bool = False

    RANGES: ClassVar[dict[str, Range]] = {
        "beta": above(0),
        # 0.5 makes the loss symmetric in chosen and rejected: no preference is left to learn.
        "label_smoothing": within(0, 0.5, hi_open=True),
    }

    def validate(self) -> None:
        _check_ranges(self, "dpo.")
        if self.loss not in ("sigmoid", "ipo"):
            raise ConfigError(f"dpo.loss={self.loss!r}: expected sigmoid or ipo")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing}: applies to dpo.loss=sigmoid only")


@dataclass(frozen=True)
class TuneConfig:
    """A hyperparameter search (raylm tune): the `tune:` section of a search-space file, or
    `tune.*` overrides. Not part of `Config`: the runs a search starts are plain runs."""

    # Draws from the space: a random search runs its grid_search keys' grid this many times.
    # A space that samples nothing (search=grid) runs each point once: 1, its default there.
    num_samples: int = 8
    # Trials running at once. Each holds train.num_workers x train.cpus_per_worker CPUs for its
    # whole life; the cap leaves the rest to Ray Data's read tasks (unbounded, waiting Train
    # runs hold their trial actors and starve both).
    max_concurrent_trials: int = 2
    # "random": Tune's variant generator (grid_search keys enumerated, the rest sampled);
    # "grid": the same, but every key must be a grid_search or a constant; "optuna": TPE.
    search: str = "random"
    scheduler: str = "asha"  # "asha": stop poor trials at rungs of `step`; "fifo": run all to the end
    metric: str = "val_loss"  # reported at each evaluation (train.eval_every steps)
    # "auto": the metric's own direction (min for val_loss and val_ppl, max for the eval_* task
    # scores); a direction against the metric's is refused (ASHA would keep the worst trials).
    mode: str = "auto"
    # ASHA's first rung, in steps; 0: the first evaluation (train.eval_every, or
    # train.max_steps where that comes first).
    grace_period: int = 0
    reduction_factor: float = 3.0  # ASHA keeps about 1/reduction_factor of trials at each rung
    # The trial actor only waits on its Train run; a sliver of a CPU keeps it off the workers' share.
    driver_cpus: float = 0.1
    seed: int = 0  # of the searcher's draws, so a search is repeatable
    time_budget_s: float = 0.0  # 0: no limit; otherwise running trials stop at this wall-clock
    max_failures: int = 0  # retries of a failed trial (each resumes from its newest checkpoint)

    RANGES: ClassVar[dict[str, Range]] = {
        "num_samples": at_least(1),
        "max_concurrent_trials": at_least(1),
        "grace_period": at_least(0, "0: the first evaluation"),
        "reduction_factor": above(1),
        "driver_cpus": at_least(0),
        "seed": within(0, 2**32 - 1),
        "time_budget_s": at_least(0, "seconds; 0: no limit"),
        "max_failures": at_least(0),
    }

    def validate(self) -> "TuneConfig":
        _check_ranges(self, "tune.")
        for key, allowed in (("search", ("random", "grid", "optuna")), ("scheduler", ("asha", "fifo")),
                             ("mode", ("auto", "min", "max"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"tune.{key}={getattr(self, key)!r}: expected {' or '.join(allowed)}")
        return self


def metric_mode(metric: str) -> str:
    """The direction in which a trial metric improves: losses and perplexity fall, the
    in-training task scores (accuracy, exact match, contains) rise."""
    return "min" if metric in ("val_loss", "val_ppl") else "max"


def tune_config(data: dict[str, Any]) -> TuneConfig:
    """A TuneConfig from a mapping (the `tune:` section and `tune.*` overrides), validated,
    with tune.mode=auto resolved from the metric."""
    tc = _build(TuneConfig, data, "tune.").validate()
    return dataclasses.replace(tc, mode=metric_mode(tc.metric)) if tc.mode == "auto" else tc


# --------------------------------------------------------------------------- serve

SERVE_ENGINES = ("raylm", "vllm")
SERVE_DEVICES = ("cpu", "cuda", "cuda:0")  # cuda:0: the one GPU a replica sees


@dataclass(frozen=True)
class ServeConfig:
    """`raylm serve`: the OpenAI-compatible Ray Serve application (raylm/serve/app.py)."""

    engine: str = "raylm"  # "raylm": own continuous-batching engine (CPU, one GPU); "vllm": HF export on vLLM
    # Loopback: the API key is the only lock on Serve's ingress (Ray's token auth does not cover
    # it), so exposing the server is a choice made explicitly, and it needs a key.
    host: str = "127.0.0.1"
    port: int = 8000  # Serve's own default
    # Empty: read RAYLM_API_KEY; both empty: no key, allowed on loopback only.
    api_key: str = field(default="", repr=False)  # a secret: never in a repr, a log line or a traceback
    model_name: str = ""  # the `model` clients send; empty: the run directory's name
    device: str = "cpu"  # "cuda" for a GPU replica (num_gpus=1 is then set on it)
    max_batch_size: int = 16  # sequences decoded together; the 3x goal is measured at 16
    # Prompt tokens prefilled per engine step, over all new requests (longer prompts go in
    # chunks): it bounds how long one step, so every running request's next token, waits
    # for newcomers. 512 is vLLM's chunked-prefill budget: on a GPU about where a forward
    # turns compute-bound (so it costs a decode step's time); on a CPU a few decode steps'.
    prefill_tokens_per_step: int = 512
    # torch.compile the engine's decode step (fixed shapes: every slot, every key position)
    # and its prefill (one dynamic-shape graph), compiled as the replica starts. Off by
    # default: it needs a C++ compiler on a CPU and costs start-up (about 35-60 s for the
    # tests' tiny model on 2 cores); not yet run on a GPU.
    compile: bool = False
    # The engine in a process of its own (raylm/serve/engine_process.py), so that its steps and
    # the replica's event loop stop taking turns on one GIL. Measured on 2 CPU cores, 16
    # streams of the tiny model, alternating pairs: 2,199-2,262 output tokens/s against
    # 1,691-1,757 in the replica's process, steady time to first token p50 16 ms against 20;
    # the bridge costs an idle request about 1 ms. False: the engine on a thread of the replica.
    engine_process: bool = True
    # Requests a replica holds at once: the batch plus as many again waiting to join it, so a
    # slot freed mid-step is refilled without a round trip through the ingress.
    max_ongoing_requests: int = 32
    # Requests queued beyond that (by Serve's proxy, or behind HAProxy by the replica) before
    # answering 429; -1: unbounded (Serve's own default, which lets a burst grow memory and
    # latency without limit).
    max_queued_requests: int = 64
    backpressure_status: int = 429  # 429 tells clients to back off and retry; 503 for load balancers
    retry_after_s: float = 1.0  # Retry-After on 429/503: about one short request's time
    # The app's own limit, enforced whatever timeout headers a client sends to Serve's ingress.
    request_timeout_s: float = 300.0
    max_body_bytes: int = 1 << 20  # 1 MiB holds a full-context prompt of any model raylm trains
    max_n: int = 8  # choices per request: each takes a batch slot
    num_replicas: int = 1  # fixed replica count when autoscaling is off
    # Autoscaling (Serve's autoscaling_config) is on when autoscale_max_replicas > 0.
    autoscale_min_replicas: int = 1  # 1: no cold start on the first request
    autoscale_max_replicas: int = 0
    target_ongoing_requests: float = 16.0  # one full batch per replica
    num_cpus: float = 1.0  # per replica; the engine runs torch on all but one of them (raylm.serve.app.cpu_threads)
    graceful_shutdown_timeout_s: float = 60.0  # in-flight requests finish within this on shutdown
    # How often Serve checks a replica, whose engine process may have died (then it is replaced);
    # Serve's own default.
    health_check_period_s: float = 10.0
    # A stream's SSE hold per other stream in flight (raylm/serve/handlers.py): Serve spends ~1.4 ms
    # of CPU per event whatever it carries; 5 ms was best on 2 cores, 16 streams (benchmarks/serve_load.py).
    # Behind HAProxy, which relays bytes in C, the replica's own per-event cost remains: 0 gave
    # 0.75x the output tokens/s of 5 ms and a higher p95 time to first token (one run each).
    stream_event_interval_s: float = 0.005

    RANGES: ClassVar[dict[str, Range]] = {
        "port": within(1, 65535),
        "max_batch_size": at_least(1),
        "prefill_tokens_per_step": at_least(1),
        "max_ongoing_requests": at_least(1),
        "max_queued_requests": Range(lo=1, off=-1, note="-1: unbounded"),
        "backpressure_status": within(429, 503),
        "retry_after_s": at_least(0),
        "request_timeout_s": above(0),
        "max_body_bytes": at_least(1024, "a chat request needs at least this much"),
        "max_n": at_least(1),
        "num_replicas": at_least(1),
        "autoscale_min_replicas": at_least(0, "0: scale to zero"),
        "autoscale_max_replicas": at_least(0, "0: autoscaling off"),
        "target_ongoing_requests": above(0),
        "num_cpus": at_least(0),
        "graceful_shutdown_timeout_s": at_least(0),
        "health_check_period_s": above(0),
        "stream_event_interval_s": at_least(0, "0: every engine step's output as its own event"),
    }

    def validate(self) -> "ServeConfig":
        _check_ranges(self, "serve.")
        if self.engine not in SERVE_ENGINES:
            raise ConfigError(f"serve.engine={self.engine!r}: expected one of {', '.join(SERVE_ENGINES)}")
        # A replica holds one GPU or none: any other device (`gpu`, `cuda:1`) failed in every
        # replica's constructor, once Ray and Serve had started, as Serve's deployment error.
        if self.device not in SERVE_DEVICES:
            raise ConfigError(f"serve.device={self.device!r}: expected cpu, or cuda for a GPU replica")
        if self.backpressure_status not in (429, 503):
            raise ConfigError(f"serve.backpressure_status={self.backpressure_status}: expected 429 or 503")
        if self.autoscale_max_replicas and self.autoscale_max_replicas < self.autoscale_min_replicas:
            raise ConfigError(f"serve.autoscale_max_replicas={self.autoscale_max_replicas} is below "
                              f"serve.autoscale_min_replicas={self.autoscale_min_replicas}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(f"serve.max_ongoing_requests={self.max_ongoing_requests} is below "
                              f"serve.max_batch_size={self.max_batch_size}: the batch could never fill")
        return self

    @property
    def autoscaling_config(self) -> dict[str, Any] | None:
        """Serve's autoscaling_config, or None for a fixed `num_replicas`."""
        if not self.autoscale_max_replicas:
            return None
        return {"min_replicas": self.autoscale_min_replicas, "max_replicas": self.autoscale_max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}


def load_serve_config(overrides: Sequence[str | tuple[str, Any]] = (), **fields_: Any) -> ServeConfig:
    """ServeConfig from `key=value` overrides (`max_batch_size=32` or `serve.max_batch_size=32`)
    and explicit fields (command-line options), checked like a run's config."""
    nested = _nest([o if isinstance(o, tuple) or not o.startswith("serve.") else o[len("serve."):]
                    for o in overrides])
    return _build(ServeConfig, {**nested, **fields_}, "serve.").validate()


# --------------------------------------------------------------------------- eval


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation: `raylm eval`, and the suite pretrain/sft/dpo run while training
    (raylm/eval/)."""

    # In-training evaluation every this many steps (and at the last step); 0: off. The
    # built-in scorers run on the training model between steps, so each run pauses training.
    every: int = 0
    # Built-in task files (jsonl, local or s3://): multiple choice {context, choices, gold}
    # and generation {context, answer}. Checked when training starts, not at the first eval.
    mc_tasks: tuple[str, ...] = ()
    gen_tasks: tuple[str, ...] = ()
    # Items of each task scored during training (the file's first ones): what bounds the
    # pause. 200 two-way items put the standard error of accuracy near 0.035.
    max_items: int = 200
    max_new_tokens: int = 32  # completion budget of generation tasks
    # Generation tasks in `raylm eval`: 0 greedy, so scores are repeatable. In-training
    # evaluation is always greedy, whatever this is: its scores compare steps of one run.
    temperature: float = 0.0
    # `raylm eval`'s pool of Ray actors, each loading the model once (0: score in
    # the driver process), and each actor's CPUs (also its torch threads) and GPUs.
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # Tokens per work unit (context + choices); units are what the pool hands out, so smaller
    # units balance actors better and larger ones batch more per forward pass.
    batch_tokens: int = 4096

    RANGES: ClassVar[dict[str, Range]] = {
        "every": at_least(0, "0: off"),
        "max_items": at_least(1),
        "max_new_tokens": at_least(1),
        "temperature": at_least(0, "0: greedy"),
        "workers": at_least(0, "0: in the driver process"),
        "cpus_per_worker": above(0),
        "gpus_per_worker": at_least(0),
        "batch_tokens": at_least(1),
    }

    def validate(self) -> None:
        _check_ranges(self, "eval.")
        if self.every and not (self.mc_tasks or self.gen_tasks):
            raise ConfigError(f"eval.every={self.every} but no eval.mc_tasks or eval.gen_tasks to run")


# --------------------------------------------------------------------------- run

STAGES = ("pretrain", "sft", "dpo")
GLOB_CHARS = ("*", "?")  # wildcards in raylm.storage paths
# An example's path left as written: `<bucket>` anywhere, or any `<...>` where an S3 bucket's
# name goes (bucket names never hold "<"). Narrow on purpose: a local path or S3 key may.
PLACEHOLDER = re.compile(r"^s3://(<[^/]*>)|(<bucket>)")
S3_URI = re.compile(r"s3://[^/]")  # the scheme raylm.storage speaks, and a bucket


def check_rope_memory(model: ModelConfig, where: str = "", key: str = "model.max_seq_len") -> None:
    """Refuse, in one line naming model.max_seq_len and its value (after `where`, the file or
    checkpoint it came from, if any), RoPE tables larger than this machine's memory. Every process that
    builds the model (each training worker, the driver's samples, generate, serving, eval)
    allocates fp32 cos and sin tables for all max_seq_len positions, which no weight backs:
    model.max_seq_len=10^15 passed every check and failed in the workers' allocator. The
    bound is all of this machine's memory, where the driver builds the model too: tables
    larger can never be allocated here, while sensible lengths need a small part of it
    (Llama 4's 10M positions at head dim 128: 5 GiB). `key`: the setting's name where it
    came from (raylm.hf: config.json's max_position_embeddings)."""
    need = 2 * model.max_seq_len * (model.head_dim // 2) * 4
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        raise ConfigError(f"{where + ': ' if where else ''}{key}={model.max_seq_len} needs "
                          f"{need / 2**30:.1f} GiB of RoPE tables (raylm builds them for every position), more "
                          f"than the {memory / 2**30:.1f} GiB of memory on this machine")


def dpo_train_refusal(tc: TrainConfig) -> str | None:
    """Why DPO cannot run under these train.* settings, or None. z-loss is a penalty per
    target token of the next-token loss, whose units are tokens; DPO's units are pairs, and
    no penalty there has that one's meaning or scale: refused, not dropped without a word."""
    if tc.z_loss:
        return (f"train.z_loss={tc.z_loss}: DPO does not apply it (a next-token loss penalty); set "
                f"train.z_loss=0 for stage=dpo (in a recipe, under stages.dpo)")
    return None


@dataclass(frozen=True)
class Config:
    name: str = "quickstart"  # run name: outputs go to <storage>/<name>
    storage: str = "./runs"  # local directory or s3://bucket/prefix
    seed: int = 1337
    model: ModelConfig = field(default_factory=lambda: MODEL_PRESETS["tiny"])
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    s3: S3Config = field(default_factory=S3Config)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # What the run optimises and what its data holds: "pretrain" (text), "sft" (chat records:
    # messages or prompt/completion) or "dpo" (prompt, chosen, rejected). Set by the subcommand.
    stage: str = "pretrain"
    # A run or checkpoint (local or s3://) whose weights start this run, with a fresh optimizer
    # and schedule; its tokenizer comes along. Empty: random init. SFT and DPO start here.
    init_from: str = ""

    # SentencePiece takes a 32-bit unsigned seed, and numpy's generators refuse negative ones.
    RANGES: ClassVar[dict[str, Range]] = {"seed": within(0, 2**32 - 1)}

    def validate(self, check_memory: bool = True) -> "Config":
        """`check_memory=False`: leave model.max_seq_len's RoPE tables unchecked against this
        machine's memory (`check_rope_memory`), for a config that builds no model of its
        own settings (data prepare) or whose caller checks them, naming their source."""
        _check_ranges(self, "")
        for section in (self.model, self.tokenizer, self.data, self.train, self.sample, self.s3, self.dpo, self.eval):
            section.validate()
        if check_memory:
            check_rope_memory(self.model)
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r}: expected one of {', '.join(STAGES)}")
        if self.stage in ("sft", "dpo") and self.data.val_path:
            # raylm.chat_data holds out data.val_fraction of the records; a held-out file was
            # never read, and the run validated on records it said came from elsewhere.
            raise ConfigError(f"data.val_path={self.data.val_path!r}: stage={self.stage} holds out "
                              f"data.val_fraction of its records (data.path) and reads no separate "
                              f"validation file; remove data.val_path")
        if self.stage == "dpo" and not self.init_from:
            raise ConfigError("stage=dpo needs init_from (the SFT run or checkpoint to start from and compare against)")
        if self.stage == "dpo" and dpo_train_refusal(self.train):
            raise ConfigError(dpo_train_refusal(self.train))
        # Post-training takes the parent's model, and checks data.seq_len against it there
        # (raylm.posttrain.parent_of): this run's model.* are not its own.
        if self.data.seq_len > self.model.max_seq_len and self.stage == "pretrain":
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        if self.stage == "pretrain" and self.eval.gen_tasks and self.eval.max_new_tokens >= self.model.max_seq_len:
            raise ConfigError(f"eval.max_new_tokens={self.eval.max_new_tokens} leaves no room for a prompt in "
                              f"model.max_seq_len={self.model.max_seq_len}; set it below that")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name={self.name!r}: a run name is one non-empty path segment, not '.' or '..'")
        if not self.storage.strip():
            raise ConfigError("storage='': name the directory or s3:// prefix runs go under (default: ./runs)")
        # Listing a run's files (its checkpoints, their shards) takes the path as a pattern, as
        # `data.path` does: a run named "lr*2" trained, then failed to commit its first checkpoint.
        for key, value in (("storage", self.storage), ("data.path", self.data.path),
                           ("data.val_path", self.data.val_path), ("tokenizer.path", self.tokenizer.path),
                           ("init_from", self.init_from)):
            # Shipped recipes and examples write s3://<bucket>/...: one left in would fail only
            # when its stage starts, perhaps days into a recipe.
            if m := PLACEHOLDER.search(value or ""):
                raise ConfigError(f"{key}={value!r}: {m.group(1) or m.group(2)} is a placeholder; "
                                  f"put your own value there")
            # `storage=s3://$BUCKET` with BUCKET unset, or `s3:/bucket` for `s3://bucket`: not an
            # s3:// URI, so a local path, and the run was written to ./s3:/... without a word.
            if (value or "")[:3].lower() == "s3:" and not S3_URI.match(value):
                raise ConfigError(f"{key}={value!r}: not an S3 URI; expected s3://bucket/prefix")
        for key, value in (("name", self.name), ("storage", self.storage)):
            if any(c in value for c in GLOB_CHARS):
                raise ConfigError(f"{key}={value!r}: {' '.join(GLOB_CHARS)} are not allowed in a run's path "
                                  f"(paths with them are read as patterns)")
        return self

    @property
    def run_dir(self) -> str:
        return self.storage.rstrip("/") + "/" + self.name

    def for_device(self, device_type: str) -> "Config":
        """The config a run on this device type trains with: train's "auto" settings made
        concrete (TrainConfig.for_device)."""
        return replace(self, train=self.train.for_device(device_type))


# --------------------------------------------------------------------------- loading

# Values echoed in errors are cut short: YAML aliases let a few hundred bytes of file expand
# into a value whose full repr takes gigabytes.
_short = reprlib.Repr()
_short.maxlevel, _short.maxlist, _short.maxtuple, _short.maxdict = 3, 6, 6, 6
_short.maxstring = _short.maxother = 200
_show = _short.repr


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return `value` coerced to annotation `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={_shown(key, value)}: expected {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={_shown(key, value)}: expected a list")
        (item_tp, _) = typing.get_args(tp)
        return tuple(_check_type(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if isinstance(value, (_IntText, _FloatText)):  # read from YAML text (_ConfigLoader)
        if tp is str:
            return value.text
        value = _number(key, value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int past 1e308
            raise ConfigError(f"{key}={_show(value)}: expected a finite number") from None
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `name=123` on the command line means the string "123"
    if tp is str and isinstance(value, str) and "\0" in value:
        # YAML writes one as "\0"; every path and name reaches the OS, which raised ValueError
        # ("embedded null byte") from deep inside the first stage to use it.
        raise ConfigError(f"{key}={_shown(key, value)}: contains a NUL character (\\0)")
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={_shown(key, value)}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def _shown(key: str, value: Any) -> str:
    """`value` as an error shows it: a secret field's (SECRET_FIELDS) never, as error lines
    reach terminals and job logs."""
    return "***" if key.rsplit(".", 1)[-1] in SECRET_FIELDS else _show(value)


def _number(key: str, value: "_IntText | _FloatText") -> int | float:
    """The plain number of a value read from YAML text, refusing the YAML 1.1 forms whose
    value is not what a reader of the text sees: `010` (octal 8) and `1:30` (base 60, 90)."""
    text = value.text.strip()
    plain = float(value) if isinstance(value, float) else int(value)
    if ":" in text:
        raise ConfigError(f"{key}={text}: YAML reads this as the base-60 number {plain}; write the number "
                          f"itself (or quote it to mean the text)")
    if isinstance(plain, int) and plain and re.fullmatch(r"[-+]?0[0-7_]+", text):
        raise ConfigError(f"{key}={text}: YAML reads a number with a leading 0 as octal ({plain}); write it "
                          f"without the leading 0")
    return plain


def _build(cls: type, data: dict[str, Any], prefix: str, base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping, starting from `base` (or defaults)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(data)}")
    data = dict(data)
    if cls is ModelConfig and "preset" in data:
        preset = data.pop("preset")
        if not isinstance(preset, str) or preset not in MODEL_PRESETS:  # a list is not even hashable
            raise ConfigError(f"{prefix}preset={_show(preset)}: unknown; choose from {sorted(MODEL_PRESETS)}")
        base = MODEL_PRESETS[preset]
    base = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    changes = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys: {sorted(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            changes[key] = _build(tp, value, f"{prefix}{key}.", getattr(base, key))
        else:
            changes[key] = _check_type(prefix + key, value, tp)
    return replace(base, **changes)


def _has_tag(text: str) -> bool:
    try:
        return any(isinstance(token, yaml.TagToken) for token in yaml.scan(text))
    except yaml.YAMLError:  # not YAML: read literally, where a "!" is just a character
        return False


# How YAML writes null: any other text that YAML reads as null (`#2` is a comment, `&a` an
# anchor with no value) is meant as text.
_NULLS = ("null", "Null", "NULL", "~")


def _override_value(key: str, raw: str) -> Any:
    """The value of `key=raw`: YAML (`3e-4`, `[a, b]`, `null`), or the literal text when it is
    not YAML, so globs such as `*.jsonl` need no quoting. A wrong type then fails the type
    check naming the key. Tags are refused: a config holds plain data, and `!!python/...`
    on a command line is a mistake or an attack. Text that YAML would cut at a comment
    (`name=run #2`, which YAML reads as "run") is taken whole, as written."""
    if not raw.strip():
        return ""
    if raw.lstrip().startswith("!") or _has_tag(raw):
        shown = "***" if key.rsplit(".", 1)[-1] in SECRET_FIELDS else raw
        raise ConfigError(f"{key}={shown}: YAML tags are not accepted (quote the value to mean the text)")
    try:
        value = _load_config_yaml(raw)
    except yaml.YAMLError:
        return raw
    except ValueError as e:  # an int of more digits than Python converts (sys.get_int_max_str_digits)
        raise ConfigError(f"{key}={raw.strip()[:20]}...: {str(e).split(':')[0]}") from None
    if "#" in raw and (value is None or isinstance(value, str) and "#" not in value):
        return raw.strip()
    if value is None and raw.strip() not in _NULLS:
        return raw.strip()
    return value


def _nest(overrides: Sequence[str | tuple[str, Any]]) -> dict[str, Any]:
    """['train.lr=3e-4', 'model.preset=tiny'] -> {'train': {'lr': 0.0003}, ...}. An item may
    also be a (key, value) pair, whose value is taken as it is, never parsed: for values such
    as a path from its own command-line option."""
    out: dict[str, Any] = {}
    for item in overrides:
        if isinstance(item, tuple):
            key, value = item
        elif "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
        else:
            key, raw = item.split("=", 1)
            value = _override_value(key.strip(), raw)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        last = parts[-1]
        # A section given whole (`train={max_steps: 5}`) after some of its keys (`train.lr=...`)
        # adds to them, as the other order does, rather than dropping them without a word.
        both = isinstance(value, dict) and isinstance(node.get(last), dict)
        node[last] = _merge(node[last], value) if both else value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _layer(lower: dict, upper: dict) -> dict:
    """`upper`, one layer of settings (a --config file, the overrides), merged over the layers
    beneath it. A `model.preset` in `upper` is a whole model shape: it replaces the model
    settings beneath it, and only `upper`'s own model.* keys apply on top. Merged key by key,
    the preset would lose to every model field of a lower layer, and a --from-record record
    sets them all: `--from-record R model.preset=1b` trained R's model without a word."""
    model = upper.get("model")
    if isinstance(model, dict) and "preset" in model:
        lower = {k: v for k, v in lower.items() if k != "model"}
    return _merge(lower, upper)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last, and
    the settings of a section written twice would vanish without a word. The keys are checked
    as written, before any merge (`<<:`) is applied: a merged key may still be overridden, as
    YAML means it (PyYAML writes merged keys into the mapping's node itself)."""

    # Entries one mapping may hold once its merges are applied. PyYAML copies every merged
    # mapping's entries, repeats and all, so merges of merges of one anchor multiply: eight
    # levels of `<<: [*a, *a, ...]` (nine each), 500 bytes of file, took 31 s and 700 MB, nine
    # ten times that (the alias bomb of merge keys). A real config merges a few dozen.
    MAX_MERGED = 10_000

    def flatten_mapping(self, node):
        merges = any(key.tag == "tag:yaml.org,2002:merge" for key, _ in node.value)
        super().flatten_mapping(node)  # calls this method for the mappings it merges: each is checked
        if merges and len(node.value) > self.MAX_MERGED:
            raise yaml.constructor.ConstructorError(
                None, None, f"more than {self.MAX_MERGED:,} keys in one mapping once its merges (<<) are applied",
                node.start_mark)

    def construct_document(self, node):
        self._refuse_duplicate_keys(node, set())
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, node, visited: set) -> None:
        if id(node) in visited:  # an alias: checked where it was anchored
            return
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                                key_node.start_mark)
                    seen.add(key)
                self._refuse_duplicate_keys(value_node, visited)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._refuse_duplicate_keys(item, visited)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys (a yaml.YAMLError naming the line)."""
    return _load(text, _UniqueKeyLoader)


def _load(text: str, loader: type) -> Any:
    """`yaml.load` with a SafeLoader subclass; text nested deeper than Python's recursion
    limit allows (a few hundred `[` or `{: `) is a yaml.YAMLError too, not a RecursionError
    from inside PyYAML's composer: it is the file's problem, and a one-line error names it."""
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


class _IntText(int):
    """An int read from a config file or override, with the text it was written as (`text`)."""


class _FloatText(float):
    """A float read from a config file or override, with the text it was written as (`text`)."""


class _ConfigLoader(_UniqueKeyLoader):
    """The loader of config files and overrides. YAML 1.1 reads `010` as octal 8, `1:30` as
    base-60 90 and `1.10` as 1.1, and a date as a date: numbers keep the text they were
    written as, so a string key takes that text (`name=1.10` names run "1.10", not "1.1";
    `tokenizer.path=0777` is "0777", not "511") and a number key refuses the forms that
    change the value (`_number`); dates stay text (`name=2024-01-01`)."""


def _construct_number(cls: type, construct):
    def build(loader, node):
        value = cls(construct(loader, node))
        value.text = node.value
        return value
    return build


_ConfigLoader.add_constructor("tag:yaml.org,2002:int",
                              _construct_number(_IntText, yaml.SafeLoader.construct_yaml_int))
_ConfigLoader.add_constructor("tag:yaml.org,2002:float",
                              _construct_number(_FloatText, yaml.SafeLoader.construct_yaml_float))
_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_scalar)


def _load_config_yaml(text: str) -> Any:
    """`load_yaml` with `_ConfigLoader`: for config files and override values, which `_build`
    checks key by key (every number leaves it a plain int or float)."""
    return _load(text, _ConfigLoader)


def yaml_problem(e: yaml.YAMLError) -> str:
    """'line 3: found undefined alias ...': where and what, on one line."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"line {mark.line + 1}: {problem}" if mark else problem


def _read_config_text(path: str, what: str, s3: "S3Config | None" = None) -> str:
    """The text of a config file the user names, local or s3://; a file that
    is missing, unreadable or not UTF-8 is a one-line error naming it as `what`."""
    if path.startswith("s3://"):
        from raylm import storage  # storage imports this module

        if not storage.exists(path, s3):
            raise ConfigError(f"{what} {path}: not found")
        data = storage.read_bytes(path, s3)
    else:
        p = Path(path)
        if p.is_dir():  # said "not found" of a directory that is there
            raise ConfigError(f"{what} {path}: a directory; pass a YAML file")
        if not p.exists():  # a pipe is read too: `--config <(...)`, `--config /dev/stdin`
            raise ConfigError(f"{what} {path}: not found")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"{what} {path}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text; pass a YAML file") from None


def load_config(path: str | None = None, overrides: Sequence[str | tuple[str, Any]] = (),
                base: dict[str, Any] | None = None, check_memory: bool = True) -> Config:
    """Defaults <- `base` mapping <- YAML file <- dotted overrides, validated. Overrides are
    'key=value' strings or (key, value) pairs (see `_nest`). A model.preset in the file or the
    overrides replaces the model settings of the layers beneath (`_layer`). `check_memory`:
    see `Config.validate`."""
    return load_config_given(path, overrides, base, check_memory)[0]


def read_config_file(path: str, overrides: Sequence[str | tuple[str, Any]] = (),
                     base: dict[str, Any] | None = None) -> str:
    """The text of the --config file `path`, read with the S3 settings given beside it (in
    `base` and the overrides, or the environment's)."""
    s3 = _build(S3Config, _merge(dict(base or {}), _nest(list(overrides))).get("s3") or {}, "s3.")
    return _read_config_text(path, "config file", s3)


def load_config_given(path: str | None = None, overrides: Sequence[str | tuple[str, Any]] = (),
                      base: dict[str, Any] | None = None, check_memory: bool = True,
                      text: str | None = None) -> tuple[Config, frozenset[str]]:
    """`load_config`, and the keys the YAML file and the overrides set, as the dotted names
    `section.key` (`model.dim`, `train.lr`; a top-level key as itself, `name`), `base`'s not
    among them. Both come from one reading of the file: one fetched from s3:// a second
    time may have changed in between. `text`: the file's text where the caller has read it
    already (`read_config_file`), for the same reason."""
    data: dict[str, Any] = dict(base or {})
    given: set[str] = set()
    overrides = list(overrides)  # read twice below: an iterator would be spent by the first
    if path:
        if text is None:
            text = read_config_file(path, overrides, data)
        try:
            loaded = _load_config_yaml(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML ({yaml_problem(e)})") from None
        except ValueError as e:  # an int of more digits than Python converts
            raise ConfigError(f"config file {path}: {str(e).split(':')[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        try:  # its keys and types on their own, so that an error names the file
            _build(Config, loaded, "")
        except ConfigError as e:
            raise ConfigError(f"{e} (in config file {path})") from None
        data = _layer(data, loaded)
        given |= _given_keys(loaded)
    nested = _nest(overrides)
    given |= _given_keys(nested)
    data = _layer(data, nested)
    return _build(Config, data, "").validate(check_memory), frozenset(given)


def _given_keys(layer: dict[str, Any]) -> set[str]:
    """{'model': {'dim': 128}, 'name': 'r'} -> {'model.dim', 'name'}."""
    return {f"{k}.{sub}" for k, v in layer.items() if isinstance(v, dict) for sub in v} | \
        {k for k, v in layer.items() if not isinstance(v, dict)}


# Fields that hold a secret whole (ServeConfig.api_key): `to_dict(redact=True)` writes them as "***".
SECRET_FIELDS = ("api_key",)


def to_dict(cfg: Any, redact: bool = False) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON records. `redact=True` replaces the
    credentials of every URL in it (`http://user:pw@host` -> `http://***@host`) and the value
    of every secret field (SECRET_FIELDS): use it for anything written down, such as run
    records, since they are shared and kept."""
    if redact:
        from raylm.storage import redact_url  # storage imports this module
    d = dataclasses.asdict(cfg)

    def fix(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: "***" if redact and k in SECRET_FIELDS and x[k] else fix(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [fix(v) for v in x]
        return redact_url(x) if redact and isinstance(x, str) else x

    return fix(d)


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "").validate()


def recorded_config(data: dict[str, Any]) -> Config:
    """A config an earlier run recorded (a checkpoint's meta.json, a run record): its keys and
    types checked and its model validated, its training settings not validated again. A run
    is read whatever a later raylm thinks of how it trained: a check added since would
    otherwise make every checkpoint trained without it unusable as a parent or for inference."""
    cfg = _build(Config, data, "")
    cfg.model.validate()
    return cfg
