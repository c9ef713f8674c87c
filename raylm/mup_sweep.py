"""Learning-rate sweeps across widths: where is the best rate, and does it move as the model
widens? The measurement behind `model.width_scaling` (muP against the standard
parametrisation), shared by benchmarks/mup_transfer.py and tests/unit/test_mup_transfer.py.

Single process, CPU, no Ray: each point is a short run of `raylm.train.train_step` (the step
every run takes, with the run's warmup and cosine schedule) scored by the mean loss on
held-out batches. Every point of a sweep shares depth, head size (heads are added as the
model widens, as muP assumes), data, batches and seed, so the learning rate, the width and
the parametrisation are the only things that change.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from raylm.config import ModelConfig, TrainConfig
from raylm.errors import ConfigError
from raylm.model import build_model
from raylm.objectives import NextTokenObjective
from raylm.progress import Progress
from raylm.train import evaluate, lr_at, make_optimizer, train_step


@dataclass(frozen=True)
class SweepConfig:
    """The model and run shared by every point of a sweep."""

    widths: tuple[int, ...] = (32, 128)  # the first is muP's base width (the proxy)
    lrs: tuple[float, ...] = tuple(2.0 ** k for k in range(-10, -1))  # powers of 2: shifts count doublings
    vocab_size: int = 256  # bytes: no tokenizer to train
    head_dim: int = 16  # fixed: widening adds heads
    n_layers: int = 2
    seq_len: int = 64
    batch_size: int = 8
    steps: int = 50
    warmup_steps: int = 5  # a tenth of the steps, as a short run would use
    min_lr_ratio: float = 0.1
    tie_embeddings: bool = True  # raylm's default model
    seed: int = 0  # the weights' initialisation

    def __post_init__(self) -> None:
        """A sweep that would run but not measure what it says is refused, naming the setting:
        a width that is not a whole number of heads of head_dim (the model would change its head
        size, or have none), widths that repeat (one row would replace the other), rates that
        are not positive (no log2) or repeat, and no steps (every rate scores the initial model)."""
        for name in ("vocab_size", "head_dim", "n_layers", "seq_len", "batch_size", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected an integer >= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"warmup_steps={self.warmup_steps!r}: expected 0 to steps={self.steps}")
        widths = tuple(self.widths)
        if len(widths) < 2 or list(widths) != sorted(set(widths)):
            raise ConfigError(f"widths={widths}: give two or more distinct widths in ascending order "
                              f"(the first is muP's base width)")
        for w in widths:
            if isinstance(w, bool) or not isinstance(w, int) or w < self.head_dim or w % self.head_dim:
                raise ConfigError(f"widths={widths}: width {w!r} is not a multiple of head_dim={self.head_dim} "
                                  f"(widening adds heads of a fixed size)")
        lrs = tuple(self.lrs)
        if not lrs or not all(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0 for lr in lrs):
            raise ConfigError(f"lrs={lrs}: give one or more finite learning rates > 0")
        if list(lrs) != sorted(set(lrs)):
            raise ConfigError(f"lrs={lrs}: give distinct rates in ascending order")


def model_config(cfg: SweepConfig, width: int, scaling: str) -> ModelConfig:
    return ModelConfig(vocab_size=cfg.vocab_size, dim=width, n_layers=cfg.n_layers, n_heads=width // cfg.head_dim,
                       max_seq_len=cfg.seq_len, tie_embeddings=cfg.tie_embeddings, width_scaling=scaling,
                       base_dim=cfg.widths[0])


def markov_tokens(vocab_size: int, successors: int, n: int, seed: int) -> torch.Tensor:
    """n tokens of a random first-order Markov chain: each token is followed by one of
    `successors` tokens drawn for it, with uneven probabilities. A generated language with
    nothing to download, whose best achievable loss (about 1 nat for 4 successors) lies far
    below the uniform one (ln vocab_size): a learning rate that is too small or too large
    shows up as a loss a whole nat or more worse, not as the hundredths that separate rates on
    a few steps of natural text."""
    import bisect

    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab_size, (vocab_size, successors), generator=g).tolist()
    probs = torch.rand(vocab_size, successors, generator=g) ** 2
    cum = (probs / probs.sum(1, keepdim=True)).cumsum(1).tolist()
    u = torch.rand(n, generator=g).tolist()
    out = [int(torch.randint(0, vocab_size, (1,), generator=g))]
    for t in range(1, n):
        row = out[-1]
        out.append(succ[row][min(bisect.bisect_left(cum[row], u[t]), successors - 1)])
    return torch.tensor(out, dtype=torch.long)


def batches(tokens: torch.Tensor, cfg: SweepConfig, n: int, offset: int = 0) -> list[dict]:
    """n batches of cfg.batch_size rows of seq_len + 1 tokens, read in order from `offset`."""
    if n < 1:  # no held-out batch scores every rate 0.0, a perfect loss
        raise ConfigError(f"{n} batches: need at least one")
    size = n * cfg.batch_size * (cfg.seq_len + 1)
    if offset + size > tokens.numel():
        raise ConfigError(f"{n} batches from token {offset} need {offset + size} tokens, got {tokens.numel()}: "
                          f"fewer steps or batches, or shorter or fewer rows")
    rows = tokens[offset:offset + size].view(n, cfg.batch_size, cfg.seq_len + 1)
    return [{"tokens": r} for r in rows]


def final_loss(cfg: SweepConfig, width: int, scaling: str, lr: float, train: list[dict], val: list[dict]) -> float:
    """Held-out loss after cfg.steps steps at peak rate `lr`; inf where training diverged."""
    tc = TrainConfig(lr=lr, max_steps=cfg.steps, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
                     weight_decay=0.0, num_workers=1, micro_batch_size=cfg.batch_size,
                     global_batch_size=cfg.batch_size)
    model = build_model(model_config(cfg, width, scaling), seed=cfg.seed)
    opt = make_optimizer(model, tc, torch.device("cpu"))
    obj = NextTokenObjective()
    for step in range(cfg.steps):
        stats = train_step(model, opt, [train[step % len(train)]], obj, lr_at(step, tc), tc.grad_clip)
        if not math.isfinite(stats.loss):
            return float("inf")
    with torch.no_grad():
        loss, _ = evaluate(model, obj, val)
    return loss if math.isfinite(loss) else float("inf")


def sweep(cfg: SweepConfig, train: list[dict], val: list[dict], scalings=("none", "mup"),
          progress=None, log=None, every_s: float | None = None) -> dict[tuple[str, int], list[float]]:
    """{(scaling, width): held-out loss at each of cfg.lrs}. At the base width every scaling
    is the standard model exactly (tests/unit/test_mup.py), so that row is trained once.
    `progress(scaling, width, losses)` after each row; `log`: a raylm.progress line of the
    short runs done (and the time left) at most every `every_s` seconds, for a row of a wide
    model takes minutes."""
    if not train or not val:  # no held-out batch would score every rate 0.0, a perfect loss
        raise ConfigError(f"a sweep needs training and held-out batches, got {len(train)} and {len(val)}")
    out: dict[tuple[str, int], list[float]] = {}
    rows = len(scalings) * len(cfg.widths) - (len(scalings) - 1 if "none" in scalings else 0)
    runs = Progress("sweep", rows * len(cfg.lrs), unit="runs", log=log, stream=sys.stderr,
                    tty=False, every_s=every_s) if log is not None else None
    for scaling in scalings:
        for width in cfg.widths:
            same = ("none", width) if width == cfg.widths[0] and scaling != "none" else None
            if same in out:
                out[(scaling, width)] = list(out[same])
            else:
                losses = []
                for lr in cfg.lrs:
                    losses.append(final_loss(cfg, width, scaling, lr, train, val))
                    if runs is not None:
                        runs.update(runs.done + 1, note=f"{scaling} width {width} lr {lr:.3g}")
                out[(scaling, width)] = losses
            if progress is not None:
                progress(scaling, width, out[(scaling, width)])
    return out


def best_log2_lr(lrs, losses) -> float:
    """log2 of the best rate: the vertex of the parabola through the grid's best point and
    its two neighbours (in log2 lr), so that two near-equal points do not decide by a hair
    which way the optimum moved. At an end of the grid, that end: the optimum is not
    bracketed, and callers that need it to be check `bracketed`. The grid may be spaced
    unevenly and given in any order (benchmarks/mup_transfer.py --lrs takes any rates): the
    neighbours are the next smaller and larger rates. A rate given twice keeps its best loss.
    A NaN loss is a diverged run, as inf is; with no finite loss there is no best rate: NaN
    (every rate diverging at both widths read as a shift of 0, perfect transfer)."""
    best: dict[float, float] = {}
    for lr, loss in zip(lrs, losses, strict=True):
        x = math.log2(lr)
        best[x] = min(loss if math.isfinite(loss) else math.inf, best.get(x, math.inf))
    xs = sorted(best)
    losses = [best[x] for x in xs]
    i = min(range(len(losses)), key=losses.__getitem__)
    if not math.isfinite(losses[i]):
        return math.nan
    if i == 0 or i == len(xs) - 1 or not all(math.isfinite(losses[j]) for j in (i - 1, i + 1)):
        return xs[i]
    (x0, y0), (x1, y1), (x2, y2) = ((xs[j], losses[j]) for j in (i - 1, i, i + 1))
    # Newton's form p(x) = y0 + d1 (x - x0) + a (x - x0)(x - x1); its vertex is where p' = 0.
    d1, d2 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    a = (d2 - d1) / (x2 - x0)  # > 0: y1 is the lowest of the three
    return (x0 + x1) / 2 - d1 / (2 * a) if a > 0 else x1


def bracketed(losses) -> bool:
    """Whether the grid's best point has a worse point on each side (NaN counts as diverged;
    with no finite loss there is no best point)."""
    losses = [v if math.isfinite(v) else math.inf for v in losses]
    i = min(range(len(losses)), key=losses.__getitem__)
    return math.isfinite(losses[i]) and 0 < i < len(losses) - 1


def shift_log2(cfg: SweepConfig, result: dict[tuple[str, int], list[float]], scaling: str) -> float:
    """Doublings the best rate moves from the narrowest width to the widest (fitted optimum);
    NaN where every rate diverged at either width."""
    lo, hi = result[(scaling, cfg.widths[0])], result[(scaling, cfg.widths[-1])]
    return best_log2_lr(cfg.lrs, hi) - best_log2_lr(cfg.lrs, lo)
