"""Where work units run: in this process, or on a pool of Ray actors.

A unit (raylm.eval.loglik) is plain data: {"kind": "loglik", "groups": [...], "vocab_size":
the tokenizer's size, the ids log-probabilities are normalised over} or {"kind": "gen",
"items": [[index, context ids, until, max_new_tokens, temperature, top_k, seed(, top_p)], ...]}, each
with "doc_sep": the EOS id of a model trained with document masking, scored with that mask
(raylm.eval.loglik), else None. `run_unit` is the one function that computes a unit;
`LocalRunner` calls it in a loop, `RayPoolRunner` on actors that each load the model once.
The units and the arithmetic are the same, so both give identical results.

The pool's actors start when the runner is built (the `raylm` lm-eval model's constructor),
so their start-up (a process, importing torch, the weights) overlaps lm-eval building its
requests, and one pool serves every call of an evaluation: loglikelihood,
loglikelihood_rolling and generate_until, and `raylm eval`'s built-in tasks after the
harness's. Units go to whichever actor is free, two in flight each so that an actor never
waits for the driver. A small model is read once, by the driver, and reaches the actors
through the object store; the driver then also scores units whenever it would only wait (on
CPU actors, with their thread count), so a short evaluation is not slower than one process
for want of started actors.

It was a Ray Data `map_batches` actor pool once. That pool starts its actors only when a
dataset executes, so each call paid the whole start-up after lm-eval had built its requests,
once per request kind (29 s of a 53 s benchmark run on 2 cores, benchmarks/eval_throughput.py).
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass

import torch

from raylm.errors import ConfigError
from raylm.eval.loglik import complete_until, plan_units, score_unit
from raylm.progress import Progress, to_stderr


def run_unit(model, tok, unit: dict) -> list[list]:
    doc_sep = unit.get("doc_sep")
    if unit["kind"] == "loglik":
        return score_unit(model, unit["groups"], doc_sep, unit["vocab_size"])
    if unit["kind"] == "gen":  # an item's top_p, after its seed, may be left out (1: off)
        return [[idx, complete_until(model, tok, ctx, until, max_new, temperature, top_k, seed, doc_sep,
                                     *top_p[:1])]
                for idx, ctx, until, max_new, temperature, top_k, seed, *top_p in unit["items"]]
    raise ValueError(f"unknown unit kind {unit['kind']!r}")


GEN_ITEMS_PER_UNIT = 8  # small units keep a pool's actors evenly loaded (generations vary in length)


class Runner:
    """Scores requests by splitting them into units and running them somewhere."""

    max_seq_len: int
    tok: object
    batch_tokens: int = 4096
    doc_sep: int | None = None  # the EOS id when the model trained with document masking (`document_sep`)
    # Thousands of requests take minutes: their progress goes to `progress_log` (stderr: a
    # command's stdout may be its results), a line every `progress_every_s` seconds
    # (raylm.progress's default when None) or a bar on a terminal; None: no progress.
    progress_log = staticmethod(to_stderr)
    progress_every_s: float | None = None

    def run(self, units: list[dict], on_done=None) -> list[list]:
        """Each unit's results, in order; `on_done`, if given, is called with each unit's results
        as it finishes."""
        raise NotImplementedError

    def _scored(self, what: str, units: list[dict], total: int) -> list[list]:
        """`run(units)` with its progress over the `total` requests they hold."""
        if self.progress_log is None or not units:
            return self.run(units)
        progress = Progress(f"eval: {what}", total, unit="requests", log=self.progress_log, stream=sys.stderr,
                            every_s=self.progress_every_s)
        count = 0

        def done(results: list) -> None:
            nonlocal count
            count += len(results)
            progress.update(count)

        try:
            return self.run(units, done)
        finally:
            progress.close()

    def close(self) -> None:
        """Free what the runner holds (a pool's actors)."""

    def loglikelihood(self, pairs: list) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each (context ids, continuation ids)."""
        # The tokenizer's ids only: an actor that only scores has no tokenizer (UnitActor.tok).
        units = [{"kind": "loglik", "groups": u, "doc_sep": self.doc_sep, "vocab_size": self.tok.vocab_size}
                 for u in plan_units(pairs, self.max_seq_len, self.batch_tokens)]
        out = [None] * len(pairs)
        for idx, lp, greedy in (r for rs in self._scored("loglikelihood", units, len(pairs)) for r in rs):
            out[idx] = (lp, greedy)
        return out

    def complete(self, requests: list[tuple]) -> list[str]:
        """Completions of (context ids, until, max_new_tokens, temperature, top_k, seed[, top_p])
        requests."""
        order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
        items = [[i, *requests[i]] for i in order]
        units = [{"kind": "gen", "items": items[k:k + GEN_ITEMS_PER_UNIT], "doc_sep": self.doc_sep}
                 for k in range(0, len(items), GEN_ITEMS_PER_UNIT)]
        out = [None] * len(requests)
        for idx, text in (r for rs in self._scored("generate", units, len(requests)) for r in rs):
            out[idx] = text
        return out


def document_sep(meta: dict, tok) -> int | None:
    """The runner's `doc_sep` for the checkpoint whose meta.json is `meta`: its EOS id when it
    trained with data.document_mask, as bits per byte reads it (raylm.eval.bpb)."""
    from raylm.eval.bpb import trained_with_document_mask

    return tok.eos_id if trained_with_document_mask(meta) else None


class LocalRunner(Runner):
    def __init__(self, model, tok, batch_tokens: int = 4096, doc_sep: int | None = None):
        self.model, self.tok, self.batch_tokens, self.doc_sep = model, tok, batch_tokens, doc_sep
        self.max_seq_len = model.cfg.max_seq_len

    def run(self, units: list[dict], on_done=None) -> list[list]:
        out = []
        for u in units:
            out.append(run_unit(self.model, self.tok, u))
            if on_done is not None:
                on_done(out[-1])
        return out


# Models up to this size (float32 bytes) go from the driver to the actors through Ray's object
# store, so an actor imports torch and raylm's model only, not torch.distributed.checkpoint
# (about 2 s of a 5 s actor start-up on 2 cores). That wins only while the weights are small:
# larger ones would cost the driver their memory and the object store a copy per node, and
# then each actor reading the checkpoint itself (from the run's storage, in parallel) is cheaper.
SHIP_WEIGHTS_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class PoolSpec:
    workers: int = 2  # actors, each holding one copy of the model
    num_cpus: float = 1.0  # per actor; also its torch thread count (at least 1)
    num_gpus: float = 0.0  # per actor; > 0 puts the model on the actor's GPU
    ship_weights_max_bytes: int = SHIP_WEIGHTS_MAX_BYTES  # larger models: each actor reads the checkpoint


IN_FLIGHT = 2  # units queued per actor: the next one is already there when one finishes


class UnitActor:
    """A Ray actor: loads the model once (`load`), then computes the units it is given. An
    actor that Ray restarts (its process lost) runs only __init__ again; its first unit then
    reads the model from the checkpoint (the driver's shipped weights are not kept)."""

    def __init__(self, run: str, tokenizer: str, s3: dict | None, spec: PoolSpec):
        self.started_at = time.time()  # wall clock, compared with the driver's (one machine, or NTP)
        torch.set_num_threads(max(1, int(spec.num_cpus)))
        self.run_uri, self.tokenizer_uri, self.s3 = run, tokenizer, s3
        self.device = "cuda" if spec.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model, self._tok, self.ready_at, self.units = None, None, None, 0
        self.weights_from = None  # "driver" (shipped through the object store) or the checkpoint read

    def load(self, weights: dict | None) -> None:
        """The model from the driver's {"config", "state"} or, given None, from the checkpoint."""
        if weights is None:
            from raylm.config import S3Config
            from raylm.generate import load_for_inference

            self.model, self._tok, _ = load_for_inference(self.run_uri, S3Config(**(self.s3 or {})),
                                                          device=self.device)
            self.weights_from = self.run_uri
        else:
            from raylm.model import Transformer

            with torch.device("meta"):
                model = Transformer(weights["config"])
            model.to_empty(device=self.device)
            model.init_buffers()
            model.load_state_dict(weights["state"])  # strict: every parameter, as load_for_inference
            self.model = model.eval()
            self.weights_from = "driver"
        self.ready_at = time.time()

    @property
    def tok(self):
        if self._tok is None:  # generation units only: scoring needs no tokenizer
            from raylm.config import S3Config
            from raylm.generate import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_uri, S3Config(**(self.s3 or {})))
        return self._tok

    def info(self) -> dict:
        return {"pid": os.getpid(), "started_at": self.started_at, "ready_at": self.ready_at, "units": self.units,
                "weights_from": self.weights_from}

    def run(self, unit: dict) -> list[list]:
        if self.model is None:  # restarted by Ray, which runs __init__ again but not load: read the checkpoint
            self.load(None)
        self.units += 1
        return run_unit(self.model, self.tok if unit["kind"] == "gen" else None, unit)


class RayPoolRunner(Runner):
    """Units on `spec.workers` Ray actors (`UnitActor`), started here, in the background."""

    def __init__(self, run: str, tok, max_seq_len: int, spec: PoolSpec = PoolSpec(), s3=None,
                 batch_tokens: int = 4096, driver_scores: bool = True):
        import dataclasses

        import ray

        from raylm import checkpoint, storage
        from raylm.data import actor_restarts
        from raylm.generate import resolve_checkpoint, tokenizer_of

        if spec.workers < 1:
            raise ValueError(f"a pool needs at least one actor, got workers={spec.workers}")
        if os.environ.get("RAYLM_LOCAL_CLUSTER") == "1":
            # One machine never grows: actors beyond its CPUs or GPUs would wait forever (a GPU
            # pool has no driver scoring meanwhile, so the evaluation hung).
            resources = ray.cluster_resources()
            for kind, key, each in (("CPU", "cpus_per_worker", spec.num_cpus),
                                    ("GPU", "gpus_per_worker", spec.num_gpus)):
                need, have = spec.workers * each, resources.get(kind, 0)
                if need > have:
                    raise ConfigError(f"eval.workers={spec.workers} x eval.{key}={each:g} needs {need:g} {kind}s; "
                                      f"the local Ray cluster has {have:g}")
        self.tok, self.max_seq_len, self.spec, self.batch_tokens = tok, max_seq_len, spec, batch_tokens
        s3_dict = dataclasses.asdict(s3) if s3 is not None else None
        ckpt = resolve_checkpoint(run if storage.is_s3(run) else os.path.abspath(run), s3)  # actors have their own cwd
        meta = checkpoint.read_meta(ckpt, s3)
        self.doc_sep = document_sep(meta, tok)
        restarts = actor_restarts()
        # A restarted actor reloads the model (UnitActor.run), and a unit is a pure function:
        # retrying is safe.
        actor = ray.remote(UnitActor).options(num_cpus=spec.num_cpus, num_gpus=spec.num_gpus or None,
                                              max_restarts=restarts, max_task_retries=restarts)
        self.created_at = time.time()
        self.actors = [actor.remote(ckpt, tokenizer_of(ckpt, meta, s3), s3_dict, spec) for _ in range(spec.workers)]
        # The actors import torch while the driver reads the weights.
        self.model = self._small_model(ckpt, meta, s3, spec.ship_weights_max_bytes)
        weights = None if self.model is None else ray.put({"config": self.model.cfg, "state": self.model.state_dict()})
        self.loading = {a.load.remote(weights): a for a in self.actors}  # pending loads: actors not ready yet
        self.ready: list = []
        # The driver scores units too while it would only wait (actors starting, or all busy),
        # with the actors' thread count, so that its arithmetic is theirs; on GPU actors it would not be.
        self.driver_scores = driver_scores and self.model is not None and not spec.num_gpus
        self.timings: list[dict] = []  # per run(): units, the call's seconds, units the driver scored

    @staticmethod
    def _small_model(ckpt: str, meta: dict, s3, max_bytes: int):
        """The model, on the driver's CPU, when it is at most `max_bytes` (float32) and so is
        shipped to the actors; else None."""
        from raylm.config import recorded_config
        from raylm.generate import load_for_inference
        from raylm.model import count_params

        if count_params(recorded_config(meta["config"]).model) * 4 > max_bytes:  # float32, as actors load
            return None
        return load_for_inference(ckpt, s3)[0]

    def run(self, units: list[dict], on_done=None) -> list[list]:
        if not units:
            return []
        threads = torch.get_num_threads()
        if self.driver_scores:
            torch.set_num_threads(max(1, int(self.spec.num_cpus)))
        try:
            return self._run(units, on_done)
        finally:
            torch.set_num_threads(threads)

    def _run(self, units: list[dict], on_done=None) -> list[list]:
        import ray

        t0 = time.time()
        out: list = [None] * len(units)
        todo = deque(range(len(units)))  # the actors take from the front, the driver from the back
        free = deque(a for a in self.ready for _ in range(IN_FLIGHT))
        pending: dict = {}
        driver_units = 0
        while todo or pending:
            while todo and free:
                actor, i = free.popleft(), todo.popleft()
                pending[actor.run.remote(units[i])] = (i, actor)
            if todo and self.driver_scores:
                i = todo.pop()
                out[i] = run_unit(self.model, self.tok, units[i])
                if on_done is not None:
                    on_done(out[i])
                driver_units += 1
            if not (todo or pending):
                break  # actors still loading are not waited for
            waiting = list(pending) + list(self.loading)
            timeout = 0 if todo and self.driver_scores else None
            # Polling (the driver has units to score): everything that is done; else block for one.
            done, _ = ray.wait(waiting, num_returns=len(waiting) if timeout == 0 else 1, timeout=timeout) \
                if waiting else ([], [])
            for ref in done:
                if ref in self.loading:
                    actor = self.loading.pop(ref)
                    ray.get(ref)  # a failed load raises here
                    self.ready.append(actor)
                    free.extend([actor] * IN_FLIGHT)
                else:
                    i, actor = pending.pop(ref)
                    out[i] = ray.get(ref)
                    if on_done is not None:
                        on_done(out[i])
                    free.append(actor)
        self.timings.append({"units": len(units), "pool_run_s": round(time.time() - t0, 2),
                             "driver_units": driver_units})
        return out

    def info(self) -> list[dict]:
        """Each actor's pid, start-up times, units computed and where its weights came from
        (waits for the actors to load)."""
        import ray

        return ray.get([a.info.remote() for a in self.actors])

    def startup_s(self) -> float:
        """From building the runner until the last actor had loaded the model."""
        return round(max(i["ready_at"] for i in self.info()) - self.created_at, 2)

    def close(self) -> None:
        """End the actors now (dropping the runner ends them too, once Ray notices)."""
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def make_runner(path: str, workers: int = 0, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                batch_tokens: int = 4096, device: str = "cpu", s3=None, ray_config=None):
    """A LocalRunner (workers=0) or a RayPoolRunner for the run at `path`; `ray_config`: the
    Config to start a local Ray cluster with when none is running (default: Config())."""
    from raylm.generate import load_for_inference, load_tokenizer, resolve_checkpoint, tokenizer_of
    from raylm import checkpoint

    if workers <= 0:
        model, tok, meta = load_for_inference(path, s3, device=device)
        return LocalRunner(model, tok, batch_tokens, document_sep(meta, tok))
    import ray

    from raylm.config import Config, recorded_config
    from raylm.pipeline import init_ray

    ckpt = resolve_checkpoint(path, s3)
    meta = checkpoint.read_meta(ckpt, s3)
    tok = load_tokenizer(tokenizer_of(ckpt, meta, s3), s3)
    if not ray.is_initialized():
        init_ray(ray_config or Config())
    max_len = recorded_config(meta["config"]).model.max_seq_len
    return RayPoolRunner(ckpt, tok, max_len, PoolSpec(workers, cpus_per_worker, gpus_per_worker), s3, batch_tokens)
