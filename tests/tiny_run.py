"""One tiny trained run for the stages that read runs (eval, export, serving), made without Ray.

`make_tiny_run(root)` writes `<root>/tiny`: a normal raylm run directory (tokenizer inside the
run, DCP checkpoint with its commit marker, metrics.jsonl), as `raylm pretrain` leaves it, in
a few seconds on one CPU thread. The model learns the built-in corpus and the synthetic chat
tasks rendered with the chat template, so both `complete` and `chat_reply` give text rather
than noise; it is not meant to be good. The session fixture `tiny_run` in conftest.py makes
it once per test session.
"""

from __future__ import annotations

import dataclasses
import itertools
import os

import numpy as np
import torch

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=128",
        "data.seq_len=64", "train.micro_batch_size=8", "train.global_batch_size=8", "train.num_workers=1", "train.warmup_steps=5",
        "train.max_steps=200", "train.ckpt_every=200", "train.eval_every=200", "train.eval_batches=1",
        "train.log_every=20", "train.lr=1e-2"]
VOCAB = 384


def make_tiny_run(root: str, name: str = "tiny") -> str:
    """Train the tiny run under `<root>/<name>` and return its directory."""
    from raylm import synthetic as S
    from raylm.config import load_config
    from raylm.corpus import iter_builtin_documents
    from raylm.pipeline import keep_in_run
    from raylm.tokenizer import train_tokenizer
    from raylm.train import train_local

    run_dir = os.path.join(root, name)
    texts = list(itertools.islice(iter_builtin_documents(), 400))
    chats = [S.messages_record(e)["messages"] for t in S.TASKS for e in S.examples(t, 200, seed=1)]
    tok = train_tokenizer(texts + [m["content"] for c in chats for m in c], os.path.join(root, "tok-src"), VOCAB)
    keep_in_run(tok, os.path.join(run_dir, "tokenizer"), None)
    cfg = load_config(overrides=[f"storage={root}", f"name={name}", f"tokenizer.path={run_dir}/tokenizer", *TINY])
    cfg = dataclasses.replace(cfg, model=cfg.model.with_vocab(tok.vocab_size))

    ids: list[int] = []
    for text, chat in zip(texts, itertools.cycle(chats)):
        ids += tok.encode(text)[:200] + [tok.eos_id] + tok.encode_chat(chat)[0]
    T = cfg.data.seq_len + 1
    rows = np.asarray(ids[: len(ids) // T * T], dtype=np.int32).reshape(-1, T)
    val = rows[-8:]
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_local(cfg, rows[:-8], val, log=lambda *_: None,
                    manifest={"tokenizer_sha256": tok.sha256, "eos_id": tok.eos_id, "columns": ["tokens"]})
    finally:
        torch.set_num_threads(n_threads)
    return run_dir
