"""Log-likelihood of continuations and greedy or sampled completions on a plain raylm model.

The one place that turns (context, continuation) text into scored tokens; the harness
adapter, the built-in scorers and the Ray actor pool all call it, so every path gives the
same numbers.

Tokens. A context starts with EOS, the token that precedes every document in the packed
pre-training rows, so the first word is scored as a document's first word. The context and
the whole text are encoded, and the continuation is the whole text's tokens past the
context's (lm-eval's rule: the continuation is scored as the tokenizer would split the full
text). When the split falls inside a token the whole text has no token boundary there
(the whole's first tokens differ from the context's); the continuation is then encoded on
its own and scored after the context's tokens, so the scored tokens still spell exactly
context + continuation.

Work units. `plan_units` groups requests that share a context (one item's choices) and sorts
the groups by length; a unit is a list of groups under a token budget. `score_unit` prefills
each context once into a KV cache (contexts of equal length together, as one batch), copies
the cache rows to every choice and scores all choices of those groups in one batched call
from the end of the context. The units are a pure function of the requests, and a unit's
arithmetic does not depend on where it runs, so a pool of actors returns exactly what one
process does.

Document masking. A model trained with data.document_mask=true never attended across an EOS:
the token after one starts a document of its own, at position 0, that sees nothing before it.
The EOS every context starts with is such a separator, so that model is scored with the mask
too (`doc_sep=`, the EOS id; raylm.eval.pool reads it from the checkpoint's config): the
logits are those of the masked training forward (raylm.model's `doc_sep=`), and a completion
is generated from the prompt's last document, as that forward would read it.

Vocabulary. A model's vocabulary is padded past the tokenizer's (model.vocab_size=0 rounds it
up to a multiple of 64), and those rows have no text. Log-probabilities are normalised over the
tokenizer's ids only (`vocab_size=`, the tokenizer's size) and a completion never picks a
padding id, as `raylm generate`, the serving engine and the HF and GGUF exports (which drop the
padding rows) do: the HF export, given the same ids, gives the same numbers. lm-eval's own `hf`
model on the export does not give the same ids: it puts no EOS before a non-empty context (the
export's tokenizer adds no token) and its BOS before an empty one and before rolling windows
(its model_args prefix_token_id=<the EOS id> makes those two match).
Bits per byte stays over the whole head, the training loss (raylm.eval.bpb says why).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raylm.errors import DataError

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def encode_pair(tok, context: str, continuation: str) -> Pair:
    """(context ids, continuation ids) of one request; see the module docstring."""
    # Trailing whitespace of the context belongs to the continuation (lm-eval's convention:
    # "Answer:" + " yes" and "Answer: " + "yes" then score the same tokens; "Answer: " + ""
    # scores " ", as lm-eval's _encode_pair moves it whatever the continuation).
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = [tok.eos_id] + tok.encode(context)
    whole = [tok.eos_id] + tok.encode(context + continuation)
    if whole[:len(ctx)] == ctx:
        return ctx, whole[len(ctx):]
    return ctx, tok.encode(continuation)  # the split falls inside one of the whole's tokens


def fit_to_length(ctx: list[int], cont: list[int], max_len: int) -> Pair:
    """Drop the context's oldest tokens until context + continuation fit the model."""
    if not cont:
        raise ValueError("an empty continuation has no log-likelihood to score")
    # The model reads context + continuation minus its last token (a target only).
    if len(cont) > max_len:  # task files are checked with their line (raylm.eval.tasks.check_mc_fits)
        raise DataError(f"a continuation of {len(cont)} tokens does not fit model.max_seq_len={max_len} "
                        f"after at least one context token")
    keep = max_len + 1 - len(cont)
    return (ctx[-keep:] if len(ctx) > keep else ctx), cont


def plan_units(pairs: list[Pair], max_len: int, batch_tokens: int = 4096) -> list[list]:
    """Work units: lists of groups [context, [[request index, continuation], ...]] sharing a
    context, sorted by context length and cut at about `batch_tokens` tokens a unit."""
    groups: dict[tuple, list] = {}
    for i, (ctx, cont) in enumerate(pairs):
        ctx, cont = fit_to_length(list(ctx), list(cont), max_len)
        groups.setdefault(tuple(ctx), []).append([i, cont])
    ordered = sorted(groups.items(), key=lambda g: (len(g[0]), max(len(c) for _, c in g[1]), g[1][0][0]))
    units, unit, size = [], [], 0
    for ctx, conts in ordered:
        cost = len(ctx) + len(conts) * max(len(c) for _, c in conts)
        if unit and size + cost > batch_tokens:
            units.append(unit)
            unit, size = [], 0
        unit.append([list(ctx), conts])
        size += cost
    if unit:
        units.append(unit)
    return units


def log_probs(model, h: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """float32 log-probabilities (..., vocab_size) of hidden states h (..., dim), normalised over
    the first `vocab_size` ids (the tokenizer's; see the module docstring); None: the whole head."""
    return F.log_softmax(model.logits(h)[..., :vocab_size].float(), -1)


@torch.no_grad()
def score_unit(model, unit: list, doc_sep: int | None = None, vocab_size: int | None = None) -> list[list]:
    """[[request index, log-likelihood, is_greedy], ...] for one work unit (see plan_units).
    `doc_sep`: score with document masking; `vocab_size`: the tokenizer's (see the module
    docstring), None only for a model whose vocabulary is not padded."""
    if doc_sep is not None:
        return _score_masked(model, unit, doc_sep, vocab_size)
    out = []
    i = 0
    while i < len(unit):  # runs of groups whose contexts have the same length share one prefill
        j = i
        while j < len(unit) and len(unit[j][0]) == len(unit[i][0]):
            j += 1
        out += _score_run(model, unit[i:j], vocab_size)
        i = j
    return out


def _score_run(model, groups: list, vocab_size: int | None) -> list[list]:
    device = model.tok_embeddings.weight.device
    n_ctx = len(groups[0][0])
    rows = [(g, idx, cont) for g, (_, conts) in enumerate(groups) for idx, cont in conts]
    longest = max(len(cont) for _, _, cont in rows)
    caches = model.make_caches(len(groups), n_ctx + longest)
    ctx = torch.tensor([c for c, _ in groups], device=device)
    h = model.hidden_states(ctx, caches, 0)
    first = log_probs(model, h[:, -1], vocab_size)  # (G, V): predicts each continuation's first token
    owner = torch.tensor([g for g, _, _ in rows], device=device)
    conts = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
    for r, (_, _, cont) in enumerate(rows):
        conts[r, :len(cont)] = torch.tensor(cont, device=device)
    logp = first[owner].unsqueeze(1)  # (R, 1, V)
    if longest > 1:
        for c in caches:  # every choice continues its own group's context
            c.k, c.v = c.k.index_select(0, owner), c.v.index_select(0, owner)
        # Right padding is harmless: a real token never attends to the positions after it.
        h = model.hidden_states(conts[:, :-1], caches, n_ctx)
        logp = torch.cat([logp, log_probs(model, h, vocab_size)], dim=1)  # (R, longest, V)
    return _results(rows, logp, conts)


def _results(rows: list, logp: torch.Tensor, conts: torch.Tensor) -> list[list]:
    """[[request index, log-likelihood, is_greedy], ...] of `rows` (_, request index,
    continuation) from their log-probabilities at the continuation positions (R, longest, V)."""
    picked = logp.gather(-1, conts.unsqueeze(-1)).squeeze(-1)  # (R, longest)
    best = logp.argmax(-1)
    out = []
    for r, (_, idx, cont) in enumerate(rows):
        n = len(cont)
        # float(): a Python double, so the value survives JSON and Ray exactly.
        out.append([idx, float(picked[r, :n].double().sum()), bool((best[r, :n] == conts[r, :n]).all())])
    return out


def _score_masked(model, groups: list, doc_sep: int, vocab_size: int | None) -> list[list]:
    """score_unit with document masking: one masked forward over context + continuation of
    each choice (the KV cache takes no mask), logits only where a continuation token is read."""
    device = model.tok_embeddings.weight.device
    rows = [(ctx, idx, cont) for ctx, conts in groups for idx, cont in conts]
    width = max(len(ctx) + len(cont) - 1 for ctx, _, cont in rows)  # the last token is a target only
    longest = max(len(cont) for _, _, cont in rows)
    tokens = torch.full((len(rows), width), doc_sep, dtype=torch.long, device=device)  # right padding: unread
    at = torch.zeros(len(rows), longest, dtype=torch.long, device=device)  # the columns that predict each token
    conts = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
    for r, (ctx, _, cont) in enumerate(rows):
        tokens[r, :len(ctx) + len(cont) - 1] = torch.tensor(ctx + cont[:-1], device=device)
        at[r, :len(cont)] = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=device)
        conts[r, :len(cont)] = torch.tensor(cont, device=device)
    h = model.hidden_states(tokens, doc_sep=doc_sep)
    h = h.gather(1, at.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (R, longest, dim)
    return _results(rows, log_probs(model, h, vocab_size), conts)


def score_pairs(model, pairs: list[Pair], batch_tokens: int = 4096, doc_sep: int | None = None,
                vocab_size: int | None = None) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context ids, continuation ids), in one process.
    `doc_sep`: the EOS id of a model trained with document masking; `vocab_size`: the
    tokenizer's, for a padded vocabulary (see the module docstring)."""
    results = [None] * len(pairs)
    for unit in plan_units(pairs, model.cfg.max_seq_len, batch_tokens):
        for idx, lp, greedy in score_unit(model, unit, doc_sep, vocab_size):
            results[idx] = (lp, greedy)
    return results


def fit_generation(ctx: list[int], max_new_tokens: int, max_len: int) -> tuple[list[int], int]:
    """(prompt ids, token budget) of a completion that fits the model: lm-eval's rule
    (HFLM.generate_until), the prompt cut to its last max_len - max_new_tokens tokens and the
    budget kept; a budget of the whole window or more keeps the prompt's last token and
    generates max_len - 1. `raylm eval`, the harness and in-training eval all cut here."""
    ctx = ctx[-max(1, max_len - max_new_tokens):]
    return ctx, max(0, min(max_new_tokens, max_len - len(ctx)))


def last_document(ctx: list[int], doc_sep: int) -> tuple[list[int], bool]:
    """(the tokens of `ctx` that its next token's prediction reads under document masking,
    whether the token generated next starts a document of its own): its last document, whose
    own closing separator belongs to it (raylm.model.document_positions)."""
    start = max((i + 1 for i, t in enumerate(ctx[:-1]) if t == doc_sep), default=0)
    return ctx[start:], ctx[-1] == doc_sep


@torch.no_grad()
def complete_until(model, tok, ctx: list[int], until: list[str], max_new_tokens: int,
                   temperature: float = 0.0, top_k: int = 0, seed: int = 0, doc_sep: int | None = None,
                   top_p: float = 1.0) -> str:
    """The text generated after `ctx` (ids), cut before the first of `until`; it also ends at
    EOS or the chat's end-of-turn token. temperature 0: greedy; top_k, top_p (1: off) as
    raylm.generate.sample_token. `doc_sep`: generate as the document-masked forward reads (see
    the module docstring)."""
    from raylm.generate import sample_token  # here: a pool actor that only scores never imports checkpointing
    from raylm.tokenizer import END

    device = model.tok_embeddings.weight.device
    ctx, max_new_tokens = fit_generation(ctx, max_new_tokens, model.cfg.max_seq_len)
    if max_new_tokens == 0:
        return ""
    restart = False  # the first token generated starts a new document (the prompt ends with doc_sep)
    if doc_sep is not None:
        ctx, restart = last_document(ctx, doc_sep)
    stops = {tok.eos_id, tok.special_ids.get(END)}
    gen = torch.Generator(device=device).manual_seed(seed)
    caches = model.make_caches(1, len(ctx) + max_new_tokens)
    h = model.hidden_states(torch.tensor([ctx], device=device), caches, 0)
    pos, out = len(ctx), []
    text = ""
    for step in range(max_new_tokens):
        # Only the tokenizer's ids: a vocabulary padded past it (to a multiple of 64) has rows with no text.
        nxt = sample_token(model.logits(h[0, -1])[:tok.vocab_size], temperature, top_k, gen, top_p)
        if nxt in stops:
            break
        out.append(nxt)
        text = tok.decode(out)
        if any(s and s in text for s in until):
            break
        if step == max_new_tokens - 1:
            break
        if restart:  # it sees nothing before it, at position 0
            caches, pos, restart = model.make_caches(1, max_new_tokens), 0, False
        h = model.hidden_states(torch.tensor([[nxt]], device=device), caches, pos)
        pos += 1
    for s in until:
        if s and s in text:
            text = text[:text.index(s)]
    return text
