"""Does the best learning rate stay put as the model widens? Standard parametrisation
against muP (`model.width_scaling`), on CPU, in this process (no Ray).

The sweep is `raylm.mup_sweep` (shared with tests/unit/test_mup_transfer.py): for each
parametrisation and each width, the same learning-rate grid is trained for --steps optimizer
steps (`raylm.train.train_step`, with the run's warmup and cosine schedule) and scored by the
mean loss on held-out batches. Both widths share depth, head size (heads are added as the
model widens), data, seed and batches; muP's base width is the narrow one, where muP is the
standard model exactly (tests/unit/test_mup.py), so that row is trained once and shared.

--corpus builtin (the default): the UTF-8 bytes of the built-in offline corpus (vocabulary
256). --corpus markov: the generated Markov chain the unit test uses, whose loss curves are
far sharper; run it with the test's sizes and other --seed/--data-seed values to see how
robust the test's margin is. `shift_log2` is how many doublings the best grid point moves
from the narrow width to the wide one, `fitted_shift_log2` the same for the vertex of a
parabola through the best point and its neighbours; muP aims at 0.

    python benchmarks/mup_transfer.py --out benchmarks/results/cpu-mup-transfer.json \\
        --plot benchmarks/results/cpu-mup-transfer.png
    python benchmarks/mup_transfer.py --corpus markov --seq 32 --steps 30 --val-batches 4 \\
        --lrs 0.001953125 0.00390625 0.0078125 0.015625 0.03125 0.0625 0.125 \\
        --seed 3 --data-seed 3
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.emit import run_and_emit  # noqa: E402
from raylm.errors import ConfigError  # noqa: E402
from raylm.mup_sweep import SweepConfig, batches, best_log2_lr, markov_tokens, sweep  # noqa: E402


def corpus_tokens(n_bytes: int) -> torch.Tensor:
    from raylm.corpus import iter_builtin_documents

    chunks, size = [], 0
    for text in iter_builtin_documents():
        b = text.encode()
        chunks.append(b)
        size += len(b)
        if size >= n_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:n_bytes]), dtype=torch.uint8).long()


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=["builtin", "markov"], default="builtin",
                   help="builtin: the offline corpus's bytes; markov: the generated chain of "
                        "tests/unit/test_mup_transfer.py (vocabulary --vocab, 4 successors a token)")
    p.add_argument("--vocab", type=int, default=64, help="--corpus markov's vocabulary")
    p.add_argument("--data-seed", type=int, default=0, help="--corpus markov's chain and sample")
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--widths", type=int, nargs=2, default=[32, 128])
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lrs", type=float, nargs="+", default=[2.0 ** k for k in range(-10, -1)])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--plot", default="")
    args = p.parse_args()
    if len({f"{lr:.6g}" for lr in args.lrs}) != len(args.lrs) or list(args.lrs) != sorted(args.lrs):
        # Each rate is a key of val_loss_by_lr and a point of one line across the grid.
        p.error(f"--lrs {' '.join(map(str, args.lrs))}: give distinct rates (to 6 significant digits) in ascending order")
    torch.set_num_threads(args.threads)
    vocab = 256 if args.corpus == "builtin" else args.vocab
    try:  # settings that would run but not measure transfer: one line, not a traceback
        cfg = SweepConfig(widths=tuple(args.widths), lrs=tuple(args.lrs), vocab_size=vocab, head_dim=args.head_dim,
                          n_layers=args.layers, seq_len=args.seq, batch_size=args.batch, steps=args.steps,
                          warmup_steps=args.steps // 10, seed=args.seed)
        need = (args.steps + args.val_batches) * args.batch * (args.seq + 1)
        if args.corpus == "builtin":
            tokens = corpus_tokens(need)
        else:
            tokens = markov_tokens(vocab, 4, need, args.data_seed)
        train = batches(tokens, cfg, args.steps)
        val = batches(tokens, cfg, args.val_batches, offset=args.steps * args.batch * (args.seq + 1))
    except ConfigError as e:
        p.error(str(e))
    t0 = time.time()
    names = {"none": "standard", "mup": "muP"}
    log = lambda s, w, losses: print(names[s], w, [round(v, 4) for v in losses], file=sys.stderr)  # noqa: E731
    result = sweep(cfg, train, val, progress=log, log=lambda s: print(s, file=sys.stderr, flush=True))
    rows = []
    for (scaling, width), losses in result.items():
        # A width where every rate diverged has no best rate (null): its lowest "loss" is inf or NaN.
        finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
        best = min(finite, key=losses.__getitem__) if finite else None
        fitted_lr = best_log2_lr(args.lrs, losses)
        rows.append({"parametrisation": names[scaling], "width": width,
                     "best_lr": None if best is None else args.lrs[best],
                     "best_val_loss": None if best is None else round(losses[best], 4),
                     "fitted_best_log2_lr": round(fitted_lr, 2) if math.isfinite(fitted_lr) else None,
                     "val_loss_by_lr": {f"{lr:.6g}": round(v, 4) for lr, v in zip(args.lrs, losses)}})
    shift, fitted = {}, {}
    for name in ("standard", "muP"):
        mine = [r for r in rows if r["parametrisation"] == name]
        narrow, wide = mine[0], mine[-1]  # the base width and the widest
        both = wide["best_lr"] is not None and narrow["best_lr"] is not None
        shift[name] = round(math.log2(wide["best_lr"] / narrow["best_lr"]), 2) if both else None
        fitted[name] = round(wide["fitted_best_log2_lr"] - narrow["fitted_best_log2_lr"], 2) if both else None
    if args.plot:
        plot(rows, args.lrs, args.plot)
    return {"benchmark": "mup_transfer", "rows": rows, "shift_log2": shift, "fitted_shift_log2": fitted,
            "seconds": round(time.time() - t0, 1), "settings": {k: v for k, v in vars(args).items()}}


def plot(rows: list[dict], lrs: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100, sharey=True)
    for ax, name in zip(axes, ("standard", "muP")):
        for r in rows:
            if r["parametrisation"] != name:
                continue
            ys = list(r["val_loss_by_lr"].values())
            best = "every rate diverged" if r["best_lr"] is None else f"best {r['best_lr']:.2g}"
            ax.plot(lrs, ys, "o-", label=f"width {r['width']} ({best})")
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out loss")
    finite = [v for r in rows for v in r["val_loss_by_lr"].values() if math.isfinite(v)]
    if finite:  # every rate may have diverged
        axes[0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    run_and_emit(main)
