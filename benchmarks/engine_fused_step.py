"""Would one forward for a newcomer's prefill and the running rows' decode (a "fused" step)
shorten a loaded request's time to first token? Timed here on the engine's own cache and model.

The engine (raylm/serve/engine.py) runs a step with a newcomer as two forwards: the prefill
of the new prompt, whose first token is sent at once, then the decode of the running rows.
A request that arrives during such a step waits for the rest of it, then for its own
prefill, so its worst case under load is about

    separate:  (prefill + decode)  +  prefill
    fused:     fused               +  fused      (its first token comes after the whole step)

An idle server's time to first token is one prefill either way. Two fused forwards are timed:
- `fused_at_best`: what a fused forward could cost at best, `separate` less one forward's
  fixed cost (`lone`: one row of one token, all per-op overhead), the most that sharing one
  pass through the layers can save;
- `fused_gather`: the form that needs no change to the model: the prompt's tokens and the
  running rows' next tokens as rows of one token each, in their own slots at their own
  positions (every key is written before any is read, so a prompt token sees the ones
  before it: the same math), each row reading its slot's keys as a copy.

Timed per prompt length, with --rows running rows at positions drawn from the context's
first half, random weights of --preset (speed does not depend on them), forwards and their
logits only (no sampling), each variant in turn for --rounds rounds of --iters calls;
medians over the rounds.

    python benchmarks/engine_fused_step.py --out benchmarks/results/cpu-engine-fused-step.json

Prints one JSON object on stdout: per prompt length, each forward's ms and the newcomer's
worst case (`newcomer_worst_ms`) with separate forwards and with each fused form.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from raylm.config import MODEL_PRESETS, PRESET_TOKENIZER_VOCAB
from raylm.model import build_model
from raylm.serve.engine import SlotCache


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    p.add_argument("--rows", type=int, default=16, help="running requests, each decoding one token a step")
    p.add_argument("--prompt-lens", default="8,32,64", help="the newcomer's prompt lengths, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=100, help="calls of each variant per round")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the engine's on a CPU replica)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    for flag in ("rows", "rounds", "iters"):  # 0 ended in a traceback (an empty median, a division by zero)
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = MODEL_PRESETS[args.preset]
    cfg = cfg.with_vocab(PRESET_TOKENIZER_VOCAB.get(args.preset, 32000)) if cfg.vocab_size == 0 else cfg
    model = build_model(cfg, seed=0).eval()
    B = args.rows
    new = B  # the newcomer's slot
    caches = [SlotCache(B + 1, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim, torch.float32, "cpu")
              for _ in range(cfg.n_layers)]
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(cfg.max_seq_len // 8, cfg.max_seq_len // 2, (B,), generator=gen)
    for c in caches:  # the running rows' cached keys and values
        c.k.normal_(generator=gen), c.v.normal_(generator=gen)
    running = torch.randint(0, cfg.vocab_size, (B,), generator=gen)  # their next tokens

    def window(rows, keys):
        for c in caches:
            c.rows, c.keys = rows, keys

    def prefill(prompt):
        window(torch.tensor([new]), len(prompt))
        return model.logits(model.hidden_states(prompt[None], caches, torch.tensor([0]))[:, -1])

    def decode():
        window(slice(0, B), int(pos.max()) + 1)
        return model.logits(model.hidden_states(running[:, None], caches, pos)[:, -1])

    def lone():
        window(torch.tensor([new]), 1)
        return model.logits(model.hidden_states(running[:1, None], caches, torch.tensor([0]))[:, -1])

    def fused(prompt):
        P = len(prompt)
        rows = torch.cat([torch.arange(B), torch.full((P,), new)])
        positions = torch.cat([pos, torch.arange(P)])
        window(rows, int(positions.max()) + 1)
        h = model.hidden_states(torch.cat([running, prompt])[:, None], caches, positions)
        return model.logits(h[list(range(B)) + [B + P - 1], -1])  # the running rows', the prompt's last

    results = []
    with torch.inference_mode():
        for P in (int(x) for x in args.prompt_lens.split(",")):
            if P > cfg.max_seq_len // 2:
                raise SystemExit(f"--prompt-lens: {P} is over half of {args.preset}'s context ({cfg.max_seq_len})")
            prompt = torch.randint(0, cfg.vocab_size, (P,), generator=gen)
            # The same math: the fused forward's logits are the two forwards' (to fp32 rounding).
            apart = torch.cat([decode(), prefill(prompt)])
            together = fused(prompt)
            diff = float((together - apart).abs().max())
            variants = {"prefill": lambda: prefill(prompt), "decode": decode,
                        "separate": lambda: (prefill(prompt), decode()), "lone": lone,
                        "fused_gather": lambda: fused(prompt)}
            times = {k: [] for k in variants}
            for f in variants.values():
                for _ in range(5):
                    f()
            for _ in range(args.rounds):
                for k, f in variants.items():
                    t = time.perf_counter()
                    for _ in range(args.iters):
                        f()
                    times[k].append((time.perf_counter() - t) / args.iters * 1e3)
            ms = {k: round(statistics.median(v), 3) for k, v in times.items()}
            results.append({"prompt_len": P, "ms": ms, "newcomer_worst_ms": {
                "separate": round(ms["separate"] + ms["prefill"], 3),
                "fused_at_best": round(2 * (ms["separate"] - ms["lone"]), 3),
                "fused_gather": round(2 * ms["fused_gather"], 3)},
                "fused_logits_max_abs_diff": diff})
            print(f"prompt {P}: {ms}", flush=True)
    return {"benchmark": "engine_fused_step", "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_average_1m_at_end": os.getloadavg()[0], "settings": vars(args),
            "running_positions": pos.tolist(), "results": results}


if __name__ == "__main__":
    from emit import run_and_emit

    run_and_emit(main)
