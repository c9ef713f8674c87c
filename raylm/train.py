"""The training loop shared by pre-training, SFT and DPO; the objective is a parameter.

Three layers, each usable without the next:
  train_step   one optimizer step over micro-batches (plain torch; benchmarks call it)
  fit          the loop: schedule, logging, evaluation, checkpoints, resume, guards
  train_worker the Ray Train entry (raylm.train_ray): wires fit to Ray Data shards and
               ray.train.report; `train_local` here runs fit in this process without Ray
What a rank reads next (micro-batches, the data position) is raylm.batches.

Determinism: every rank seeds its RNG from (seed, step, rank) at each step, and the data
position is a count of consumed blocks, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.distributed as dist

from raylm.errors import (CheckpointError, ConfigError, DeviceOutOfMemory, PathNotFoundError, TrainingStopped,
                          TrainingTimeout)
from raylm import checkpoint, storage
from raylm.config import Config, TrainConfig, recorded_config, to_dict
from raylm.batches import Batch, RankBatches, is_padding, rank_val_batches, reshuffled
from raylm import objectives
from raylm.objectives import make_objective
from raylm.metrics import MetricsLog, mfu
from raylm.run_lock import RunTaken
from raylm.progress import duration, to_stderr
from raylm.parallel import build_parallel_model, init_local_process_group, is_sharded, resolve_precision, sharding_pays

# --------------------------------------------------------------------------- objectives


class Objective(Protocol):
    """What a training stage optimises. `count` is the number of units (tokens, pairs) a
    batch contributes; `loss_sum` is the summed loss over them, so that accumulation over
    micro-batches and ranks can normalise by the global count exactly."""

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real (not padding) tokens the forward pass processes: what MFU and tokens/s count."""
        ...

    # Optional: `trainable(batch)`, the units a gradient can come from, where a counted unit
    # can have none (DPO's pairs); train_step skips a step with none in the global batch.


# The objectives (next-token, SFT, DPO) live in raylm.objectives; NextTokenObjective is
# re-exported here because pre-training code and benchmarks import it from the loop's module.
NextTokenObjective = objectives.NextTokenObjective


# --------------------------------------------------------------------------- optimizer


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices: weights, embeddings
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms (and biases, if any)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    mc = getattr(model, "cfg", None)
    if mc is not None and mc.width_scaling != "none":
        groups = width_scaled_groups(model, mc, cfg.weight_decay)
    fused = device.type == "cuda"  # one kernel for all parameters; CPU uses foreach
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=fused, foreach=None if fused else True)


def width_scaled_groups(model, mc, weight_decay: float) -> list[dict]:
    """Parameter groups whose `lr_scale` (applied by `train_step`) carries the width rule of
    model.width_scaling (see ModelConfig): "sqrt" scales every rate by m^-0.5; "mup" scales
    the hidden matrices' (not the embedding's or head's) by 1/m, as muP prescribes for Adam,
    and their weight decay by m: AdamW shrinks a weight by lr * weight_decay a step, which
    then stays the proxy's at every width (as mup's MuAdamW does), so a tuned weight decay
    transfers too."""
    m = mc.width_multiplier
    if mc.width_scaling == "sqrt":
        return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": weight_decay,
                 "lr_scale": m ** -0.5},
                {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0, "lr_scale": m ** -0.5}]
    io = {"tok_embeddings.weight", "output.weight"}
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if p.ndim >= 2 and n not in io], "weight_decay": weight_decay * m,
             "lr_scale": 1.0 / m},
            {"params": [p for n, p in named if p.ndim >= 2 and n in io], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0, "lr_scale": 1.0}]


def lr_at(step: int, cfg: TrainConfig, time_progress: float = 0.0) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps.
    A pure function of the step, so the schedule needs no state in checkpoints; under
    train.time_budget_s the decay is as far along as the steps or the spent share of the
    budget (`time_progress`), whichever is further."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, max(time_progress, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class Start:
    """Where a run (re)starts: its step, data position and training seconds already spent,
    and the state of its guards, which a resumed run carries on with so that it flags, skips
    and rolls back as the uninterrupted run does."""

    step: int = 0
    consumed: int = 0  # blocks of the training stream already used
    train_seconds: float = 0.0  # counted against train.time_budget_s
    # fit's spike history and counters as a checkpoint records them ({}: a fresh start, or a
    # checkpoint from before they were recorded)
    guards: dict = field(default_factory=dict)
    checkpoint: str = ""  # the checkpoint resumed from ("": none)
    meta: dict = field(default_factory=dict)  # its meta.json, for fit's check of the data


@dataclass(frozen=True)
class StepStats:
    loss: float
    grad_norm: float
    skipped: bool  # non-finite loss or gradient: the optimizer step was not taken
    count: int  # global number of loss units (tokens, assistant tokens, pairs) in the step
    tokens: int = 0  # global number of real (non-padding) tokens the step's forward passes processed
    # No loss unit of the global batch can train (every target masked, as when truncation left
    # no assistant token): no forward pass, no optimizer step (see train_step).
    empty: bool = False


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def train_step(model, optimizer, micro_batches: list[dict], objective: Objective, lr: float,
               grad_clip: float) -> StepStats:
    """Forward/backward over this rank's micro-batches, clip, and step, unless the loss or
    the gradient norm is not finite; then parameters and optimizer state stay untouched.
    They stay so too when no unit of the global batch can train (`StepStats.empty`): a zero
    gradient would still move AdamW's weights through its momentum and weight decay."""
    device = next(model.parameters()).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    # Counts are exact integers (a float32 count is exact only to 2^24 units a step); one
    # collective carries them all, so every rank sees the same global counts and takes the
    # same branch below (an empty step on one rank only would leave the others in a collective).
    counts = [objective.count(mb) for mb in micro_batches]
    local = torch.tensor([sum(counts), sum(_real_tokens(objective, mb) for mb in micro_batches),
                          sum(_trainable(objective, mb, n) for mb, n in zip(micro_batches, counts))],
                         device=device, dtype=torch.int64)
    count, tokens, trainable = _all_reduce_sum(local).unbind()
    if int(trainable) == 0:
        optimizer.zero_grad(set_to_none=True)
        return StepStats(loss=0.0, grad_norm=0.0, skipped=False, count=int(count), empty=True)  # no forward: 0 tokens
    # FSDP averages gradients over ranks, so scaling each rank's sum by world/count gives the
    # mean over every unit in the global batch, however units are spread across ranks.
    scale = world / count.clamp(min=1)
    total = torch.zeros((), device=device)
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] if "lr_scale" in group else lr  # per-group width rule
    sharded = is_sharded(model)
    for i, mb in enumerate(micro_batches):
        if sharded:  # reduce-scatter once per step, not once per micro-batch
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss = objective.loss_sum(model, mb)
        (loss * scale).backward()
        total += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    loss = _all_reduce_sum(total) / count.clamp(min=1)
    ok = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss=float(loss), grad_norm=float(grad_norm), skipped=not ok, count=int(count),
                     tokens=int(tokens))


def _real_tokens(objective: Objective, batch: dict) -> int:
    counter = getattr(objective, "tokens", None)  # optional: test objectives may leave it out
    return counter(batch) if counter is not None else int(batch["tokens"][:, :-1].numel())


def _trainable(objective: Objective, batch: dict, count: int) -> int:
    """Loss units of `batch` a gradient can come from: `objective.trainable` where a unit can
    have no target token (a DPO pair with both responses masked out), else its `count`."""
    counter = getattr(objective, "trainable", None)
    return counter(batch) if counter is not None else count


@torch.no_grad()
def evaluate(model, objective: Objective, batches: Iterable[dict]) -> tuple[float, int]:
    """Mean loss over the batches across all ranks, and the number of units it covers. A
    padding micro-batch (raylm.batches.rank_val_batches: one that evens out the ranks'
    forward passes) runs its forward pass, which the other ranks' collectives wait for, and
    adds nothing to either sum."""
    device = next(model.parameters()).device
    total = torch.zeros(2, device=device, dtype=torch.float64)
    for mb in batches:
        loss = objective.loss_sum(model, mb)
        if not is_padding(mb):
            total[0] += loss.double()
            total[1] += objective.count(mb)
    _all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1)), int(total[1])


@torch.no_grad()
def evaluate_metrics(model, objective, batches: Iterable[dict]) -> dict:
    """An objective's own metrics (DPO: rewards, margin, preference accuracy), averaged over
    the batches of every rank, weighted by each batch's loss units; a padding micro-batch
    (see `evaluate`) runs and weighs nothing. Every rank makes the one reduction, a rank
    with only padding too."""
    device = next(model.parameters()).device
    keys, sums = None, None
    for mb in batches:
        m = objective.metrics(model, mb)
        keys = keys or sorted(k for k, v in m.items() if isinstance(v, float))
        if is_padding(mb):
            row = torch.zeros(1 + len(keys), device=device, dtype=torch.float64)
        else:
            w = objective.count(mb)
            row = torch.tensor([w, *(m[k] * w for k in keys)], device=device, dtype=torch.float64)
        sums = row if sums is None else sums + row
    if sums is None:
        return {}
    _all_reduce_sum(sums)
    return {k: float(v / sums[0].clamp(min=1)) for k, v in zip(keys, sums[1:])}


def reference_model(cfg: Config, device: torch.device):
    """DPO's frozen reference: the starting policy (cfg.init_from), built and sharded like the
    policy, outside the optimizer and checkpoints. None where the stage needs none, or where
    dpo.precompute_reference put its log-probabilities into the data instead. It never runs
    backward, so every FSDP unit, the root and last block included, reshards after each
    forward (`shard_model`'s frozen): only its shards stay resident between steps."""
    if cfg.stage != "dpo" or cfg.dpo.precompute_reference:
        return None
    precision = resolve_precision(cfg.train.precision, device)
    ref = build_parallel_model(cfg.model, device, precision, cfg.seed, compile=cfg.train.compile,
                               reshard_after_forward=True, replicate_degree=cfg.train.replicate_degree,
                               shard=sharding_pays(precision), frozen=True)
    load_parent_weights(ref, cfg)
    ref.requires_grad_(False)
    return ref.eval()


# --------------------------------------------------------------------------- the loop


@dataclass
class Hooks:
    """What differs between running under Ray Train and in a plain process."""

    report: Callable[[dict], None]  # every rank calls it with the same metrics
    # (local_dir, name, metrics, written, on_uploaded), every rank. `written` is None or a
    # future to wait for before reading local_dir. on_uploaded None: upload before returning;
    # else upload in the background, make the uploaded files durable (`storage.make_durable`
    # with their names), delete local_dir, then call it.
    publish_checkpoint: Callable[[str, str, dict, Any, Callable[[], None] | None], None]
    val_batches: Callable[[], Iterable[dict]]  # this rank's validation micro-batches
    checkpoint_meta: dict  # static facts every checkpoint records (tokenizer path and hash)
    # Raises `raylm.run_lock.RunTaken` where another process holds the run now; rank 0 calls it
    # before each checkpoint commit and metrics write. None: the process writing holds the run.
    fence: Callable[[], None] | None = None


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(obj):
    """`obj` as rank 0 has it, on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _injection(step: int, rank: int) -> str | None:
    """Testing hook for failure recovery: RAYLM_INJECT_FAILURE="step=K,rank=R,kind=KIND" names
    a failure for rank R at step K; this returns KIND (raise, sigkill, nan or spike) when it applies.
    Unset, it costs one dict lookup per step."""
    spec = os.environ.get("RAYLM_INJECT_FAILURE")
    if not spec:
        return None
    plan = dict(part.split("=", 1) for part in spec.split(","))
    if step != int(plan["step"]) or rank != int(plan.get("rank", 0)):
        return None
    return plan.get("kind", "raise")


def maybe_inject_failure(cfg: Config, step: int, rank: int) -> None:
    """kind=raise|sigkill fails rank R once, right after step K (a marker in the run
    directory keeps the restarted run from failing again)."""
    kind = _injection(step, rank)
    if kind not in ("raise", "sigkill") or not _first_time(cfg, f"injected-failure-{step}"):
        return
    if kind == "sigkill":
        os.kill(os.getpid(), 9)
    raise RuntimeError(f"injected failure at step {step} on rank {rank}")


def _first_time(cfg: Config, marker: str) -> bool:
    """True once per run: a marker in the run directory remembers across restarts."""
    uri = storage.join(cfg.run_dir, marker)
    if storage.exists(uri, cfg.s3):
        return False
    storage.write_text(uri, os.environ.get("RAYLM_INJECT_FAILURE", ""), cfg.s3)
    return True


@dataclass(frozen=True)
class PoisonedObjective:
    """kind=nan: rank R's loss at step K is NaN, as a numerical blow-up would make it; the NaN
    spreads through the gradient reduction to every rank, and the step must be skipped.
    kind=spike: the loss (and so the update) is 100x larger: a loss spike."""

    inner: Objective
    factor: float = float("nan")

    def count(self, batch):
        return self.inner.count(batch)

    def loss_sum(self, model, batch):
        return self.inner.loss_sum(model, batch) * self.factor

    def tokens(self, batch):
        # The inner objective's count: train_step's fallback reads a `tokens` column, which a
        # DPO batch does not have (a KeyError), and counts an SFT batch's padding.
        return _real_tokens(self.inner, batch)

    def trainable(self, batch):
        return _trainable(self.inner, batch, self.inner.count(batch))


INJECTED_FACTOR = {"nan": float("nan"), "spike": 100.0}


def _guard_nonfinite(stats: StepStats, step: int, run: int, limit: int, log) -> int:
    """Count consecutive skipped (non-finite) steps; too many in a row stop the run."""
    if not stats.skipped:
        return 0
    log(f"step {step}: non-finite loss {stats.loss} or grad norm {stats.grad_norm}; optimizer step skipped")
    if run + 1 > limit:
        raise TrainingStopped(f"step {step}: {run + 1} non-finite steps in a row "
                                 f"(train.max_nonfinite_steps={limit})")
    return run + 1


class SpikeDetector:
    """Flags a loss above `factor` x the median of the previous `window` normal losses.
    The median ignores earlier spikes, and nothing is flagged until half a window is seen,
    so the steep start of training is not a spike."""

    def __init__(self, window: int, factor: float, history=()):
        self.window, self.factor, self.history = window, factor, list(history)[-window:]

    def is_spike(self, loss: float) -> bool:
        if self.factor <= 0 or not math.isfinite(loss):
            return False
        spike = len(self.history) >= max(1, self.window // 2) and loss > self.factor * statistics.median(self.history)
        if not spike:
            self.history = (self.history + [loss])[-self.window:]
        return spike


class TrainClock:
    """Training seconds spent (resumes included), and wall seconds since this loop started, as
    rank 0 sees them, so that every rank stops at the same step and uses the same learning
    rate under train.time_budget_s, and times out at the same step under train.timeout_s (one
    tiny collective a step). Each rank's own clock would not do: ranks enter the loop at
    different moments, and one that timed out alone left the others waiting in the next
    step's collectives."""

    def __init__(self, spent: float, budget: float, device: torch.device, timeout: float = 0.0):
        now = time.perf_counter()
        self.t0, self.spent, self.budget, self.device = now - spent, spent, budget, device
        self.started, self.elapsed, self.timeout = now, 0.0, timeout

    def tick(self) -> float:
        now = time.perf_counter()
        self.spent, self.elapsed = now - self.t0, now - self.started
        if (self.budget or self.timeout) and dist.is_initialized() and dist.get_world_size() > 1:
            seconds = torch.tensor([self.spent, self.elapsed], device=self.device, dtype=torch.float64)
            dist.broadcast(seconds, src=0)
            self.spent, self.elapsed = (float(x) for x in seconds)
        return self.spent

    @property
    def timed_out(self) -> bool:
        return bool(self.timeout) and self.elapsed > self.timeout

    @property
    def progress(self) -> float:
        return self.spent / self.budget if self.budget else 0.0

    @property
    def over(self) -> bool:
        return bool(self.budget) and self.spent >= self.budget


def time_left(step: int, max_steps: int, start_step: int, start_spent: float, spent: float, budget: float,
              final: bool = False) -> float | None:
    """Training seconds left after `step`, for the step log line: the steps to
    train.max_steps at this run's (since its start or resume) seconds per step, evaluations
    and checkpoints included; under train.time_budget_s no more than the budget left. None
    when nothing is known yet (no step taken since the start, or after a rollback to before
    it) or the run ends here."""
    if final:
        return None
    steps, seconds = step - start_step, spent - start_spent
    left = (max_steps - step) * seconds / steps if steps > 0 and seconds > 0 else None
    if budget:
        rest = max(0.0, budget - spent)
        left = rest if left is None else min(left, rest)
    return left


def out_of_memory_message(cfg: Config, step: int, device_name: str) -> str:
    """One line for a step that ran out of device memory: what to lower, and `raylm plan`."""
    tc = cfg.train
    fixes = [f"lower train.micro_batch_size (now {tc.micro_batch_size}; train.global_batch_size={tc.global_batch_size} "
             f"stays, by more accumulation)"]
    if not tc.activation_checkpointing:
        fixes.append("set train.activation_checkpointing=true")
    fixes.append(f"or shorten data.seq_len (now {cfg.data.seq_len})")
    return (f"step {step}: out of memory on {device_name}: {', '.join(fixes)}; `raylm plan` estimates a "
            f"config's memory per device")


def fit(cfg: Config, model, optimizer, objective: Objective, batches: RankBatches, hooks: Hooks,
        start: Start, device_name: str, log=print) -> dict:
    """Train from `start` to cfg.train.max_steps (or to the end of train.time_budget_s);
    returns the last metrics."""
    tc = cfg.train
    if start.checkpoint:  # the data facts are known here (hooks), not in setup_model
        check_resumable(start.checkpoint, start.meta, cfg, hooks.checkpoint_meta)
    rank, world = rank_world()
    metrics_log = FencedMetricsLog(cfg.run_dir, cfg.s3, hooks.fence) if rank == 0 else None
    if metrics_log is not None:  # rows past the start are redone (a restart with no checkpoint: all)
        metrics_log.truncate(start.step)
    saver = CheckpointSaver(cfg, hooks, log)
    units = {"sft": "assistant_tokens", "dpo": "pairs"}.get(cfg.stage)  # the loss's units, where not tokens
    # Validation scores the next-token loss alone: train.z_loss is a training penalty, and
    # val_ppl its exp would not be a perplexity (nor val_loss raylm eval's loss).
    val_objective = replace(objective, z_loss=0.0) if getattr(objective, "z_loss", 0.0) else objective
    tokens_since = units_since = 0  # real tokens and loss units since the last log line
    t_last = time.perf_counter()
    # Seconds since the last log line spent on validation, task evals and checkpoints (saving,
    # committing, a rollback's load): taken out of the window that tokens/s and MFU divide by,
    # so a window with an evaluation in it reports the training speed like any other.
    paused_s = 0.0
    last: dict = {}
    # The guards go on from where the checkpoint left them: a fresh spike history would flag
    # nothing for half a window, and the counters feed metrics and train.max_rollbacks.
    g = start.guards
    nonfinite_run, skipped_total = g.get("nonfinite_run", 0), g.get("skipped_steps", 0)
    empty_total = g.get("empty_steps", 0)
    spikes = SpikeDetector(tc.spike_window, tc.spike_factor, g.get("spike_history", ()))
    spike_total, rollbacks = g.get("loss_spikes", 0), g.get("rollbacks", 0)

    def guards() -> dict:
        """What checkpoints (and rollback markers) record of the guards: Start.guards."""
        return {"spike_history": list(spikes.history), "nonfinite_run": nonfinite_run,
                "skipped_steps": skipped_total, "empty_steps": empty_total, "loss_spikes": spike_total,
                "rollbacks": rollbacks}

    step = start.step
    clock = TrainClock(start.train_seconds, tc.time_budget_s, next(model.parameters()).device, tc.timeout_s)
    it = iter(batches)
    # The built-in eval suite (eval.every), its task files read and checked before the first step.
    from raylm.eval.in_training import make_training_eval

    task_eval = make_training_eval(cfg, log)
    # A run ends after its final step has been evaluated and saved: a rollback on what would
    # have been the last step goes on to take another one, budget spent or not.
    finished = clock.over  # a resumed run whose budget was already spent
    try:
        while step < tc.max_steps and not finished:
            torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)
            lr = lr_at(step, tc, clock.progress)
            # Injected NaNs repeat on every run through the step (a resumed run matches the
            # uninterrupted one); an injected spike fires once, as data-driven spikes do not
            # recur once the data has moved on.
            injected = _injection(step + 1, rank)
            if injected == "spike" and not _first_time(cfg, f"injected-spike-{step + 1}"):
                injected = None
            step_objective = PoisonedObjective(objective, INJECTED_FACTOR[injected]) \
                if injected in INJECTED_FACTOR else objective
            try:
                stats = train_step(model, optimizer, next(it), step_objective, lr, tc.grad_clip)
            except torch.OutOfMemoryError as e:  # the same config fails the same way on every restart
                raise DeviceOutOfMemory(out_of_memory_message(cfg, step + 1, device_name)) from e
            step += 1
            tokens_since, units_since = tokens_since + stats.tokens, units_since + stats.count
            clock.tick()
            final = step >= tc.max_steps or clock.over
            if stats.empty:  # every rank alike (train_step's counts are global); not a loss to track
                empty_total += 1
                log(f"step {step}: every target of the global batch is masked, nothing to learn; "
                    f"optimizer step skipped")
            else:
                nonfinite_run = _guard_nonfinite(stats, step, nonfinite_run, tc.max_nonfinite_steps, log)
                skipped_total += stats.skipped
            if not stats.empty and spikes.is_spike(stats.loss):
                spike_total += 1
                log(f"step {step}: loss spike {stats.loss:.4f} (> {tc.spike_factor} x recent median)")
                if tc.on_spike == "stop":
                    raise TrainingStopped(f"step {step}: loss spike {stats.loss:.4f} and train.on_spike=stop")
                if tc.on_spike == "rollback":
                    rollbacks += 1
                    t0 = time.perf_counter()
                    step = rollback(cfg, model, optimizer, saver, step, batches.consumed, guards(), metrics_log, log,
                                    clock.spent)
                    paused_s += time.perf_counter() - t0
                    continue
            if clock.timed_out:  # rank 0's clock: every rank raises at the same step
                raise TrainingTimeout(f"step {step}: training exceeded train.timeout_s={tc.timeout_s}")
            row = None
            if step % tc.log_every == 0 or final:
                t0 = time.perf_counter()
                saver.poll()
                now = time.perf_counter()
                paused_s += now - t0
                # Training seconds of the window: its wall time less evaluations and checkpoints.
                train_s = max(now - t_last - paused_s, 1e-9)
                tok_s = tokens_since / train_s  # real tokens only: padding is not work done
                # An empty step computed no loss and no gradient: null, not a perfect 0 on the curve.
                loss, grad_norm = (None, None) if stats.empty else (stats.loss, stats.grad_norm)
                row = {"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tok_s, "mfu": mfu(tok_s, cfg.model, cfg.data.seq_len, device_name, world),
                       "epoch": batches.epoch, "consumed_blocks": batches.consumed,
                       "skipped_steps": skipped_total, "empty_steps": empty_total, "loss_spikes": spike_total,
                       "rollbacks": rollbacks, "data_wait_s": round(batches.wait_s, 3),
                       "checkpoint_blocking_s": round(saver.blocking_s, 3),
                       # the wall seconds since the last log line, and those of them tokens_per_s leaves out
                       "window_s": round(now - t_last, 6), "window_paused_s": round(paused_s, 6)}
                if units:
                    row.update({units: stats.count, f"{units}_per_s": units_since / train_s})
                t_last, tokens_since, units_since, paused_s = now, 0, 0, 0.0
                if rank == 0:
                    where = f" ({clock.spent:.0f}/{tc.time_budget_s:.0f}s)" if tc.time_budget_s else f"/{tc.max_steps}"
                    left = time_left(step, tc.max_steps, start.step, start.train_seconds, clock.spent,
                                     tc.time_budget_s, final)
                    log(f"step {step}{where} | loss {'-' if stats.empty else f'{stats.loss:.4f}'} | lr {lr:.2e} | "
                        f"grad {'-' if stats.empty else f'{stats.grad_norm:.2f}'} | {tok_s:,.0f} tok/s"
                        + (f" | mfu {row['mfu']:.1%}" if row["mfu"] else "")
                        + (f" | {duration(left)} left" if left is not None else ""))
            if step % tc.eval_every == 0 or final:
                t0 = time.perf_counter()
                val_loss, n = evaluate(model, val_objective, hooks.val_batches())
                vrow = {"kind": "val", "step": step, "val_loss": val_loss, f"val_{units or 'tokens'}": n}
                if cfg.stage == "dpo":  # rewards and preference accuracy say more than the loss
                    extra = evaluate_metrics(model, objective, hooks.val_batches())
                    vrow.update({f"val_{k}": v for k, v in extra.items()})
                else:
                    vrow["val_ppl"] = math.exp(min(val_loss, 50))
                if rank == 0:
                    detail = (f"ppl {vrow['val_ppl']:.2f}" if "val_ppl" in vrow else
                              f"accuracy {vrow['val_preference_accuracy']:.3f} | "
                              f"margin {vrow['val_reward_margin']:.3f}")
                    log(f"step {step}: val loss {val_loss:.4f} | {detail} ({n} {units or 'tokens'})")
                    metrics_log.log(vrow)
                row = {**(row or {"step": step}), **{k: v for k, v in vrow.items() if k != "kind"}}
                paused_s += time.perf_counter() - t0
            if task_eval is not None and (step % cfg.eval.every == 0 or final):
                t0 = time.perf_counter()
                erow = task_eval(model, step)  # every rank: a sharded model needs all of them
                if rank == 0:
                    log(f"step {step}: eval " + " | ".join(f"{k[5:]} {v:.3f}" for k, v in erow.items()
                                                           if k.endswith(("_acc", "_exact_match"))))
                    metrics_log.log(erow)
                row = {**(row or {"step": step}), **{k: v for k, v in erow.items() if k != "kind"}}
                paused_s += time.perf_counter() - t0
            saving = step % tc.ckpt_every == 0 or final
            if row is not None:
                if rank == 0 and row.get("kind") == "train":
                    metrics_log.log({k: v for k, v in row.items() if not k.startswith(("val", "eval_"))})
                last = row
                # A step that saves reports its row with the checkpoint (Hooks.publish_checkpoint
                # sends `last`): Ray Train takes one report per worker per controller poll, so a
                # second report here would hold this step, and a run's end, for up to a poll.
                if not saving:
                    hooks.report(row)
            if saving:
                t0 = time.perf_counter()
                saver.save(model, optimizer, step, batches.consumed, last, clock.spent, guards())
                if final:
                    saver.finish()
                if metrics_log is not None:
                    metrics_log.flush()
                paused_s += time.perf_counter() - t0
            maybe_inject_failure(cfg, step, rank)
            finished = final
    except TrainingStopped:
        # A guard's stop comes on every rank at the same step (it reads the global loss and
        # gradient norm), so the ranks can still commit together the checkpoint in flight: it
        # was written before the step that tripped the guard, and a synchronous save of it
        # would be committed already. Left as it was, an async run lost it, and a resume
        # (with the guard's setting changed) went back to the one before.
        _commit_in_flight(saver, metrics_log, log)
        raise
    saver.finish()
    return last


def _commit_in_flight(saver: "CheckpointSaver", metrics_log: MetricsLog | None, log) -> None:
    """On a guard's stop: commit the checkpoint still uploading, and write out the metrics
    (object storage keeps them in memory until a flush). A failure here is logged, and the
    guard's own error, which names the setting, is what the run ends with."""
    try:
        saver.finish()
    except Exception as e:  # noqa: BLE001 - the stop's message matters more; this one is logged
        log(f"the checkpoint in flight when training stopped was not committed: {e}")
    if metrics_log is not None:
        try:
            metrics_log.flush()
        except Exception as e:  # noqa: BLE001 - as above
            log(f"metrics.jsonl was not written when training stopped: {e}")


ROLLBACK = "rollback.json"


def rollback(cfg: Config, model, optimizer, saver: "CheckpointSaver", step: int, consumed: int, guards: dict,
             metrics_log: MetricsLog | None, log, train_seconds: float = 0.0) -> int:
    """train.on_spike=rollback: restore model and optimizer from the newest complete
    checkpoint and go on from its step, with the data stream where it is now. The batches
    that led to the spike are skipped rather than replayed (PaLM's remedy): replaying them
    would reproduce the spike exactly. `guards` (fit's, this rollback counted) go on as they
    are, and so does the training clock (`train_seconds` spent, which the marker records
    for a resume). Returns the step to continue from."""
    rollbacks = guards["rollbacks"]
    if rollbacks > cfg.train.max_rollbacks:
        raise TrainingStopped(f"step {step}: loss spike after {rollbacks - 1} rollbacks "
                                 f"(train.max_rollbacks={cfg.train.max_rollbacks})")
    saver.finish()
    rank, _ = rank_world()
    ckpt = broadcast(checkpoint.latest_complete(cfg.run_dir, cfg.s3) if rank == 0 else None)
    if ckpt is None:
        raise TrainingStopped(f"step {step}: loss spike and train.on_spike=rollback, "
                                 f"but no complete checkpoint to roll back to yet")
    meta = checkpoint.load(model, optimizer, ckpt, cfg.s3)
    if rank == 0:
        if saver.hooks.fence is not None:
            saver.hooks.fence()
        # A restart before the next checkpoint must not replay the batches that caused the
        # spike: resuming from this checkpoint takes the data position from here, and the
        # guards (this rollback counted) and the training seconds spent (the budget's) too.
        storage.write_text(storage.join(cfg.run_dir, ROLLBACK), json.dumps(
            {"checkpoint": checkpoint.checkpoint_name(meta["step"]), "consumed_blocks": consumed,
             "guards": guards, "train_seconds": round(train_seconds, 3)}), cfg.s3)
    if metrics_log is not None:
        metrics_log.truncate(meta["step"])
        metrics_log.log({"kind": "rollback", "step": meta["step"], "spike_step": step, "checkpoint": ckpt})
    log(f"step {step}: rolled back to {ckpt} (step {meta['step']}); the data stream skips ahead")
    return meta["step"]


class FencedMetricsLog(MetricsLog):
    """metrics.jsonl, each write first checked with `fence` (Hooks.fence): a worker of a driver
    that lost the run stops before its rows land among the new holder's. On object storage
    only `flush` writes."""

    def __init__(self, run_dir: str, s3, fence: Callable[[], None] | None):
        super().__init__(run_dir, s3)
        self.fence = fence or (lambda: None)

    def log(self, row: dict) -> None:
        if not storage.is_s3(self.uri):  # appended at once
            self.fence()
        super().log(row)

    def flush(self) -> None:
        self.fence()
        super().flush()


class _Upload:
    """A background upload's outcome: 0 pending, 1 done, -1 failed (with its error)."""

    def __init__(self):
        self.event, self.error, self.files = threading.Event(), None, {}

    def __call__(self, error: BaseException | None = None, files: dict | None = None) -> None:
        self.error, self.files = error, files or {}
        self.event.set()

    def status(self) -> int:
        if not self.event.is_set():
            return 0
        return -1 if self.error is not None else 1


# A rank's checkpoint, staged on local disk before its upload: <tmp>/raylm-ckpt-N-rR-pPID-*.
STAGING = "raylm-"


def staging_dir(name: str, rank: int) -> str:
    """A new directory to stage rank `rank`'s part of checkpoint `name` in, naming this process."""
    return tempfile.mkdtemp(prefix=f"{STAGING}{name}-r{rank}-p{os.getpid()}-")


def remove_orphaned_staging() -> None:
    """Remove checkpoints staged on this machine's disk by worker processes that are gone. The
    upload removes its staging directory, but a worker stopped mid-save (Ctrl-C, SIGTERM, a
    failure, a kill) left it, the rank's whole state (gigabytes a crash for a large model)."""
    import glob
    import re

    from raylm.run_lock import pid_gone

    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{STAGING}ckpt-*-r*-p*-*")):
        found = re.search(r"-r\d+-p(\d+)-[^/]*$", path)
        if found is not None and os.path.isdir(path) and pid_gone(int(found.group(1))):
            shutil.rmtree(path, ignore_errors=True)


class CheckpointSaver:
    """Writes checkpoints and commits them once every rank's files are in storage.

    Sync: write, upload and commit before training goes on. Async (`train.async_checkpoint`):
    training waits only while the state is copied to host memory; DCP writes the files and
    the upload runs in the background. `poll`, called at every logging step, commits the
    checkpoint once all ranks report their upload done, so the marker still comes last.
    One save is in flight at a time: the next one first waits for it."""

    def __init__(self, cfg: Config, hooks: Hooks, log=print):
        self.cfg, self.hooks, self.log = cfg, hooks, log
        self.use_async = cfg.train.async_checkpoint
        # DCP's background thread synchronises ranks too; on the training group its
        # collectives could interleave with the step's (a hang), so it gets a gloo group.
        self.group = dist.new_group(backend="gloo") if self.use_async and dist.is_initialized() else None
        self.pending: tuple | None = None  # (uri, meta, _Upload or None, t0)
        self.device = torch.device("cpu")
        self.blocking_s = 0.0  # time training spent waiting on checkpoints
        remove_orphaned_staging()

    def save(self, model, optimizer, step: int, consumed: int, metrics: dict, train_seconds: float = 0.0,
             guards: dict | None = None) -> None:
        t0 = time.perf_counter()
        self.finish()
        rank, world = rank_world()
        meta = {"step": step, "consumed_blocks": consumed, "train_seconds": round(train_seconds, 3),
                "guards": guards or {},
                "world_size": world, "config": to_dict(self.cfg, redact=True),
                "global_batch_size": self.cfg.train.global_batch_size, "metrics": metrics,
                **self.hooks.checkpoint_meta}
        name = checkpoint.checkpoint_name(step)
        uri = storage.join(self.cfg.run_dir, name)
        self.device = next(model.parameters()).device
        local = staging_dir(name, rank)
        try:
            written = checkpoint.write_local(model, optimizer, meta, local, self.group, self.use_async)
            if self.use_async:
                uploaded = _Upload()
                self.hooks.publish_checkpoint(local, name, metrics, written, uploaded)
                self.pending = (uri, meta, uploaded, t0)
                local = None  # the upload removes it
            else:
                files = checkpoint.file_digests(local)
                self.hooks.publish_checkpoint(local, name, metrics, None, None)
                self.pending = (uri, meta, None, t0)
                self._commit(files)
        finally:
            if local:
                shutil.rmtree(local, ignore_errors=True)
            self.blocking_s += time.perf_counter() - t0

    def _all_status(self, upload: _Upload) -> int:
        """The lowest upload status over ranks, so that every rank acts alike: all commit,
        all wait, or all raise. The flag lives on the training device (NCCL has no CPU path)."""
        status = torch.tensor(float(upload.status()), device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(status, op=dist.ReduceOp.MIN)
        if status.item() < 0:
            raise RuntimeError(f"checkpoint upload failed: {upload.error or 'on another rank'}")
        return int(status.item())

    def poll(self) -> None:
        """Commit the in-flight checkpoint if every rank has uploaded its part (never waits)."""
        if self.pending is not None and self.pending[2] is not None and self._all_status(self.pending[2]) == 1:
            self._commit(self.pending[2].files, flushed=True)

    def finish(self) -> None:
        """Wait for the in-flight checkpoint, then commit it."""
        if self.pending is None:
            return
        upload = self.pending[2]
        if upload is not None:
            upload.event.wait()
            self._all_status(upload)
        self._commit(upload.files if upload is not None else {}, flushed=upload is not None)

    def _commit(self, files: dict, flushed: bool = False) -> None:
        """Write the marker once storage holds every file every rank wrote, at full size.
        Uploads can report success with a file missing (a connection cut mid-copy has been
        seen to do it), so the marker trusts the listing, not the uploaders. `flushed`: the
        background uploads made their files durable (`publish_checkpoint`'s contract), so
        the training thread does not wait on the disk here."""
        uri, meta, _, t0 = self.pending
        self.pending = None
        expected = dict(files)
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, files)  # also the barrier: every upload is done
            expected = {k: v for d in everyone for k, v in d.items()}
        missing = taken = None
        if rank_world()[0] == 0:
            taken = self._taken()
            if not taken:
                stored = {storage.relative(f.uri, uri): f.size for f in storage.list_files(uri, self.cfg.s3, pattern=False)}
                missing = next((f"{n} ({size} bytes; stored: {stored.get(n)})"
                                for n, (size, _) in sorted(expected.items()) if stored.get(n) != size), None)
        missing, taken = broadcast((missing, taken))
        if taken:  # every rank stops alike
            raise RunTaken(taken)
        if missing:
            raise RuntimeError(f"{uri}: upload incomplete, not committed: {missing}")
        if rank_world()[0] == 0:
            # checked again right before the marker: what is left is the moment between the two
            checkpoint.commit(uri, meta, self.cfg.s3, expected, flushed, fence=self.hooks.fence)
            deleted = checkpoint.apply_retention(self.cfg.run_dir, self.cfg.train.keep_checkpoints, self.cfg.s3)
            self.log(f"step {meta['step']}: checkpoint {uri} ({time.perf_counter() - t0:.1f}s"
                     + (", async" if self.use_async else "")
                     + (f"; removed {len(deleted)} old" if deleted else "") + ")")
        if dist.is_initialized():
            dist.barrier()

    def _taken(self) -> str | None:
        """Why this process may not commit (another holds the run now), or None."""
        try:
            if self.hooks.fence is not None:
                self.hooks.fence()
        except RunTaken as e:
            return str(e)
        return None


def resume_point(cfg: Config, resume: str) -> str | None:
    """The checkpoint to start from: 'auto' takes the newest complete one if any, 'must'
    requires one, 'never' ignores them."""
    if resume == "never":
        return None
    found = checkpoint.latest_complete(cfg.run_dir, cfg.s3)
    if found is None and resume == "must":
        raise PathNotFoundError(f"--resume: no complete checkpoint under {cfg.run_dir}")
    return found


def setup_model(cfg: Config, device: torch.device, resume: str, log=print):
    """Model + optimizer, restored from the newest complete checkpoint when resuming.
    Returns (model, optimizer, Start)."""
    precision = resolve_precision(cfg.train.precision, device)
    model = build_parallel_model(cfg.model, device, precision, cfg.seed, compile=cfg.train.compile,
                                 activation_checkpointing=cfg.train.activation_checkpointing,
                                 reshard_after_forward=cfg.train.reshard_after_forward, float8=cfg.train.float8,
                                 replicate_degree=cfg.train.replicate_degree, shard=sharding_pays(precision))
    optimizer = make_optimizer(model, cfg.train, device)
    rank, _ = rank_world()
    ckpt = broadcast(resume_point(cfg, resume) if rank == 0 else None)
    if ckpt is None:
        # An earlier run's spike-rollback marker goes: once this run writes the checkpoint it
        # names, a resume from that took the earlier run's data position, guards and seconds.
        if rank == 0:
            storage.delete(storage.join(cfg.run_dir, ROLLBACK), cfg.s3)
        if cfg.init_from:  # a fresh stage on another run's weights: new optimizer, step 0
            parent = load_parent_weights(model, cfg)
            if rank == 0:
                log(f"starting from the weights of {parent}")
        return model, optimizer, Start()
    # Checked before DCP loads anything: a changed shape fails inside DCP with a traceback,
    # and a smaller model loads silently (DCP reads only the entries asked for). Every rank
    # checks the meta rank 0 read, so all raise the same error.
    saved = broadcast(checkpoint.read_meta(ckpt, cfg.s3) if rank == 0 else None)
    check_resumable(ckpt, saved, cfg)
    # Always written by raylm, and sealed by the commit marker's digest; a marker from before
    # digests were recorded does not protect a damaged or edited meta.json (a KeyError here).
    lost = next((k for k in ("consumed_blocks", "world_size") if k not in saved), None)
    if lost:
        raise CheckpointError(f"{storage.join(ckpt, checkpoint.META)}: no {lost!r} field (a damaged or altered "
                              f"meta.json); resume from an earlier checkpoint by removing this one")
    meta = checkpoint.load(model, optimizer, ckpt, cfg.s3)
    consumed, guards, seconds = meta["consumed_blocks"], meta.get("guards", {}), meta.get("train_seconds", 0.0)
    marker = broadcast(_read_rollback(storage.join(cfg.run_dir, ROLLBACK), cfg.s3) if rank == 0 else None)
    if marker and marker["checkpoint"] == checkpoint.checkpoint_name(meta["step"]):
        # a spike rollback had moved the data on, counted itself, and spent the seconds up to
        # the spike (its clock went on: the budget is not given back)
        consumed, guards = marker["consumed_blocks"], marker.get("guards", guards)
        seconds = marker.get("train_seconds", seconds)
    elif marker and rank == 0 and _step_of(marker["checkpoint"]) > meta["step"]:
        # Of a checkpoint after this one, which this run writes again: resumed from, the
        # marker's data position, guards and seconds would replace the new run's own.
        storage.delete(storage.join(cfg.run_dir, ROLLBACK), cfg.s3)
    if rank == 0:
        log(f"resumed from {ckpt} (step {meta['step']}, {consumed} blocks consumed, "
            f"written by {meta['world_size']} workers)")
        if meta["step"] >= cfg.train.max_steps:  # said: a run asked for fewer steps only "finished" at once
            log(f"{ckpt} is at or past train.max_steps={cfg.train.max_steps}: nothing to train (this run "
                f"resumes its newest checkpoint; another name= starts a new run)")
    return model, optimizer, Start(meta["step"], consumed, seconds, guards, ckpt, meta)


def check_resumable(ckpt: str, meta: dict, cfg: Config, facts: dict | None = None) -> None:
    """Refuse, in one line, to resume `ckpt` (its meta.json: `meta`) with settings under which
    the run would not go on as the one that wrote it:
      model.*                  the weights' shapes, and what they compute
      seed                     the data order and every step's random state
      train.global_batch_size  the data position counts whole steps' blocks
      tokenizer, data          `facts` (this run's checkpoint_facts): the tokenizer's sha256
                               and the dataset's key, which covers its files and preparation
    Every other setting may change on resume, taking effect from the next step: the schedule
    (train.max_steps, lr, warmup, time budget: lr_at is a function of the step), the
    optimizer's weight decay and betas (a load restores its moments, not its settings), grad
    clipping, the guards, the intervals of logs, evals and checkpoints, and how a step is
    computed (workers, micro-batch, precision, compile), which leaves the global batch and its
    data as they were. What an older checkpoint does not record (or a run without a
    manifest) is not compared."""
    saved = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    now = to_dict(cfg, redact=True)
    now_model = json.loads(json.dumps(now["model"]))  # as meta.json holds it
    checks = [(f"model.{k}", v, now_model[k]) for k, v in (saved.get("model") or {}).items() if k in now_model]
    if "seed" in saved:
        checks.append(("seed", saved["seed"], cfg.seed))
    if "global_batch_size" in meta:
        checks.append(("train.global_batch_size", meta["global_batch_size"], cfg.train.global_batch_size))
    facts = facts or {}
    for fact in ("tokenizer_sha256", "data_key"):
        if meta.get(fact) and facts.get(fact):
            # The same data files keyed where the run was before it was copied or moved
            # (raylm.pipeline.check_resume_before_record found them the same).
            moved = facts.get("moved_data_key") if fact == "data_key" else None
            checks.append((fact, meta[fact], moved if moved and meta[fact] == moved else facts[fact]))
    bad = next(((setting, then, current) for setting, then, current in checks if then != current), None)
    if bad is None:
        return
    setting, then, current = bad
    why = ""
    if setting in ("tokenizer_sha256", "data_key"):  # a hash alone says little: its path too
        section = setting.split("_")[0]
        then_path, now_path = (saved.get(section) or {}).get("path"), now[section]["path"]
        then, current = f"{then[:16]} ({section}.path={then_path})", f"{current[:16]} ({section}.path={now_path})"
        if setting == "data_key" and then_path == now_path:  # the same path: what else the key covers
            why = (" (the dataset key also covers the files' sizes and dates or ETags, the data.* settings and "
                   "raylm's cleaning rules, data.CLEANING, which an upgrade may change)")
    # Starting from these weights suits a new seed or new data; a DPO run's init_from is also
    # its reference, so it is not offered there.
    fresh = (f" (with init_from={cfg.run_dir} to start from its weights)"
             if setting in ("seed", "data_key") and cfg.stage != "dpo" else "")
    raise ConfigError(f"{ckpt}: written with {setting}={then}, now {current}{why}; resuming needs the same model, "
                      f"tokenizer, data, seed and global batch: set it back, or start a new run under another "
                      f"name={fresh}")


def load_parent_weights(model, cfg: Config) -> str:
    """Weights only from cfg.init_from (a run, newest complete checkpoint, or one checkpoint;
    or a Hugging Face Llama directory, told apart by its config.json) into a freshly built,
    possibly sharded model. Rank 0 alone reads them from storage, the model's entries only,
    and the other ranks receive their shards from it: every rank reading a whole checkpoint
    does not scale. Returns the checkpoint's URI."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from raylm.generate import resolve_checkpoint
    from raylm.hf import is_hf_dir, read_hf_weights

    rank, world = rank_world()
    from_hf = broadcast(is_hf_dir(cfg.init_from, cfg.s3) if rank == 0 else None)
    if from_hf:
        parent = cfg.init_from
    else:
        parent = broadcast(resolve_checkpoint(cfg.init_from, cfg.s3) if rank == 0 else None)
    full: dict = {}
    if rank == 0 and from_hf:
        full = read_hf_weights(parent, cfg.model, cfg.s3)
    elif rank == 0:
        meta = checkpoint.read_meta(parent, cfg.s3)
        parent_model = recorded_config(meta["config"]).model if isinstance(meta.get("config"), dict) else None
        if parent_model is not None and parent_model != cfg.model:
            raise checkpoint.CheckpointError(f"{parent}: its model ({parent_model.n_layers}x{parent_model.dim}, "
                                             f"vocab {parent_model.vocab_size}) is not this run's model "
                                             f"({cfg.model.n_layers}x{cfg.model.dim}, vocab {cfg.model.vocab_size})")
        from raylm.generate import checked_meta_model

        plain = checked_meta_model(parent, cfg.model, cfg.s3)  # the parent's index, before allocating
        plain.to_empty(device="cpu")
        checkpoint.load_model_weights(plain, parent, cfg.s3)
        full = plain.state_dict()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=world > 1))
    return parent


def _step_of(name: str) -> int:
    """The step of checkpoint name `name` (`ckpt-00000004`: 4); -1 for another name."""
    step = checkpoint.step_of(name)
    return -1 if step is None else step


def _read_rollback(uri: str, s3) -> dict | None:
    """The spike-rollback marker at `uri`, or None where there is none. A damaged one (hand
    edits, a bad disk: raylm writes it whole) is one line naming it, not a traceback."""
    if not storage.exists(uri, s3):
        return None
    try:
        marker = json.loads(storage.read_bytes(uri, s3))
        ok = (isinstance(marker, dict) and isinstance(marker.get("checkpoint"), str)
              and isinstance(marker.get("consumed_blocks"), int) and isinstance(marker.get("guards", {}), dict)
              and type(marker.get("train_seconds", 0.0)) in (int, float))
    except ValueError:  # not JSON, or not UTF-8
        ok = False
    if not ok:
        raise CheckpointError(f"{uri}: damaged (expected JSON with checkpoint, consumed_blocks, guards and "
                              f"train_seconds, as a spike rollback writes it); remove it to resume at the "
                              f"checkpoint's own data position, which trains again on the blocks the rollback "
                              f"skipped")
    return marker


def checkpoint_facts(cfg: Config, manifest: dict | None) -> dict:
    """What export and serving need besides the weights: which tokenizer, which data."""
    manifest = manifest or {}
    tok = cfg.tokenizer.path
    try:  # relative to the run when inside it (it always is for raylm's own stages): runs move
        tok = storage.relative(tok, cfg.run_dir)
    except ValueError:
        pass
    return {"tokenizer": tok, "tokenizer_sha256": manifest.get("tokenizer_sha256", ""),
            "data_key": manifest.get("key", ""),
            # The key its checkpoints had before the run was moved, where it was (raylm.pipeline).
            **({"moved_data_key": manifest["moved_key"]} if manifest.get("moved_key") else {})}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# --------------------------------------------------------------------------- without Ray


def storage_publisher(cfg: Config):
    """publish_checkpoint without Ray: copy the local checkpoint into the run's storage,
    now or in a background thread."""

    def publish(local_dir: str, name: str, metrics: dict, written, on_uploaded) -> None:
        def upload():
            if written is not None:
                written.result()
            storage.unlink_link(storage.join(cfg.run_dir, name))
            storage.makedirs(storage.join(cfg.run_dir, name))
            # The loop waits on a synchronous upload: its progress, past 256 MB (a background
            # one would mix its lines into the step lines).
            storage.upload_dir(local_dir, storage.join(cfg.run_dir, name), cfg.s3,
                               log=to_stderr if on_uploaded is None else None)

        if on_uploaded is None:
            upload()
            return

        def background():
            try:
                upload()
                files = checkpoint.file_digests(local_dir)
                storage.make_durable(storage.join(cfg.run_dir, name), cfg.s3, names=files)
            except BaseException as e:
                on_uploaded(e)
                return
            finally:
                shutil.rmtree(local_dir, ignore_errors=True)
            on_uploaded(files=files)

        threading.Thread(target=background, name=f"upload-{name}", daemon=True).start()

    return publish


def train_local(cfg: Config, blocks, val_blocks, resume: str = "auto", device: str = "cpu", log=print,
                manifest: dict | None = None) -> dict:
    """The same loop in this process (no Ray). `blocks` and `val_blocks` are rows in order:
    (n, seq_len + 1) token arrays for pre-training, or dicts of such columns (SFT, DPO).
    `manifest` is the prepared data's (eos_id, pad_id, columns, tokenizer); plain next-token
    pre-training runs without one (`objective_facts`). Epochs come as Ray workers give a
    kept set: the first in row order, each later one reshuffled (`reshuffled`)."""
    dev = torch.device(device)
    cfg = cfg.for_device(dev.type)  # "auto" settings: on for CUDA, off for CPU
    # bf16 (the default on CUDA) is FSDP2's mixed precision even in one process, which needs a
    # process group: without one, FSDP2 looked for a torchrun environment and failed. One made
    # here is this call's own, gone when it returns.
    own_group = sharding_pays(resolve_precision(cfg.train.precision, dev)) and not dist.is_initialized()
    if own_group:
        init_local_process_group(dev)
    try:
        return _train_local(cfg, blocks, val_blocks, resume, dev, log, manifest)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train_local(cfg: Config, blocks, val_blocks, resume: str, dev: torch.device, log, manifest: dict | None) -> dict:
    model, optimizer, start = setup_model(cfg, dev, resume, log)
    tc = cfg.train
    rank, world = rank_world()
    rows = _as_columns(blocks)
    val_rows = _as_columns(val_blocks)
    n = len(next(iter(rows.values())))
    # Every row, the short last batch too: later epochs permute all of them (`reshuffled`).
    passes = [{k: v[i:i + tc.global_batch_size] for k, v in rows.items()}
              for i in range(0, n, tc.global_batch_size)]

    def epoch_stream(epoch: int):
        yield from reshuffled(passes, cfg.seed, epoch)  # in memory: what Ray workers do with small data

    def val_batches():
        return rank_val_batches(val_rows, tc, rank, world, dev)

    batches = RankBatches(epoch_stream, tc.global_batch_size, tc.micro_batch_size, rank, world, n, start.consumed, dev)
    hooks = Hooks(report=lambda m: None, publish_checkpoint=storage_publisher(cfg), val_batches=val_batches,
                  checkpoint_meta=checkpoint_facts(cfg, manifest))
    objective = make_objective(cfg, objective_facts(cfg, manifest), reference_model(cfg, dev))
    return fit(cfg, model, optimizer, objective, batches, hooks, start, device_name(dev), log)


def objective_facts(cfg: Config, manifest: dict | None) -> dict:
    """What make_objective reads of the data, for train_local. Without a manifest only plain
    next-token pre-training can be set up: a setting that needs the data's special ids or
    columns is an error, not trained without them (document masks that let attention cross
    documents, SFT's loss on prompts and padding)."""
    if manifest is None:
        if cfg.stage != "pretrain":
            raise ConfigError(f"stage={cfg.stage} needs the prepared data's manifest (its eos_id, pad_id and "
                              f"columns): pass train_local(..., manifest=...)")
        if cfg.data.document_mask:
            raise ConfigError("data.document_mask=true needs the data's eos_id (where documents end): pass "
                              "train_local(..., manifest=...) or set data.document_mask=false")
    return {"eos_id": None, **(manifest or {})}


def _as_columns(rows) -> Batch:
    if isinstance(rows, dict):
        return {k: torch.as_tensor(v) for k, v in rows.items()}
    return {"tokens": torch.as_tensor(rows)}
