"""Held-out loss, perplexity and bits per byte of a model on a corpus.

The corpus is anything the data stage reads (a file, directory or glob of .txt, .jsonl,
.jsonl.gz, .parquet; local or s3://), read with the data stage's own reader. Documents are
encoded as pre-training encodes them (plain text, `Tokenizer.encode_plain`: a chat marker
string in one is ordinary pieces) and joined as pre-training packs them, each after EOS (the
first document too, so its first token is scored after EOS as lm-eval scores a document after
its prefix token).
Every token of every document is scored exactly once: in blocks of `seq_len` targets, each
after the block's own preceding tokens, and the tail that does not fill a block last, after
as much context as fits (the stream's last `seq_len` inputs, as lm-eval's rolling windows give
their last window). EOS targets are not scored: they carry no bytes, and lm-eval scores a
document's own tokens only.

A model trained with document masking (data.document_mask=true: attention stays within each
packed document and positions restart at each one) is scored as it trained: with the same
mask (`document_mask=True`; `trained_with_document_mask` reads it from a checkpoint's
meta.json), so no document is read with its neighbours' tokens as context, which such a
model never saw; without the mask its bpb was several times what its val_loss implies. Its
documents are joined with two EOS, so each document's first token is predicted from an EOS
that is a document of its own (position 0, nothing else visible), as the first document's
is: every document is scored as if it were alone, whatever precedes it. A model trained
without the mask is scored exactly as before.

Bits per byte make models with different tokenizers comparable. As lm-eval defines it
(its bits_per_byte aggregation over loglikelihood_rolling documents):
    bpb = (summed loss in nats over the documents' tokens) / (UTF-8 bytes of the documents) / ln 2
`loss` is that sum per scored token, `ppl` its exp.

Vocabulary. The softmax runs over every row of the head, the rows that pad the vocabulary
past the tokenizer's (model.vocab_size=0 rounds it up to a multiple of 64) included, unlike
log-likelihood scoring (raylm.eval.loglik: the built-in tasks, and lm-eval's through
`--model raylm` or on the HF export), which normalises over the tokenizer's ids. That is
deliberate: bits per byte measures the training objective, and `loss` here is the quantity
training minimised and logged as val_loss (raylm.losses), so a corpus's numbers line up with
the training curve and with the run's other checkpoints. The two differ by -ln(1 - p_pad)
nats a token, p_pad the probability the model leaves on the padding ids, so this bpb is never
below lm-eval's bits_per_byte of the same text; training drives p_pad toward 0 (a 2-layer
model of 420 ids padded to 448, trained 200 steps: 2.5e-5 of its bpb), and a vocabulary that
is not padded gives identical numbers.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from raylm import storage
from raylm.data import DataError, list_corpus
from raylm.documents import parse_documents
from raylm.progress import Progress


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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
def token_loss(model, ids: list[int], seq_len: int, batch_rows: int = 16, skip: int | None = None,
               doc_sep: int | None = None, progress: Progress | None = None) -> tuple[float, int]:
    """(summed loss in nats, tokens scored) of every target ids[1:] except those equal to
    `skip`: full blocks of `seq_len` targets, then the tail after as much context as fits.
    `doc_sep`: document masking within each window (raylm.model's `doc_sep=`). `progress`:
    updated with the targets passed after each batch of windows (its total: len(ids) - 1)."""
    n = len(ids) - 1  # targets
    if n < 1:
        raise ValueError("fewer than 2 tokens: nothing to score")
    windows = [(s, 0) for s in range(0, n - seq_len + 1, seq_len)]  # (first input, targets already scored)
    if len(windows) * seq_len < n:
        s = max(0, n - seq_len)
        windows.append((s, len(windows) * seq_len - s))
    width = min(seq_len, n)
    device = model.tok_embeddings.weight.device
    x = torch.tensor(ids, device=device)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_rows):
        batch = windows[i:i + batch_rows]
        rows = torch.stack([x[s:s + width + 1] for s, _ in batch])
        targets = rows[:, 1:].clone()
        for r, (_, done) in enumerate(batch):
            targets[r, :done] = -100
        if skip is not None:
            targets[targets == skip] = -100
        logits, _ = model(rows[:, :-1]) if doc_sep is None else model(rows[:, :-1], doc_sep=doc_sep)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none")
        total += float(nll.double().sum())
        count += int((targets != -100).sum())
        if progress is not None:
            progress.update(min(n, batch[-1][0] + width))
    return total, count


def trained_with_document_mask(meta: dict) -> bool:
    """Whether the checkpoint whose meta.json is `meta` trained with document masking: an SFT
    checkpoint always (its packed conversations are masked whatever data.document_mask says,
    raylm.objectives.make_objective), any other its config's data.document_mask."""
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if config.get("stage") == "sft":
        return True
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    return bool(data.get("document_mask", False))


def bits_per_byte(model, tok, texts: list[str], seq_len: int | None = None, batch_rows: int = 16,
                  source: str = "the corpus", document_mask: bool = False, log=_to_stderr,
                  every_s: float | None = None) -> dict:
    """Loss (nats per token), perplexity and bits per byte of `texts` under `model`; `source`
    names the texts (a corpus path) in errors. `document_mask`: the model trained with
    data.document_mask=true, so it is scored with the same mask (see the module docstring).
    Scoring a large corpus takes minutes to hours: its progress goes to `log` (stderr by
    default: a command's stdout may be its results), a line every `every_s` seconds
    (raylm.progress's default when None), or a bar on a terminal."""
    seq_len = seq_len or model.cfg.max_seq_len
    ids: list[int] = []
    for text in texts:
        # With the mask, the EOS that ends the previous document belongs to it (raylm.model):
        # a second EOS, alone, predicts this document's first token, as the first EOS does for
        # the first document. EOS targets are not scored, so the extra one adds nothing.
        sep = [tok.eos_id, tok.eos_id] if document_mask and ids else [tok.eos_id]
        ids += sep + tok.encode_plain(text)  # plain, as pre-training encodes documents
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if not n_bytes:
        raise DataError(f"{source}: holds no text")
    progress = Progress(f"eval: bpb of {storage.redact_url(source)}", len(ids) - 1, unit="tokens", log=log,
                        stream=sys.stderr, every_s=every_s)
    try:
        total, count = token_loss(model, ids, seq_len, batch_rows, skip=tok.eos_id,
                                  doc_sep=tok.eos_id if document_mask else None, progress=progress)
    finally:
        progress.close()
    nats = total / count
    return {"loss": nats, "ppl": math.exp(min(nats, 50)), "bpb": total / n_bytes / math.log(2),
            "tokens_per_byte": count / n_bytes, "tokens_scored": count, "bytes": n_bytes, "seq_len": seq_len,
            "document_mask": document_mask}


def corpus_bpb(model, tok, path: str, text_field: str = "text", seq_len: int | None = None, s3=None,
               document_mask: bool = False, log=_to_stderr, every_s: float | None = None) -> dict:
    """`bits_per_byte` of a corpus; pass `document_mask=trained_with_document_mask(meta)` for a
    checkpoint's model."""
    return bits_per_byte(model, tok, corpus_documents(path, text_field, s3), seq_len, source=path,
                         document_mask=document_mask, log=log, every_s=every_s)
