"""Training that survives failures: real 2-worker Ray Train runs (FSDP2 over gloo), with the
run (checkpoints, commit markers, metrics) and the prepared data in S3 (SeaweedFS on loopback).

Every run here trains the same small model on the same blocks for 10 steps, checkpointing
every 4, and is compared with one uninterrupted run:
  - a worker that raises, or is killed with SIGKILL, and the worker group restarted;
  - a run checkpointed by 2 workers resumed on 1, and by 1 resumed on 2;
  - a NaN loss on one rank: the step is skipped everywhere, model and optimizer untouched;
  - an upload cut halfway (a TCP proxy in front of S3 resets it, and every retry): the
    half-written checkpoint is never loaded, and the healed rerun resumes from the one before.
Each asserts the per-step losses, the blocks consumed and which checkpoint was loaded.

Which checkpoint a failure right after the step-8 save leaves as the newest complete one
depends on the save mode, and is deterministic in both: a synchronous save commits before
training goes on (8); an asynchronous one (the default) is committed by a later step, once
every rank reports its upload done, so the failure comes first (4).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import uuid
import warnings

import pytest
import ray.train
import torch
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from raylm import checkpoint, storage
from raylm.config import load_config
from raylm.data import prepared_datasets
from raylm.train_ray import run_ray_training
from tests.small import SMALL
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration

STEPS = 10
# timeout_s: a run that hangs fails instead of blocking CI (each takes 20-40 s on 2 cores).
SCHEDULE = [f"train.max_steps={STEPS}", "train.log_every=1", "train.eval_every=100", "train.ckpt_every=4",
            "train.keep_checkpoints=5", "train.timeout_s=300"]
BLOCKS_PER_STEP = 8  # train.global_batch_size in SMALL


def config(prepared, name: str, *overrides: str):
    base, data_dir, _ = prepared
    return load_config(overrides=[
        f"storage={base.storage}", f"name={name}", f"data.path={data_dir}", f"tokenizer.path={base.tokenizer.path}",
        f"model.vocab_size={base.model.vocab_size}", *SMALL, *SCHEDULE, *overrides])


@contextlib.contextmanager
def injected(failure: str | None):
    """RAYLM_INJECT_FAILURE for the runs started inside (run_ray_training hands RAYLM_* to workers)."""
    if failure:
        os.environ["RAYLM_INJECT_FAILURE"] = failure
    try:
        yield
    finally:
        os.environ.pop("RAYLM_INJECT_FAILURE", None)


def train(prepared, cfg, failure: str | None = None, resume: str = "auto", max_failures: int = 0):
    """One Ray Train run; returns the error that ended it, or None."""
    _, data_dir, manifest = prepared
    with injected(failure):
        try:
            result = run_ray_training(cfg, prepared_datasets(data_dir, manifest, cfg.s3), manifest, resume=resume, max_failures=max_failures)
        except ray.train.TrainingFailedError as e:
            return e
    return result.error


def train_rows(cfg) -> list[dict]:
    """The run's kind=train metrics rows, read straight from the S3 server (not via cfg.s3), as
    raylm reads them (a non-finite value is written as null and read back as a float)."""
    from raylm.eval.report import metrics_rows

    uri = storage.join(cfg.run_dir, "metrics.jsonl")
    return [r for r in metrics_rows(storage.read_text(uri), uri) if r.get("kind") == "train"]


def key(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"], r["consumed_blocks"]) for r in rows]


RESUMED = re.compile(r"resumed from (\S+) \(step (\d+), (\d+) blocks consumed, written by (\d+) workers\)")


def resumed_from(out: str) -> list[tuple[str, int, int, int]]:
    """(checkpoint, step, blocks consumed, writers) of every resume the run logged."""
    return [(m[1], int(m[2]), int(m[3]), int(m[4])) for m in RESUMED.finditer(out)]


def ckpt(cfg, step: int) -> str:
    return storage.join(cfg.run_dir, checkpoint.checkpoint_name(step))


def _address() -> str:
    """This session's cluster: without an address, Ray's state API looks for "the" cluster on
    the machine, and refuses when another runs (a test beside this one starting its own)."""
    import ray

    return ray.get_runtime_context().gcs_address


def cleaners() -> set[str]:
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(address=_address(), filters=[("class_name", "=", "PlacementGroupCleaner")],
                                            limit=1000)}


def run_actors() -> dict[str, tuple[str, str]]:
    """actor id -> (class, serialized runtime_env) of Ray Train's actors of a run."""
    from ray.util.state import list_actors

    kinds = {"LocalTrainController", "TrainController", "SynchronizationActor", "RayTrainWorker", "DatasetManager"}
    return {a.actor_id: (a.class_name, a.serialized_runtime_env or "{}")
            for a in list_actors(address=_address(), detail=True, limit=1000) if a.class_name in kinds}


@pytest.fixture(scope="module")
def uninterrupted(prepared):
    cfg = config(prepared, "clean")
    before, actors_before = cleaners(), run_actors()
    assert train(prepared, cfg) is None
    # This process started the cluster (the ray_local fixture, as `raylm` starts one): it ends
    # with this process, and Ray Train's placement-group cleaner is left out (trainer_class).
    assert cleaners() == before
    # ... and no actor of the run has a runtime_env of its own (each would otherwise wait for a
    # new process through the runtime-env agent): the settings come from the cluster's
    # environment (raylm.pipeline.LOCAL_ENV, raylm.train_controller).
    new = {k: v for k, v in run_actors().items() if k not in actors_before}
    assert {"LocalTrainController", "RayTrainWorker", "SynchronizationActor"} <= {c for c, _ in new.values()}, new
    assert all(env == "{}" for _, env in new.values()), new
    rows = train_rows(cfg)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["consumed_blocks"] for r in rows] == [BLOCKS_PER_STEP * s for s in range(1, STEPS + 1)]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    return rows


@pytest.mark.parametrize("kind,async_ckpt,loaded", [("raise", False, 8), ("sigkill", True, 4)],
                         ids=["raise-sync-ckpt", "sigkill-async-ckpt"])
def test_worker_failure_resumes_bit_exact(prepared, uninterrupted, kind, async_ckpt, loaded, capfd):
    """Rank 1 fails right after saving the step-8 checkpoint; the restarted group resumes from
    the newest complete one: 8 when saves are synchronous, 4 when the step-8 upload was still
    in flight (SIGKILL then leaves it half-written, without COMMITTED)."""
    cfg = config(prepared, f"fail-{kind}", f"train.async_checkpoint={str(async_ckpt).lower()}")
    capfd.readouterr()
    assert train(prepared, cfg, f"step=8,rank=1,kind={kind}", max_failures=1) is None
    out = capfd.readouterr().out
    assert storage.exists(storage.join(cfg.run_dir, "injected-failure-8")), "the failure was never injected"
    assert resumed_from(out) == [(ckpt(cfg, loaded), loaded, BLOCKS_PER_STEP * loaded, 2)], out[-3000:]
    rows = train_rows(cfg)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert key(rows) == key(uninterrupted), "losses after recovery differ from the uninterrupted run"
    assert [(s, done) for s, _, done in checkpoint.list_checkpoints(cfg.run_dir)] == [(4, True), (8, True), (10, True)]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_resume_on_a_different_number_of_workers(prepared, uninterrupted, before, after, capfd):
    """`before` workers checkpoint at step 4 (the step-8 upload still in flight) and then fail
    for good; `after` workers resume. DCP reshards model and optimizer, the global batch stays
    8 (1 worker accumulates 2 micro-batches), and the data stream continues at the same block.
    Losses match the 2-worker run to round-off, not bit for bit: the reduction order differs."""
    name = f"reshard-{before}to{after}"

    def workers(n: int) -> list[str]:
        return [f"train.num_workers={n}", f"train.cpus_per_worker={2 // n}", "train.async_checkpoint=true"]

    cfg = config(prepared, name, *workers(before))
    assert isinstance(train(prepared, cfg, "step=8,rank=0,kind=raise"), ray.train.TrainingFailedError)
    assert checkpoint.latest_complete(cfg.run_dir) == ckpt(cfg, 4)
    capfd.readouterr()
    assert train(prepared, config(prepared, name, *workers(after)), resume="must") is None
    out = capfd.readouterr().out
    assert resumed_from(out) == [(ckpt(cfg, 4), 4, 4 * BLOCKS_PER_STEP, before)], out[-3000:]
    rows = train_rows(cfg)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["consumed_blocks"] for r in rows] == [r["consumed_blocks"] for r in uninterrupted]
    if before == 2:
        assert key(rows[:4]) == key(uninterrupted[:4])
    differ = [g["step"] for g, w in zip(rows, uninterrupted) if g["loss"] != pytest.approx(w["loss"], rel=1e-4)]
    assert not differ, differ


# --------------------------------------------------------------------------- NaN


def load_dcp_state(uri: str, local_dir) -> dict[str, object]:
    """Every entry of a DCP checkpoint (model and optimizer), flattened to dotted keys,
    read in this process without a process group, metadata through raylm's safe reader."""
    storage.download_dir(uri, str(local_dir))
    with warnings.catch_warnings():  # "no process group, loading in a single process": intended
        warnings.simplefilter("ignore", UserWarning)
        state = _load_state_dict_from_keys(storage_reader=checkpoint.SafeReader(str(local_dir)))
    flat: dict[str, object] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = node

    walk("", state)
    return flat


def test_nan_loss_on_one_rank_skips_the_step_on_every_rank(prepared, tmp_path, capfd):
    """Rank 1's loss is NaN at step 4. The NaN reaches rank 0 through the gradient
    reduction, so both skip the optimizer step: checkpoints 3 and 4 hold bitwise-equal
    model and optimizer tensors (every rank's shards), and step 5 trains again."""
    k = 4
    cfg = config(prepared, "nan", "train.max_steps=6", "train.ckpt_every=1", "train.keep_checkpoints=10")
    capfd.readouterr()
    assert train(prepared, cfg, f"step={k},rank=1,kind=nan") is None
    out = capfd.readouterr().out
    before, at, after = (load_dcp_state(ckpt(cfg, s), tmp_path / str(s)) for s in (k - 1, k, k + 1))
    tensors = [name for name, v in at.items() if isinstance(v, torch.Tensor)]
    model = [n for n in tensors if n.startswith("model.")]
    optim = [n for n in tensors if n.startswith("optim.state.")]
    assert model and {n.rsplit(".", 1)[1] for n in optim} == {"exp_avg", "exp_avg_sq", "step"}, sorted(at)
    assert set(before) == set(at) == set(after)
    changed = [n for n in tensors if not torch.equal(before[n], at[n])]
    assert changed == [], f"the skipped step {k} changed {changed}"
    assert all(torch.isfinite(at[n]).all() for n in tensors)
    unchanged = [n for n in tensors if torch.equal(at[n], after[n])]
    assert unchanged == [], f"step {k + 1} did not train {unchanged}"
    steps = {n: float(after[n]) - float(at[n]) for n in optim if n.endswith(".step")}
    assert set(steps.values()) == {1.0}, steps

    rows = train_rows(cfg)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["skipped_steps"] for r in rows] == [0] * (k - 1) + [1] * (7 - k)
    assert not math.isfinite(rows[k - 1]["loss"]) and not math.isfinite(rows[k - 1]["grad_norm"])
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != k - 1)
    assert [r["consumed_blocks"] for r in rows] == [BLOCKS_PER_STEP * s for s in range(1, 7)]  # the data moved on
    assert f"step {k}: non-finite loss" in out and "optimizer step skipped" in out


# --------------------------------------------------------------------------- cut upload


def test_proxy_cuts_matching_requests_and_retries_until_healed(s3_server):
    """The proxy itself, against the S3 server with botocore and its retries: a cut PUT fails
    on every attempt and stores nothing, other requests pass, and heal() lets it through."""
    import boto3
    import botocore.config
    import botocore.exceptions

    with TcpProxy(s3_server.endpoint) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1",
                              aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key,
                              config=botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 3},
                                                            s3={"addressing_style": "path"}))
        prefix = f"proxy-{uuid.uuid4().hex[:8]}"
        body = os.urandom(200_000)
        client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/ok", Body=body)
        proxy.cut(f"/{prefix}/cut".encode(), after_bytes=50_000)
        with pytest.raises(botocore.exceptions.BotoCoreError):  # connection reset / closed
            client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/cut", Body=body)
        assert proxy.cuts == 3 and all(b"PUT /" in r for r in proxy.cut_requests), proxy.cut_requests
        client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/ok2", Body=body)  # not cut
        keys = {o["Key"] for o in s3_server.client().list_objects_v2(
            Bucket=s3_server.bucket, Prefix=prefix)["Contents"]}
        assert keys == {f"{prefix}/ok", f"{prefix}/ok2"}
        proxy.heal()
        client.put_object(Bucket=s3_server.bucket, Key=f"{prefix}/cut", Body=body)
        assert s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"{prefix}/cut")["Body"].read() == body
        assert proxy.cuts == 3
    s3_server.delete_prefix(prefix + "/")


def test_upload_cut_halfway_is_never_loaded(prepared, uninterrupted, s3_server, capfd):
    """The workers reach S3 through a proxy that resets rank 1's upload of its step-8
    checkpoint shard a few KB into the body, on every retry (pyarrow's, then Ray's). The run
    fails, leaving ckpt-00000008 half-written (rank 0's files, no COMMITTED); the newest
    complete checkpoint is 4. Healed, the rerun resumes from 4 and matches the uninterrupted
    run bit for bit.

    s3.max_attempts=2: with the default 8, pyarrow backs off for about a minute before an
    upload fails, and Ray tries the upload 3 times; the cut holds just the same."""
    with TcpProxy(s3_server.endpoint) as proxy:
        cfg = config(prepared, "cut", f"s3.endpoint_url={proxy.url}", "s3.max_attempts=2")
        ckpt8 = ckpt(cfg, 8)
        bucket, key8 = ckpt8[len("s3://"):].split("/", 1)
        # The request line of an UploadPart (pyarrow uploads even small files in parts): the
        # multipart upload starts, and its data is cut off mid-body.
        pattern = f"PUT /{bucket}/{key8}/__1_".encode()
        proxy.cut(pattern, after_bytes=4096)
        error = train(prepared, cfg)
        left = {o["Key"][len(key8) + 1:] for o in s3_server.client().list_objects_v2(
            Bucket=bucket, Prefix=key8 + "/").get("Contents", [])}
        found = [(s, done) for s, _, done in checkpoint.list_checkpoints(cfg.run_dir)]
        assert proxy.cuts >= 2, f"expected the first try and at least one retry to be cut, got {proxy.cuts}"
        assert all(pattern in r for r in proxy.cut_requests), proxy.cut_requests
        assert isinstance(error, ray.train.TrainingFailedError), (
            f"the run went on as if the upload had succeeded ({proxy.cuts} uploads cut): checkpoints "
            f"(step, complete) {found}; ckpt-00000008 holds {sorted(left)}")

        assert checkpoint.latest_complete(cfg.run_dir) == ckpt(cfg, 4)
        assert found == [(4, True), (8, False)]
        assert checkpoint.COMMIT_MARKER not in left and not any(n.startswith("__1_") for n in left), left

        proxy.heal()
        capfd.readouterr()
        assert train(prepared, cfg) is None
        out = capfd.readouterr().out
    assert resumed_from(out) == [(ckpt(cfg, 4), 4, 4 * BLOCKS_PER_STEP, 2)], out[-3000:]
    rows = train_rows(cfg)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert key(rows) == key(uninterrupted), "losses after the cut upload differ from the uninterrupted run"
    assert [(s, done) for s, _, done in checkpoint.list_checkpoints(cfg.run_dir)] == [(4, True), (8, True), (10, True)]
    assert storage.exists(storage.join(ckpt8, "__1_0.distcp"))
