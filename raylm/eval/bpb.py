"""Held-out loss, perplexity and bits per byte of a model on a corpus.

The corpus is anything the data stage reads (a file, directory or glob of .txt, .jsonl,
.jsonl.gz, .parquet; local or s3://), read with the data stage's own reader. Documents are
encoded and joined with EOS, as pre-training packs them, then cut into blocks of `seq_len`
+ 1 tokens; every full block is scored (the tail that does not fill one is left out).

Bits per byte make models with different tokenizers comparable:
    bpb = (mean loss in nats per token) * (tokens / UTF-8 byte of the corpus) / ln 2
"""

from __future__ import annotations

import math

import torch

from raylm import storage
from raylm.data import DataError, list_corpus
from raylm.documents import parse_documents


def corpus_documents(path: str, text_field: str = "text", s3=None) -> list[str]:
    """Every document of a corpus, in the data stage's stable order; a bad record is an
    error naming its file and line."""
    docs = []
    for f in list_corpus(path, s3):
        for _, doc in parse_documents(f.uri, storage.read_bytes(f.uri, s3), text_field):
            if isinstance(doc, DataError):
                raise doc
            docs.append(doc)
    return docs


@torch.no_grad()
def token_loss(model, ids: list[int], seq_len: int, batch_rows: int = 16) -> tuple[float, int]:
    """(summed loss in nats, tokens scored) over the full blocks of `ids`."""
    n = (len(ids) - 1) // seq_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one block of seq_len={seq_len} + 1")
    device = model.tok_embeddings.weight.device
    x = torch.tensor(ids[: n * seq_len + 1], device=device)
    total, count = 0.0, 0
    for i in range(0, n, batch_rows):
        rows = torch.stack([x[j * seq_len:(j + 1) * seq_len + 1] for j in range(i, min(n, i + batch_rows))])
        _, loss = model(rows[:, :-1], rows[:, 1:])
        total += float(loss) * rows[:, 1:].numel()
        count += rows[:, 1:].numel()
    return total, count


def bits_per_byte(model, tok, texts: list[str], seq_len: int | None = None, batch_rows: int = 16,
                  source: str = "the corpus") -> dict:
    """Loss (nats per token), perplexity and bits per byte of `texts` under `model`; `source`
    names the texts (a corpus path) in errors."""
    seq_len = seq_len or model.cfg.max_seq_len
    ids: list[int] = []
    for k, text in enumerate(texts):
        if k:
            ids.append(tok.eos_id)
        ids += tok.encode(text)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if not n_bytes:
        raise DataError(f"{source}: holds no text")
    if len(ids) < seq_len + 1:  # too short to score a single block: the user's corpus, not a bug
        raise DataError(f"{source}: {len(ids)} tokens, too few to score one block; give a corpus of at least "
                        f"{seq_len + 1} tokens (seq_len={seq_len} + 1)")
    total, count = token_loss(model, ids, seq_len, batch_rows)
    nats = total / count
    tokens_per_byte = len(ids) / n_bytes
    return {"loss": nats, "ppl": math.exp(min(nats, 50)), "bpb": nats * tokens_per_byte / math.log(2),
            "tokens_per_byte": tokens_per_byte, "tokens_scored": count, "bytes": n_bytes, "seq_len": seq_len}


def corpus_bpb(model, tok, path: str, text_field: str = "text", seq_len: int | None = None, s3=None) -> dict:
    return bits_per_byte(model, tok, corpus_documents(path, text_field, s3), seq_len, source=path)
