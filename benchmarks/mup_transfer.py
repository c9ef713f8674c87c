"""Does the best learning rate stay put as the model widens? Standard parametrisation
against muP (`model.width_scaling`), on CPU, in this process (no Ray).

For each parametrisation and each width, the same learning-rate grid is trained for --steps
optimizer steps (`raylm.train.train_step`, the step every run takes, with the run's warmup
and cosine schedule), and scored by the mean loss on held-out batches. Both widths share
depth, head size (heads are added as the model widens, as muP assumes here), data, seed and
batches; muP's base width is the narrow one, so at that width both parametrisations are the
same model and their rows must agree.

The tokens are the UTF-8 bytes of the built-in offline corpus (vocabulary 256): nothing to
download, no tokenizer to train. The best learning rate of each row is the grid point with
the lowest held-out loss, and `shift_log2` how many doublings it moves from the narrow width
to the wide one; muP aims at 0.

    python benchmarks/mup_transfer.py --out benchmarks/results/cpu-mup-transfer.json \\
        --plot benchmarks/results/cpu-mup-transfer.png
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
from raylm.config import ModelConfig, TrainConfig  # noqa: E402
from raylm.model import build_model  # noqa: E402
from raylm.objectives import NextTokenObjective  # noqa: E402
from raylm.train import evaluate, lr_at, make_optimizer, train_step  # noqa: E402


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


def batches(tokens: torch.Tensor, seq: int, batch: int, n: int, offset: int) -> list[dict]:
    rows = tokens[offset:offset + n * batch * (seq + 1)].view(n, batch, seq + 1)
    return [{"tokens": r} for r in rows]


def run_one(width: int, scaling: str, lr: float, args, train, val) -> float:
    mc = ModelConfig(vocab_size=256, dim=width, n_layers=args.layers, n_heads=width // args.head_dim,
                     max_seq_len=args.seq, width_scaling=scaling, base_dim=args.widths[0])
    tc = TrainConfig(lr=lr, max_steps=args.steps, warmup_steps=args.steps // 10, min_lr_ratio=0.1,
                     weight_decay=0.0, num_workers=1, micro_batch_size=args.batch, global_batch_size=args.batch)
    model = build_model(mc, seed=args.seed)
    opt = make_optimizer(model, tc, torch.device("cpu"))
    obj = NextTokenObjective()
    for step in range(args.steps):
        stats = train_step(model, opt, [train[step % len(train)]], obj, lr_at(step, tc), tc.grad_clip)
        if not math.isfinite(stats.loss):
            return float("inf")
    loss, _ = evaluate(model, obj, val)
    return loss if math.isfinite(loss) else float("inf")


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    torch.set_num_threads(args.threads)
    need = (args.steps + 8) * args.batch * (args.seq + 1)
    tokens = corpus_tokens(need)
    train = batches(tokens, args.seq, args.batch, args.steps, 0)
    val = batches(tokens, args.seq, args.batch, 8, args.steps * args.batch * (args.seq + 1))
    t0 = time.time()
    rows = []
    for scaling in ("none", "mup"):
        for width in args.widths:
            losses = [run_one(width, scaling, lr, args, train, val) for lr in args.lrs]
            best = min(range(len(losses)), key=losses.__getitem__)
            rows.append({"parametrisation": "standard" if scaling == "none" else "muP", "width": width,
                         "best_lr": args.lrs[best], "best_val_loss": round(losses[best], 4),
                         "val_loss_by_lr": {f"{lr:.3g}": round(v, 4) for lr, v in zip(args.lrs, losses)}})
            print(rows[-1], file=sys.stderr)
    shift = {}
    for name in ("standard", "muP"):
        narrow, wide = [r for r in rows if r["parametrisation"] == name]
        shift[name] = round(math.log2(wide["best_lr"] / narrow["best_lr"]), 2)
    if args.plot:
        plot(rows, args.lrs, args.plot)
    return {"benchmark": "mup_transfer", "rows": rows, "shift_log2": shift, "seconds": round(time.time() - t0, 1),
            "settings": {k: v for k, v in vars(args).items()}}


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
            ax.plot(lrs, ys, "o-", label=f"width {r['width']} (best {r['best_lr']:.2g})")
        ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out loss")
    finite = [v for r in rows for v in r["val_loss_by_lr"].values() if math.isfinite(v)]
    axes[0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 1.5))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    run_and_emit(main)
