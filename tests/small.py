"""The smallest settings that still exercise the real pipeline, shared by integration tests.

SMALL shapes the model, tokenizer, data and batch (a ~100k-parameter model that trains a
step in tens of milliseconds on a CPU); each test adds its own schedule (max_steps,
log_every, ckpt_every, ...). `prepare_small` runs the corpus, tokenizer and data stages
once into `<storage>/<name>`, so the runs of a test module differ only in what they test.
"""

from __future__ import annotations

SMALL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "data.seq_len=64",
    "tokenizer.vocab_size=512", "tokenizer.sample_bytes=300000", "train.micro_batch_size=4",
    "train.global_batch_size=8", "train.warmup_steps=2", "train.eval_batches=1", "sample.max_new_tokens=8",
    # Two FSDP2 workers of one CPU: the sharded path (collectives, per-rank checkpoint files,
    # a failure on rank 1). The default ("auto": one worker with every core here) is what the
    # CLI and quickstart tests run.
    "train.num_workers=2", "train.cpus_per_worker=1",
]


def prepare_small(storage: str, name: str = "base"):
    """Corpus, tokenizer and prepared blocks under `<storage>/<name>` (local or s3://).
    Returns (cfg, data_dir, manifest); cfg.tokenizer.path and cfg.model (vocabulary
    resolved) are what later runs reuse. Needs Ray (the data stage is a Ray Data job)."""
    from raylm.config import load_config
    from raylm.pipeline import ensure_corpus, ensure_data, ensure_tokenizer

    cfg = load_config(overrides=[f"storage={storage}", f"name={name}", *SMALL])
    cfg = ensure_corpus(cfg)
    cfg, tok = ensure_tokenizer(cfg)
    data_dir, manifest = ensure_data(cfg, tok)
    return cfg, data_dir, manifest
