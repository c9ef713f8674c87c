"""The built-in scorers inside the training loop (eval.every), on the model being trained.

Every rank takes part: the model may be FSDP-sharded, and a sharded forward pass needs all
ranks at once. Items are dealt round-robin to ranks and each rank gets the same number
(short ranks repeat an item with weight 0), so all ranks make the same number of forward
calls; the per-task sums are then all-reduced. Scoring uses plain forward passes (the
model's root `forward`, which FSDP wraps), not the KV cache of raylm.eval.loglik, whose
methods bypass FSDP's hooks. It scores the same tokens as `raylm eval`, and a model that
trains with data.document_mask=true with that mask (the forward's `doc_sep=`), as `raylm eval`
scores its checkpoint (raylm.eval.loglik), and over the tokenizer's ids only, as it does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raylm.config import to_dict
from raylm.errors import ConfigError
from raylm.eval.loglik import encode_pair, fit_generation, fit_to_length
from raylm.eval.pool import document_sep
from raylm.eval.scorers import _argmax
from raylm.eval.tasks import (GEN_METRICS, MC_METRICS, check_mc_fits, check_task_names, read_gen_task, read_mc_task,
                              task_name)

CHUNK = 16  # items per forward pass


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _dealt(n: int, rank: int, world: int) -> list[tuple[int, float]]:
    """(item index, weight) of this rank: items rank, rank + world, ..., padded to equal counts."""
    mine = list(range(rank, n, world))
    per_rank = math.ceil(n / world)
    return [(i, 1.0) for i in mine] + [(0, 0.0)] * (per_rank - len(mine))


def _stderr(k: float, n: float) -> float | None:
    """lm-eval's stderr of a mean of 0/1 values (sample std / sqrt(n)), from the count of ones."""
    if n < 2:
        return None
    p = k / n
    return math.sqrt(p * (1 - p) * n / (n - 1) / n)


class TrainingEval:
    """Called as `evaluator(model, step)` on every rank; returns the same metrics row on each."""

    def __init__(self, cfg, tok):
        ec = cfg.eval
        if ec.gen_tasks and ec.max_new_tokens >= cfg.model.max_seq_len:
            raise ConfigError(f"eval.max_new_tokens={ec.max_new_tokens} leaves no room for a prompt in "
                              f"model.max_seq_len={cfg.model.max_seq_len}; set it below that")
        check_task_names(ec.mc_tasks, ec.gen_tasks)  # rows are keyed by task name: one would replace another
        self.tok, self.max_new_tokens = tok, ec.max_new_tokens
        mc_files = {p: read_mc_task(p, cfg.s3)[:ec.max_items] for p in ec.mc_tasks}
        for p, items in mc_files.items():
            check_mc_fits(p, items, tok, cfg.model.max_seq_len)
        self.mc = {task_name(p): items for p, items in mc_files.items()}
        self.gen = {task_name(p): read_gen_task(p, cfg.s3)[:ec.max_items] for p in ec.gen_tasks}
        self.max_len = cfg.model.max_seq_len
        # Read from the config as `raylm eval` reads it from the checkpoint's meta.json: both mask alike.
        self.doc_sep = document_sep({"config": to_dict(cfg)}, tok)
        # Each item's choices as (context ids, continuation ids), encoded once.
        self.mc_pairs = {t: [[fit_to_length(*encode_pair(tok, it.context, c), self.max_len) for c in it.choices]
                             for it in items] for t, items in self.mc.items()}

    @torch.no_grad()
    def __call__(self, model, step: int) -> dict:
        device = next(model.parameters()).device
        rank, world = _rank_world()
        sums = []  # per task: correct, correct_norm (or contains), weight
        for task, items in self.mc.items():
            sums.append(self._mc(model, task, _dealt(len(items), rank, world), device))
        for task, items in self.gen.items():
            sums.append(self._gen(model, items, _dealt(len(items), rank, world), device))
        t = torch.tensor(sums, dtype=torch.float64, device=device).reshape(-1, 3)
        if world > 1:
            dist.all_reduce(t)
        row = {"kind": "eval", "step": step}
        names = [(task, MC_METRICS) for task in self.mc] + [(task, GEN_METRICS) for task in self.gen]
        for (task, metrics), (a, b, n) in zip(names, t.tolist()):
            for metric, k in zip(metrics, (a, b)):
                row[f"eval_{task}_{metric}"] = k / n
                row[f"eval_{task}_{metric}_stderr"] = _stderr(k, n)
            row[f"eval_{task}_n"] = int(n)
        return row

    def _logprobs(self, model, pairs: list, device) -> list[float]:
        width = max(len(c) + len(x) - 1 for c, x in pairs)  # the last token is a target only
        rows = torch.full((len(pairs), width), self.tok.pad_id, dtype=torch.long, device=device)
        for r, (c, x) in enumerate(pairs):
            rows[r, :len(c) + len(x) - 1] = torch.tensor(c + x[:-1], device=device)
        logits, _ = model(rows, doc_sep=self.doc_sep)
        # Normalised over the tokenizer's ids, not the rows that pad the vocabulary past them
        # (raylm.eval.loglik's `vocab_size`).
        logp = F.log_softmax(logits[..., :self.tok.vocab_size].float(), -1)
        return [float(logp[r, len(c) - 1 + torch.arange(len(x), device=device),
                          torch.tensor(x, device=device)].double().sum()) for r, (c, x) in enumerate(pairs)]

    def _mc(self, model, task: str, dealt: list, device) -> list[float]:
        items, pairs = self.mc[task], self.mc_pairs[task]
        acc = acc_norm = weight = 0.0
        for k in range(0, len(dealt), CHUNK):
            chunk = dealt[k:k + CHUNK]
            flat = [p for i, _ in chunk for p in pairs[i]]
            lps = self._logprobs(model, flat, device)
            j = 0
            for i, w in chunk:
                ll = lps[j:j + len(items[i].choices)]
                j += len(ll)
                acc += w * (_argmax(ll) == items[i].gold)
                acc_norm += w * (_argmax([lp / len(c) for lp, c in zip(ll, items[i].choices)]) == items[i].gold)
                weight += w
        return [acc, acc_norm, weight]

    def _gen(self, model, items: list, dealt: list, device) -> list[float]:
        """Greedy, a fixed number of steps for every item (all ranks stay in step)."""
        from raylm.tokenizer import END

        tok = self.tok
        stops = {tok.eos_id, tok.special_ids.get(END)}
        em = has = weight = 0.0
        for k in range(0, len(dealt), CHUNK):
            chunk = dealt[k:k + CHUNK]
            # The prompts and budget of `raylm eval` (complete_until): every prompt holds at least
            # EOS, so the budget is the same for all.
            fitted = [fit_generation([tok.eos_id] + tok.encode(items[i].context), self.max_new_tokens, self.max_len)
                      for i, _ in chunk]
            ctxs, steps = [c for c, _ in fitted], fitted[0][1]
            lengths = torch.tensor([len(c) for c in ctxs], device=device)
            rows = torch.full((len(ctxs), int(lengths.max()) + steps), tok.pad_id, dtype=torch.long, device=device)
            for r, c in enumerate(ctxs):
                rows[r, :len(c)] = torch.tensor(c, device=device)
            start = lengths.clone()
            for _ in range(steps):
                logits, _ = model(rows[:, :int(lengths.max())], doc_sep=self.doc_sep)
                # Ids of a vocabulary padded past the tokenizer's (to a multiple of 64) are never
                # picked: the tokenizer cannot decode them.
                nxt = logits[torch.arange(len(ctxs), device=device), lengths - 1, :tok.vocab_size].argmax(-1)
                rows[torch.arange(len(ctxs), device=device), lengths] = nxt
                lengths += 1
            for r, (i, w) in enumerate(chunk):
                out = []
                for t in rows[r, int(start[r]):int(lengths[r])].tolist():
                    if t in stops:
                        break
                    out.append(t)
                text = tok.decode(out).split("\n\n")[0]
                em += w * any(text.strip() == a.strip() for a in items[i].answers)
                has += w * any(a in text for a in items[i].answers)
                weight += w
        return [em, has, weight]


def make_training_eval(cfg, log=print):
    """The evaluator for cfg.eval, or None when eval.every is 0."""
    if not cfg.eval.every:
        return None
    from raylm.generate import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer.path, cfg.s3)
    return TrainingEval(cfg, tok)
