"""Where work units run: in this process, or on a Ray Data actor pool.

A unit (raylm.eval.loglik) is plain JSON: {"kind": "loglik", "groups": [...]} or
{"kind": "gen", "items": [[index, context ids, until, max_new_tokens, temperature, top_k,
seed], ...]}. `run_unit` is the one function that computes a unit; `LocalRunner` calls it
in a loop, `RayPoolRunner` on `map_batches` actors that each load the model once. The units
and the arithmetic are the same, so both give identical results.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from raylm.eval.loglik import complete_until, plan_units, score_unit


def run_unit(model, tok, unit: dict) -> list[list]:
    if unit["kind"] == "loglik":
        return score_unit(model, unit["groups"])
    if unit["kind"] == "gen":
        return [[idx, complete_until(model, tok, ctx, until, max_new, temperature, top_k, seed)]
                for idx, ctx, until, max_new, temperature, top_k, seed in unit["items"]]
    raise ValueError(f"unknown unit kind {unit['kind']!r}")


GEN_ITEMS_PER_UNIT = 8  # small units keep a pool's actors evenly loaded (generations vary in length)


class Runner:
    """Scores requests by splitting them into units and running them somewhere."""

    max_seq_len: int
    tok: object
    batch_tokens: int = 4096

    def run(self, units: list[dict]) -> list[list]:
        raise NotImplementedError

    def loglikelihood(self, pairs: list) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each (context ids, continuation ids)."""
        units = [{"kind": "loglik", "groups": u} for u in plan_units(pairs, self.max_seq_len, self.batch_tokens)]
        out = [None] * len(pairs)
        for idx, lp, greedy in (r for rs in self.run(units) for r in rs):
            out[idx] = (lp, greedy)
        return out

    def complete(self, requests: list[tuple]) -> list[str]:
        """Completions of (context ids, until, max_new_tokens, temperature, top_k, seed) requests."""
        order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
        items = [[i, *requests[i]] for i in order]
        units = [{"kind": "gen", "items": items[k:k + GEN_ITEMS_PER_UNIT]}
                 for k in range(0, len(items), GEN_ITEMS_PER_UNIT)]
        out = [None] * len(requests)
        for idx, text in (r for rs in self.run(units) for r in rs):
            out[idx] = text
        return out


class LocalRunner(Runner):
    def __init__(self, model, tok, batch_tokens: int = 4096):
        self.model, self.tok, self.batch_tokens = model, tok, batch_tokens
        self.max_seq_len = model.cfg.max_seq_len

    def run(self, units: list[dict]) -> list[list]:
        return [run_unit(self.model, self.tok, u) for u in units]


@dataclass(frozen=True)
class PoolSpec:
    workers: int = 2  # actors, each holding one copy of the model
    num_cpus: float = 1.0  # per actor; also its torch thread count (at least 1)
    num_gpus: float = 0.0  # per actor; > 0 puts the model on the actor's GPU


class UnitActor:
    """A Ray Data actor: loads the model once, then computes the units it is given."""

    def __init__(self, run: str, s3: dict | None, spec: PoolSpec):
        from raylm.config import S3Config
        from raylm.generate import load_for_inference

        torch.set_num_threads(max(1, int(spec.num_cpus)))
        device = "cuda" if spec.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model, self.tok, _ = load_for_inference(run, S3Config(**(s3 or {})), device=device)
        self.ready_at = time.time()  # wall clock: the driver compares it with when it handed the work over

    def __call__(self, batch: dict) -> dict:
        results = [json.dumps(run_unit(self.model, self.tok, json.loads(u))) for u in batch["unit"]]
        return {"i": batch["i"], "result": results, "ready_at": [self.ready_at] * len(results)}


class RayPoolRunner(Runner):
    """Units on a Ray Data actor pool (`map_batches` with `UnitActor`)."""

    def __init__(self, run: str, tok, max_seq_len: int, spec: PoolSpec = PoolSpec(), s3=None,
                 batch_tokens: int = 4096):
        import dataclasses
        import os

        from raylm import storage

        self.run_uri = run if storage.is_s3(run) else os.path.abspath(run)  # actors have their own cwd
        self.tok, self.max_seq_len, self.spec, self.batch_tokens = tok, max_seq_len, spec, batch_tokens
        self.s3 = dataclasses.asdict(s3) if s3 is not None else None
        self.timings: list[dict] = []  # per run(): pool start-up and the whole call, in seconds

    def run(self, units: list[dict]) -> list[list]:
        import ray

        if not units:
            return []
        ds = ray.data.from_items([{"i": i, "unit": json.dumps(u)} for i, u in enumerate(units)],
                                 override_num_blocks=len(units))
        ds = ds.map_batches(UnitActor, batch_size=1,
                            compute=ray.data.ActorPoolStrategy(size=min(self.spec.workers, len(units))),
                            num_cpus=self.spec.num_cpus, num_gpus=self.spec.num_gpus or None,
                            fn_constructor_kwargs={"run": self.run_uri, "s3": self.s3, "spec": self.spec})
        t0 = time.time()
        rows = sorted(ds.take_all(), key=lambda r: int(r["i"]))
        if len(rows) != len(units):
            raise RuntimeError(f"the actor pool returned {len(rows)} of {len(units)} units")
        # Start-up: from handing the work to Ray Data until the last actor had loaded the model.
        self.timings.append({"pool_startup_s": round(max(float(r["ready_at"]) for r in rows) - t0, 2),
                             "pool_run_s": round(time.time() - t0, 2), "units": len(units)})
        return [json.loads(r["result"]) for r in rows]


def make_runner(path: str, workers: int = 0, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                batch_tokens: int = 4096, device: str = "cpu", s3=None):
    """A LocalRunner (workers=0) or a RayPoolRunner for the run at `path`."""
    from raylm.generate import load_for_inference, load_tokenizer, resolve_checkpoint, tokenizer_of
    from raylm import checkpoint

    if workers <= 0:
        model, tok, _ = load_for_inference(path, s3, device=device)
        return LocalRunner(model, tok, batch_tokens)
    import ray

    from raylm.config import Config, from_dict
    from raylm.pipeline import init_ray

    ckpt = resolve_checkpoint(path, s3)
    meta = checkpoint.read_meta(ckpt, s3)
    tok = load_tokenizer(tokenizer_of(ckpt, meta, s3), s3)
    if not ray.is_initialized():
        init_ray(Config())
    max_len = from_dict(meta["config"]).model.max_seq_len
    return RayPoolRunner(ckpt, tok, max_len, PoolSpec(workers, cpus_per_worker, gpus_per_worker), s3, batch_tokens)
