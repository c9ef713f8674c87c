"""Post-training stages: SFT and DPO on the pre-training loop, from a parent run's weights.

    parent run (init_from) -> its model shape, tokenizer and weights
      -> chat or preference records -> rows (raylm.chat_data, Ray Data)
      -> [dpo.precompute_reference: the reference's log-probs, one Ray Data pass, stored
          beside the rows and reused]
      -> Ray Train workers: the same `train_worker` and `fit` as pre-training; the objective
         and batch columns follow cfg.stage (raylm.objectives)

The run's record names its parent checkpoint and that checkpoint's hash (the sha256 of its
commit marker, which lists the sha256 of every file), so a served model traces back through
SFT and pre-training to the corpus.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import uuid
import warnings

import numpy as np

from raylm import checkpoint, run_lock, storage
from raylm.chat_data import dataset_key, prepare_chat, write_rows
from raylm.config import (Config, ConfigError, DataConfig, ModelConfig, check_rope_memory, from_dict,
                          recorded_config)
from raylm.data import (MANIFEST, DataError, remove_stale_attempts, actor_restarts, list_corpus,
                        prepared_datasets, read_manifest)
from raylm.generate import load_tokenizer, resolve_checkpoint, tokenizer_of
from raylm.pipeline import (absolute_paths, check_gpus_here, check_resume_before_record, check_start_over,
                            forget_summary, init_ray, keep_in_run, log, moved_places, named_where_written,
                            resolve_workers, workers_summary, write_summary)
from raylm.record import RECORD, write_record

REFERENCE_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


def parent_of(cfg: Config, recorded: str | None = None, given: frozenset = frozenset()) -> tuple[Config, dict]:
    """cfg with the parent's model shape and tokenizer, init_from pinned to the parent's
    checkpoint, and facts about the parent ({checkpoint, sha256, stage}). `recorded` is the
    checkpoint a resumed run started from (`recorded_parent`). `given`: the model.* keys the
    user set (`_check_model_overrides`). Fails before any cluster work when the parent is
    missing."""
    if not cfg.init_from:
        raise ConfigError(f"stage={cfg.stage} needs --from RUN (init_from): the run or checkpoint to start from")
    if recorded and _where(cfg.init_from) not in (_where(recorded), storage.parent(recorded)):
        recorded = _moved_parent(cfg, recorded)
    if recorded and _where(cfg.init_from) not in (_where(recorded), storage.parent(recorded)):
        raise ConfigError(f"--from {cfg.init_from}: run {cfg.run_dir} started from {recorded} and resumes from "
                          f"its own checkpoints; pass --from {storage.parent(recorded)}, or start a new run "
                          f"(another name=)")
    ckpt = recorded or resolve_checkpoint(cfg.init_from, cfg.s3)
    replaced = bool(recorded) and _replaced(cfg, ckpt)
    if replaced and cfg.stage != "sft":
        raise checkpoint.CheckpointError(
            f"{ckpt}: not the checkpoint {storage.join(cfg.run_dir, RECORD)} names (its commit marker's sha256 "
            f"differs: written again since, by a parent run started over?), and it is {cfg.stage.upper()}'s "
            f"reference: restore the one this run started from, or start a new run (another name=)")
    if replaced or recorded and not storage.exists(storage.join(ckpt, checkpoint.COMMIT_MARKER), cfg.s3):
        # The parent checkpoint is gone (deleted, or removed by its run's retention), or another
        # was written at its path (`_replaced`): an SFT run resuming from a checkpoint of its own
        # needs nothing of it, its model and tokenizer are its own, and its record keeps the
        # parent's facts. DPO's reference is the parent's weights: there it must still be there.
        if cfg.stage != "sft":
            from raylm.errors import PathNotFoundError

            raise PathNotFoundError(f"{ckpt}: no complete checkpoint there; it is the parent "
                                    f"{storage.join(cfg.run_dir, RECORD)} names and {cfg.stage.upper()}'s reference: "
                                    f"restore it, or start a new run (another name=)")
        parent_cfg, facts, ckpt = _parent_from_own_run(cfg, ckpt)
    else:
        meta = checkpoint.read_meta(ckpt, cfg.s3)
        if not isinstance(meta.get("config"), dict) or not meta.get("tokenizer"):
            raise checkpoint.CheckpointError(f"{storage.join(ckpt, checkpoint.META)}: no config or tokenizer recorded")
        parent_cfg = recorded_config(meta["config"])  # not validated again: see recorded_config
        marker = storage.read_bytes(storage.join(ckpt, checkpoint.COMMIT_MARKER), cfg.s3)
        facts = {"checkpoint": ckpt, "sha256": hashlib.sha256(marker).hexdigest(), "stage": parent_cfg.stage,
                 "tokenizer": tokenizer_of(ckpt, meta, cfg.s3), "tokenizer_sha256": meta.get("tokenizer_sha256", "")}
    _check_model_overrides(cfg, parent_cfg, ckpt, given)
    # recorded_config leaves this to the loaders, which run in the workers here: a meta.json
    # claiming model.max_seq_len=10^15 failed in their allocator, after the cluster work began.
    check_rope_memory(parent_cfg.model, where=ckpt)
    limit = parent_cfg.model.max_seq_len
    if cfg.data.seq_len > limit:
        if cfg.data.seq_len != DataConfig().seq_len:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the parent's model.max_seq_len={limit} ({ckpt})")
        log(f"data: data.seq_len={limit}, the parent model's context")  # the default, not a choice: fit it
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=limit))
    # Workers (and restarted workers) load init_from: a run directory there would mean its
    # newest checkpoint at that moment, not necessarily the one recorded here.
    cfg = dataclasses.replace(cfg, init_from=ckpt, model=parent_cfg.model,
                              tokenizer=dataclasses.replace(cfg.tokenizer, path=facts["tokenizer"]))
    return cfg, facts


def _replaced(cfg: Config, ckpt: str) -> bool:
    """Whether the recorded parent checkpoint `ckpt` is complete but no longer the one the run
    started from (the parent run started over and wrote that step again). False where the
    record holds no hash."""
    return _is_recorded_parent(cfg, ckpt) is False


def _is_recorded_parent(cfg: Config, ckpt: str) -> bool | None:
    """Whether checkpoint `ckpt`'s commit marker has the sha256 the run's record holds for its
    parent (the marker lists the sha256 of every file of the checkpoint); None where either is
    missing."""
    marker, uri = storage.join(ckpt, checkpoint.COMMIT_MARKER), storage.join(cfg.run_dir, RECORD)
    if not storage.exists(marker, cfg.s3) or not storage.exists(uri, cfg.s3):
        return None
    parent = json.loads(storage.read_text(uri, cfg.s3)).get("parent")  # a JSON object: recorded_parent read it
    sha = parent.get("sha256") if isinstance(parent, dict) else None
    if not isinstance(sha, str) or not sha:
        return None
    return hashlib.sha256(storage.read_bytes(marker, cfg.s3)).hexdigest() == sha


def _moved_parent(cfg: Config, recorded: str) -> str:
    """The recorded parent checkpoint as --from (cfg.init_from) names it, for a parent copied
    or moved since the run started (to another directory, bucket or machine, with the run
    itself, say): `<init_from>/<its name>`, or init_from itself where it ends in that name,
    where its commit marker's sha256 is the one the run's record holds (the marker lists the
    sha256 of every file of the checkpoint). Else `recorded`, which --from then does not name."""
    name = _where(recorded).rsplit("/", 1)[-1]
    here = _where(cfg.init_from)
    candidate = here if here.rsplit("/", 1)[-1] == name else storage.join(here, name)
    if _is_recorded_parent(cfg, candidate):
        log(f"{cfg.stage}: the parent checkpoint {recorded} is at {candidate} now (the same commit marker)")
        return candidate
    return recorded


def _parent_from_own_run(cfg: Config, recorded: str) -> tuple[Config, dict, str]:
    """(model config, parent facts, checkpoint named in errors) for an SFT run resuming while
    its parent checkpoint `recorded` is gone: the model and the tokenizer come from the run's
    own newest complete checkpoint, the parent's facts from the run's record."""
    own = checkpoint.latest_complete(cfg.run_dir, cfg.s3)
    meta = checkpoint.read_meta(own, cfg.s3)
    if not isinstance(meta.get("config"), dict):
        raise checkpoint.CheckpointError(f"{storage.join(own, checkpoint.META)}: no config recorded")
    record = json.loads(storage.read_text(storage.join(cfg.run_dir, RECORD), cfg.s3))  # read by recorded_parent
    recorded_facts = record["parent"]
    facts = {"checkpoint": recorded, "sha256": str(recorded_facts.get("sha256", "")),
             "stage": str(recorded_facts.get("stage", "")), "tokenizer": tokenizer_of(own, meta, cfg.s3),
             "tokenizer_sha256": meta.get("tokenizer_sha256") or str(recorded_facts.get("tokenizer_sha256", ""))}
    log(f"{cfg.stage}: the parent checkpoint {recorded} is gone (or written again since); resuming from {own} "
        f"with the run's own model and tokenizer")
    return recorded_config(meta["config"]), facts, own


def _where(uri: str) -> str:
    """`uri` written one way: absolute, without a trailing '/'."""
    return storage.absolute(uri).rstrip("/")


def recorded_parent(cfg: Config, resume: str) -> str | None:
    """The parent checkpoint in the run's record, when the run will resume from a checkpoint of
    its own: the parent may have gained a newer checkpoint since, and a resumed DPO run must keep
    the reference it started with. None for a fresh start."""
    from raylm.train import resume_point

    uri = storage.join(cfg.run_dir, RECORD)
    if resume_point(cfg, resume) is None or not storage.exists(uri, cfg.s3):
        return None
    try:
        record = json.loads(storage.read_text(uri, cfg.s3))
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{uri}: not valid JSON ({e or 'nested too deeply'}); repair it or start a new run") from None
    stage = record.get("stage") if isinstance(record, dict) else None
    if isinstance(stage, str) and stage != cfg.stage:  # resuming it would train its checkpoints on another objective
        raise ConfigError(f"{cfg.run_dir}: a stage={stage} run, not {cfg.stage}; give the {cfg.stage} run its own "
                          f"directory (another name=)")
    parent = record.get("parent") if isinstance(record, dict) else None
    if not isinstance(parent, dict) or not isinstance(parent.get("checkpoint"), str):
        raise ConfigError(f"{uri}: records no parent checkpoint; repair it or start a new run")
    return parent["checkpoint"]


def _check_model_overrides(cfg: Config, parent_cfg: Config, ckpt: str, given: frozenset = frozenset()) -> None:
    """Post-training keeps the parent's model shape: a model.* setting that differs from the
    parent's would be dropped without a word, so it is refused. Without `given` (the keys the
    user set: the CLI passes them; `model.preset` sets them all) a value that equals the
    default cannot be told from one nobody set, and is let through."""
    default = Config().model
    for f in dataclasses.fields(ModelConfig):
        ours, theirs = getattr(cfg.model, f.name), getattr(parent_cfg.model, f.name)
        set_here = f"model.{f.name}" in given or "model.preset" in given or ours != getattr(default, f.name)
        if set_here and ours != theirs:
            raise ConfigError(f"model.{f.name}={ours}: {cfg.stage} keeps the parent's model shape "
                              f"(model.{f.name}={theirs} in {ckpt}); drop the setting")


def check_records_path(cfg: Config) -> None:
    """Chat and preference records are structured: jsonl or parquet, never plain text."""
    if not cfg.data.path:
        raise ConfigError(f"stage={cfg.stage} needs --data (or data.path): the records to train on")
    text = [f.uri for f in list_corpus(cfg.data.path, cfg.s3) if f.uri.lower().endswith(".txt")]
    if text:
        raise DataError(f"{text[0]}: {cfg.stage.upper()} records come as .jsonl, .jsonl.gz or .parquet, not .txt")


def posttrain(cfg: Config, resume: str = "auto", max_failures: int = 0, given: frozenset = frozenset()) -> dict:
    """SFT or DPO (cfg.stage) from cfg.init_from on the records at data.path; returns a summary.
    `given`: the model.* keys the user set, each refused where it differs from the parent's."""
    from raylm.train import resume_point

    t0 = time.time()
    cfg = absolute_paths(cfg)
    if cfg.stage not in ("sft", "dpo"):
        raise ConfigError(f"stage={cfg.stage!r}: post-training is sft or dpo")
    if cfg.stage == "dpo":  # before any cluster work; the workers' objective checks it again
        from raylm.objectives import check_dpo_train_settings

        check_dpo_train_settings(cfg.train)
    cfg, parent = parent_of(cfg, recorded_parent(cfg, resume), given)
    check_records_path(cfg)
    check_gpus_here(cfg)
    if resume == "must":  # --resume with nothing to resume: say so before anything is written
        resume_point(cfg, resume)
    with run_lock.held(cfg.run_dir, s3=cfg.s3):  # before anything is written there
        return _posttrain(cfg, parent, resume, max_failures, t0)


def _posttrain(cfg: Config, parent: dict, resume: str, max_failures: int, t0: float) -> dict:
    from raylm.train_ray import raise_if_worker_died, run_ray_training

    tok = load_tokenizer(cfg.tokenizer.path, cfg.s3)
    if parent["tokenizer_sha256"] and tok.sha256 != parent["tokenizer_sha256"]:
        raise checkpoint.CheckpointError(f"{cfg.tokenizer.path}: tokenizer hash {tok.sha256[:12]} differs from the "
                                         f"one {parent['checkpoint']} was trained with")
    own = storage.join(cfg.run_dir, "tokenizer")  # a self-contained run carries its tokenizer
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=own))
    check_resume_before_records(cfg, resume, tok, parent)  # a refused resume prepares no records first
    keep_in_run(tok, own, cfg.s3)
    init_ray(cfg, training=True)
    cfg = resolve_workers(cfg)
    data_dir = storage.join(cfg.run_dir, "data")
    manifest = prepare_chat(cfg.stage, cfg.data, tok, data_dir, cfg.seed, cfg.s3, log=log)
    if cfg.stage == "dpo" and cfg.dpo.precompute_reference:
        data_dir, manifest = precompute_reference(cfg, data_dir, manifest, parent)
    # A refused resume leaves the run's record as it was; one accepted as moved tells the workers the key.
    moved = check_resume_before_record(cfg, resume, manifest,
                                       functools.partial(moved_records_key, cfg, tok, parent))
    manifest = dict(manifest, moved_key=moved) if moved else manifest
    forget_summary(cfg, resume)  # the run changes from here on (resume="never": from step 0)
    record = write_record(cfg, cfg.stage, tok, manifest, extra={"parent": parent})
    log(f"{cfg.stage}: {workers_summary(cfg)} from {parent['checkpoint']} "
        f"({manifest['train']['blocks']} train rows), run record {record}")
    try:
        result = run_ray_training(cfg, prepared_datasets(data_dir, manifest, cfg.s3), manifest, resume=resume,
                                  max_failures=max_failures)
        if result.error:
            raise result.error
    except Exception as e:
        raise_if_worker_died(cfg, e, max_failures)
        raise
    summary = summarize(cfg)
    summary.update(parent=parent["checkpoint"], seconds=round(time.time() - t0, 1))
    write_summary(cfg, summary)
    return summary


def check_resume_before_records(cfg: Config, resume: str, tok, parent: dict) -> None:
    """`check_resume_before_record` before Ray, the records' preparation and DPO's reference
    pass, so that a refused resume does not first tokenize the records (and score them with the
    reference) again under the refused settings: the tokenizer is the parent's, and the data's
    key follows from the records' listing (`resume_facts`). The check after the data stays, for
    records that change in between."""
    from raylm.train import resume_point

    if resume_point(cfg, resume) is not None:
        check_resume_before_record(cfg, resume, resume_facts(cfg, tok, parent),
                                   functools.partial(moved_records_key, cfg, tok, parent), say=False)
    else:
        check_start_over(cfg, resume)


def resume_facts(cfg: Config, tok, parent: dict) -> dict:
    """The tokenizer hash and data key the run's data will have, as `prepare_chat` keys the
    records (`dataset_key` over their listing) and `precompute_reference` its stored pass
    (`reference_key`), without preparing either."""
    key = dataset_key(cfg.stage, list_corpus(cfg.data.path, cfg.s3), cfg.data, tok.sha256, cfg.seed)
    if cfg.stage == "dpo" and cfg.dpo.precompute_reference:
        key = reference_key(cfg, parent, key)
    return {"tokenizer_sha256": tok.sha256, "key": key}


def moved_records_key(cfg: Config, tok, parent: dict, meta: dict) -> str:
    """`resume_facts`' key with the records named where the checkpoint whose meta.json is
    `meta` was written (raylm.pipeline.moved_data_key): '' where the run has not moved."""
    places = moved_places(cfg, meta)
    if not places:
        return ""
    files = named_where_written(list_corpus(cfg.data.path, cfg.s3), places)
    key = dataset_key(cfg.stage, files, cfg.data, tok.sha256, cfg.seed)
    return reference_key(cfg, parent, key) if cfg.stage == "dpo" and cfg.dpo.precompute_reference else key


def summarize(cfg: Config) -> dict:
    """The last validation row of the run's metrics, and where the run is."""
    from raylm.metrics import read_metrics

    rows = read_metrics(storage.join(cfg.run_dir, "metrics.jsonl"), cfg.s3)
    val = [r for r in rows if r.get("kind") == "val"]
    summary = {"run_dir": cfg.run_dir, "stage": cfg.stage, "steps": max((r["step"] for r in rows), default=0)}
    if val:
        summary.update({k: v for k, v in val[-1].items() if k.startswith("val_")})
        log(f"done: {cfg.stage} step {summary['steps']}, " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items() if k.startswith("val_")))
    return summary


# --------------------------------------------------------------------------- DPO reference


# Pairs per forward of the CPU pass: what it has always used, so its results (and the keys of
# passes already stored) stay as they were.
CPU_REFERENCE_BATCH = 64


@dataclasses.dataclass(frozen=True)
class ReferencePass:
    """How the dpo.precompute_reference pass runs: the numbers it writes must be the ones the
    live frozen reference (raylm.train.reference_model) would compute beside the policy, or
    DPO's implicit reward starts away from zero, by precision noise summed over each response.
    So the reference runs where the policy trains (CUDA with train.use_gpu), in its compute
    dtype (train.precision resolved for that device: bf16 on CUDA, as FSDP2's mixed-precision
    compute copies; fp32 on CPU), with its head chunking (train.loss_chunk_size)."""

    device: str  # "cuda" or "cpu"
    precision: str  # "bf16" or "fp32"
    chunk_size: int  # sequence_logprobs' chunk_size; 0: the full logits
    actors: int  # one model each
    batch_size: int  # pairs per forward
    num_gpus: int  # per actor
    num_cpus: float  # per actor

    def numerics(self) -> str:
        """What the numbers depend on besides the checkpoint and the rows. "" for the CPU's fp32
        full-logits pass, whose keys predate this, so its stored passes are still reused."""
        tag = f"{self.device}:{self.precision}" + (f":chunk{self.chunk_size}" if self.chunk_size else "")
        return "" if tag == "cpu:fp32" else tag


def reference_pass(cfg: Config, pairs: int | None = None) -> ReferencePass:
    """The reference pass for `pairs` rows (None: not known) of cfg's run, after
    `resolve_workers` (no cluster, no torch: a pure function).
    On GPUs: one GPU per actor, up to train.num_workers actors (the pass runs before training,
    so the GPUs its workers will hold are free), none idle on a small split, each scoring
    train.micro_batch_size pairs a forward (what a training step already fits beside its
    gradients). On CPU: one single-CPU actor, as before."""
    device = "cuda" if cfg.train.use_gpu else "cpu"
    tc = cfg.train.for_device(device)
    if device == "cuda":
        workers = tc.num_workers if isinstance(tc.num_workers, int) else 1
        batch = tc.micro_batch_size
        actors = workers if pairs is None else max(1, min(workers, -(-pairs // batch)))
        return ReferencePass(device, tc.precision, int(tc.loss_chunk_size), actors, batch, num_gpus=1, num_cpus=1.0)
    return ReferencePass(device, tc.precision, int(tc.loss_chunk_size), 1, CPU_REFERENCE_BATCH, num_gpus=0,
                         num_cpus=1.0)


def load_reference(cfg: Config, ckpt: str, device: str, precision: str):
    """The reference model of the pass, weights only, in `precision` on `device`: parameters
    cast to bf16 as FSDP2's MixedPrecisionPolicy casts its compute copies (so it computes as the
    live sharded reference does), the RoPE tables fp32 whatever the parameters' dtype (as
    there). Built on meta and filled once by the checkpoint's weights."""
    import torch

    from raylm.generate import check_fits, checked_meta_model

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = checked_meta_model(ckpt, cfg.model, cfg.s3)  # the checkpoint's index, before allocating
    check_fits(ckpt, cfg.model, dtype, device)
    model.to(dtype)  # on meta: only the dtype changes
    model.to_empty(device=device)
    model.init_buffers()
    checkpoint.load_model_weights(model, ckpt, cfg.s3)  # every parameter, cast to dtype
    return model.requires_grad_(False).eval()


class ReferenceLogprobs:
    """Ray Data stage (actor pool): each actor loads the reference weights once, weights only,
    and adds the sequence log-probabilities of both responses to each batch of pair rows,
    computed as `ReferencePass` says (device, dtype, head chunking)."""

    def __init__(self, cfg_dict: dict, ckpt: str, device: str = "cpu", precision: str = "fp32",
                 chunk_size: int = 0):
        self.device, self.chunk_size = device, chunk_size
        self.model = load_reference(from_dict(cfg_dict), ckpt, device, precision)

    def __call__(self, batch: dict) -> dict:
        import torch

        from raylm.objectives import reference_logprobs

        cols = {k: torch.as_tensor(np.stack(batch[k])).to(self.device, torch.bool if k.endswith("mask") else torch.long)
                for k in ("chosen", "chosen_mask", "rejected", "rejected_mask")}
        with torch.no_grad():
            ref = reference_logprobs(self.model, cols, self.chunk_size)
        return {**batch, **{k: v.float().cpu().numpy() for k, v in ref.items()}}


def precompute_reference(cfg: Config, data_dir: str, manifest: dict, parent: dict) -> tuple[str, dict]:
    """dpo.precompute_reference: one Ray Data pass over the pair rows computes the reference
    model's log-probabilities, written with the rows under `reference-<hash>/` beside the
    data. The hash covers the reference checkpoint's, the data's and the numerics of the pass
    (`ReferencePass.numerics`: device, dtype, chunking), so a rerun reuses it, and a run whose
    policy computes otherwise gets its own."""
    import ray

    plans = {split: reference_pass(cfg, (manifest.get(split) or {}).get("blocks")) for split in ("train", "val")}
    key = reference_key(cfg, parent, manifest["key"])
    out = storage.join(data_dir, f"reference-{key[:16]}")
    existing = read_manifest(out, cfg.s3)
    if existing and existing.get("key") == key:
        log(f"dpo: reusing reference log-probs at {out}")
        return out, existing
    t0 = time.time()
    # Rows come back in the order they went in (with several actors too), so the stored
    # dataset keeps the prepared one's order; each row carries its own pair either way.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    datasets = prepared_datasets(data_dir, manifest, cfg.s3)
    plan = plans["train"]
    new = dict(manifest, key=key, columns=[*manifest["columns"], *REFERENCE_COLUMNS],
               row_bytes=manifest["row_bytes"] + 8,
               reference=dict(parent, device=plan.device, precision=plan.precision, chunk_size=plan.chunk_size))
    attempt = storage.join(out, f"attempt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    rel = storage.relative(attempt, out)
    log(f"dpo: reference log-probs on {plan.device} in {plan.precision}, up to {plan.actors} "
        f"actor(s), {plan.batch_size} pairs a forward")
    for split, ds in datasets.items():
        p = plans[split]
        with warnings.catch_warnings():  # max_restarts has no named parameter yet (Ray 2.60)
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            scored = ds.map_batches(ReferenceLogprobs, batch_size=p.batch_size, batch_format="numpy",
                                    fn_constructor_kwargs={"cfg_dict": _plain(cfg), "ckpt": parent["checkpoint"],
                                                           "device": p.device, "precision": p.precision,
                                                           "chunk_size": p.chunk_size},
                                    compute=ray.data.ActorPoolStrategy(size=p.actors), num_cpus=p.num_cpus,
                                    num_gpus=p.num_gpus, max_restarts=actor_restarts())
        rows = [dict(zip(b, vals)) for b in scored.iter_batches(batch_format="numpy", batch_size=None)
                for vals in zip(*b.values())]
        shards = write_rows(attempt, split, rows, manifest["seq_len"] + 1, cfg.data.blocks_per_shard, cfg.s3)
        new[split] = {"blocks": len(rows), "shards": [dict(x, path=f"{rel}/{x['path']}") for x in shards]}
    storage.write_text(storage.join(out, MANIFEST), json.dumps(new, indent=1), cfg.s3)  # last: the commit
    remove_stale_attempts(out, rel, cfg.s3)  # an interrupted pass's shards, never named by a manifest
    log(f"dpo: reference log-probs for {new['train']['blocks'] + new['val']['blocks']} pairs in "
        f"{time.time() - t0:.1f}s -> {out}")
    return out, new


def reference_key(cfg: Config, parent: dict, data_key: str) -> str:
    """The key of the stored reference pass over the data keyed `data_key`: the reference
    checkpoint's hash, the data's key, and the numerics of the pass (which do not depend on
    the number of pairs)."""
    numerics = reference_pass(cfg).numerics()
    return hashlib.sha256(":".join([parent["sha256"], data_key, *([numerics] if numerics else [])])
                          .encode()).hexdigest()


def _plain(cfg: Config) -> dict:
    from raylm.config import to_dict

    return to_dict(cfg)


# --------------------------------------------------------------------------- quickstart


QUICKSTART_TASK = "word_after"  # copying from the prompt: learnt by the tiny model in a few hundred steps


def _holds_the_same(uri: str, local_dir: str, s3) -> bool:
    """Whether `uri` holds each file of the local directory `local_dir`, byte for byte."""
    for name in sorted(os.listdir(local_dir)):
        target = storage.join(uri, name)
        with open(os.path.join(local_dir, name), "rb") as f:
            if not storage.exists(target, s3) or storage.read_bytes(target, s3) != f.read():
                return False
    return True


def quickstart_sft(base: Config, steps: int = 200, log_chat=print) -> dict:
    """The quickstart's last stage: SFT of the freshly pre-trained run on a built-in
    synthetic instruction set (raylm.synthetic), then one chat exchange and the held-out exact
    match. The records are written beside the run, so the stage is an ordinary `raylm sft`."""
    import dataclasses
    import tempfile

    from raylm import synthetic
    from raylm.generate import chat_reply, load_for_inference

    records = storage.join(base.storage, f"{base.name}-sft-records")
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic.write_jsonl(tmp, QUICKSTART_TASK, 2000, 50, seed=base.seed)
        held = synthetic.read_jsonl(paths["heldout.messages"])
        # Written again, the same records would key the SFT run's data anew (their dates are in
        # its key) and a rerun's resume would be refused: written only where they differ.
        if not _holds_the_same(records, tmp, base.s3):
            storage.upload_dir(tmp, records, base.s3)
    train_records = storage.join(records, f"{QUICKSTART_TASK}.train.messages.jsonl")
    cfg = dataclasses.replace(
        base, name=f"{base.name}-sft", stage="sft", init_from=base.run_dir,
        # The corpus's data.val_path (pre-training's held-out text) is no records file: SFT holds out its own.
        data=dataclasses.replace(base.data, path=train_records, val_path="", val_fraction=0.05),
        train=dataclasses.replace(base.train, lr=1e-3, max_steps=steps, warmup_steps=10, eval_every=100,
                                  ckpt_every=steps, time_budget_s=0.0))
    summary = posttrain(cfg.validate())
    model, tok, _ = load_for_inference(cfg.run_dir, cfg.s3)
    prompt, answer = synthetic.prompt_and_answer(held[0])
    reply = chat_reply(model, tok, prompt, 16)
    score = synthetic.exact_match(synthetic.chat_generate_fn(model, tok), held)
    log_chat(f"\nchat with {cfg.run_dir} (SFT on '{QUICKSTART_TASK}', held-out exact match {score:.0%} "
             f"on {len(held)} prompts):\n  user: {prompt[-1]['content']}\n  assistant: {reply}"
             f"{'' if reply.strip() == answer else f'   (expected: {answer})'}")
    summary.update(chat={"user": prompt[-1]["content"], "assistant": reply}, heldout_exact_match=score)
    return summary
