"""Recipes (raylm/recipe.py): files a stage reads that no stage writes, beyond the corpus and
the records: a run or checkpoint outside the recipe that a model stage starts from
(`init_from`). Replaced, it left the stage skipped, its record claiming the new ones. A record written
before raylm listed them keeps its stage, and gains their digests for the next run. No Ray:
the training stages are stand-ins that, like the real ones, resume their own newest checkpoint
when there is one. A refused resume leaves no `.raylm.lock` behind (raylm/run_lock.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import raylm.recipe as R
from raylm import checkpoint, run_lock
from raylm.errors import ConfigError, StorageError
from raylm.recipe import load_recipe, read_stage_record, run_recipe

QUIET = dict(log=lambda m: None)


def _commit(ck: Path, content: str) -> str:
    ck.mkdir(parents=True, exist_ok=True)
    (ck / checkpoint.COMMIT_MARKER).write_text(content)
    return str(ck)


def _trainer(made_from):
    """A training stage's stand-in: resumes its own checkpoint if there is one (the real ones
    do, resume="auto"); else commits one whose marker says what it was made from."""

    def run(run):
        own = Path(run.out) / checkpoint.checkpoint_name(2)
        if not (own / checkpoint.COMMIT_MARKER).exists():
            _commit(own, made_from(run))
        marker = (own / checkpoint.COMMIT_MARKER).read_text()
        return {"path": run.out, "checkpoint": str(own), "sha256": hashlib.sha256(marker.encode()).hexdigest()}

    return run


def _starting_weights(run) -> str:
    from raylm.generate import resolve_checkpoint

    return "from " + (Path(resolve_checkpoint(run.cfg.init_from)) / checkpoint.COMMIT_MARKER).read_text()


def _use(monkeypatch, runs: dict) -> None:
    stages = tuple(dataclasses.replace(s, run=runs[s.name]) if s.name in runs else s for s in R.STAGES)
    monkeypatch.setattr(R, "STAGES", stages)
    monkeypatch.setattr(R, "STAGE_BY_NAME", {s.name: s for s in stages})
    monkeypatch.setattr(R, "_trained_on_other_data", lambda cfg: False)  # stand-ins record no data


def _marker(record: dict) -> str:
    return (Path(record["outputs"]["checkpoint"]) / checkpoint.COMMIT_MARKER).read_text()


def _skipped(path) -> bool:
    return all(r["skipped"] for r in run_recipe(load_recipe(str(path)), **QUIET).values())


def test_pretraining_from_an_outside_run_that_trained_on_runs_again(tmp_path, monkeypatch):
    """init_from names another run, which has since committed a newer checkpoint: pre-training
    started from its old one was skipped, and would have resumed itself if run."""
    _use(monkeypatch, {"pretrain": _trainer(_starting_weights)})
    outside = tmp_path / "outside"
    _commit(outside / checkpoint.checkpoint_name(2), "outside step 2")
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n"
                    f"  pretrain: {{data.path: /c.txt, init_from: {outside}}}\n")
    first = run_recipe(load_recipe(str(path)), **QUIET)["pretrain"]
    assert _marker(first) == "from outside step 2" and _skipped(path)
    _commit(outside / checkpoint.checkpoint_name(4), "outside step 4")
    logs = []
    second = run_recipe(load_recipe(str(path)), log=logs.append)["pretrain"]
    assert not second["skipped"] and _marker(second) == "from outside step 4"
    assert f"recipe: pretrain: {outside} changed since it ran, running it again" in logs
    assert _skipped(path)


def test_sft_from_an_outside_checkpoint_that_was_replaced_runs_again(tmp_path, monkeypatch):
    """init_from names one checkpoint, written again in place (another run saved under the name)."""
    _use(monkeypatch, {"sft": _trainer(_starting_weights)})
    ck = tmp_path / "outside" / checkpoint.checkpoint_name(2)
    _commit(ck, "first weights")
    records = tmp_path / "chat.jsonl"
    records.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n"
                    f"  sft: {{data.path: {records}, init_from: {ck}}}\n")
    assert _marker(run_recipe(load_recipe(str(path)), **QUIET)["sft"]) == "from first weights"
    assert _skipped(path)
    _commit(ck, "other weights, written again")
    second = run_recipe(load_recipe(str(path)), **QUIET)["sft"]
    assert not second["skipped"] and _marker(second) == "from other weights, written again"


def _eval_recipe(tmp_path, monkeypatch) -> tuple[Path, Path]:
    def made_from(run):
        return "evaluated on " + "".join(Path(p).read_text() for p in run.cfg.eval.mc_tasks)

    _use(monkeypatch, {"pretrain": _trainer(made_from)})
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "2+2=", "choices": ["4", "5"], "gold": 0}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n"
                    f"  pretrain: {{data.path: /c.txt, eval.every: 1, eval.mc_tasks: [{task}]}}\n")
    return path, task


def test_in_training_eval_tasks_edited_keep_pretraining(tmp_path, monkeypatch):
    """eval.every with eval.mc_tasks: an edit changes what the run's eval rows would have
    said, not its weights, so the trained stage is kept (the eval stage scores it anew)."""
    path, task = _eval_recipe(tmp_path, monkeypatch)
    run_recipe(load_recipe(str(path)), **QUIET)
    task.write_text('{"context": "3+3=", "choices": ["6", "7"], "gold": 0}\n')
    assert _skipped(path)


def test_a_record_that_lists_fewer_files_keeps_its_stage_and_learns_them(tmp_path, monkeypatch):
    """A record from a raylm that listed only the corpus: its stage is kept (not trained again
    on an upgrade), and the outside init_from it did not list is recorded, so a later
    checkpoint there is seen."""
    _use(monkeypatch, {"pretrain": _trainer(_starting_weights)})
    outside = tmp_path / "outside"
    _commit(outside / checkpoint.checkpoint_name(2), "outside step 2")
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n"
                    f"  pretrain: {{data.path: /c.txt, init_from: {outside}}}\n")
    recipe = load_recipe(str(path))
    run_recipe(recipe, **QUIET)
    uri = Path(R.record_uri(recipe, "pretrain"))
    record = json.loads(uri.read_text())
    assert list(record["options"][R.INPUT_FILES]) == ["/c.txt", str(outside)]
    del record["options"][R.INPUT_FILES][str(outside)]
    uri.write_text(json.dumps(record))
    assert _skipped(path)
    assert list(read_stage_record(recipe, "pretrain", None)["options"][R.INPUT_FILES]) == ["/c.txt", str(outside)]
    _commit(outside / checkpoint.checkpoint_name(4), "outside step 4")
    assert not run_recipe(load_recipe(str(path)), **QUIET)["pretrain"]["skipped"]


def test_eval_stage_task_files_edited_rerun_the_eval_stage(tmp_path, monkeypatch):
    """The eval stage's eval.mc_tasks (listed before this change too; kept so)."""

    def run_eval(run):
        Path(run.out).mkdir(parents=True, exist_ok=True)
        report = Path(run.out) / "report.json"
        report.write_text("".join(Path(p).read_text() for p in run.cfg.eval.mc_tasks))
        return {"path": run.out, "report": str(report), "sha256": hashlib.sha256(report.read_bytes()).hexdigest()}

    _use(monkeypatch, {"pretrain": _trainer(lambda run: "pretrained"), "eval": run_eval})
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "2+2=", "choices": ["4", "5"], "gold": 0}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n  pretrain: {{data.path: /c.txt}}\n"
                    f"  eval: {{eval.mc_tasks: [{task}]}}\n")
    run_recipe(load_recipe(str(path)), **QUIET)
    assert _skipped(path)
    task.write_text('{"context": "3+3=", "choices": ["6", "7"], "gold": 0}\n')
    done = run_recipe(load_recipe(str(path)), **QUIET)
    assert done["pretrain"]["skipped"] and not done["eval"]["skipped"]
    assert Path(done["eval"]["outputs"]["report"]).read_text() == task.read_text()


def _sft_recipe(tmp_path, monkeypatch) -> tuple[Path, Path]:
    _use(monkeypatch, {"pretrain": _trainer(lambda run: "pretrained"),
                       "sft": _trainer(lambda run: "sft on " + Path(run.cfg.data.path).read_text())})
    records = tmp_path / "chat.jsonl"
    records.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n  pretrain: {{data.path: /c.txt}}\n"
                    f"  sft: {{data.path: {records}}}\n")
    return path, records


def test_records_touched_or_copied_again_unchanged_keep_their_stage(tmp_path, monkeypatch):
    """A small file's digest is its bytes' hash, not its mtime: records checked out or copied
    again as they were retrained SFT from scratch."""
    path, records = _sft_recipe(tmp_path, monkeypatch)
    run_recipe(load_recipe(str(path)), **QUIET)
    st = records.stat()
    os.utime(records, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _skipped(path)
    records.write_text(records.read_text().replace("hi", "ho"))  # an edit of the same size
    os.utime(records, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not run_recipe(load_recipe(str(path)), **QUIET)["sft"]["skipped"]


def test_a_record_of_dated_files_keeps_its_stage_until_they_change(tmp_path, monkeypatch):
    """A record from a raylm that dated every file (size and mtime): its stage is kept while they
    are as it dated them, not trained again on an upgrade; an edit runs it again."""
    from raylm import storage

    path, records = _sft_recipe(tmp_path, monkeypatch)
    recipe = load_recipe(str(path))
    run_recipe(recipe, **QUIET)
    rows = [[f.uri, f.size, f.etag_or_mtime] for f in storage.list_files(str(records), follow_links=True)]
    uri = Path(R.record_uri(recipe, "sft"))
    record = json.loads(uri.read_text())
    assert record["options"][R.INPUT_FILES][str(records)] != hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    record["options"][R.INPUT_FILES][str(records)] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    uri.write_text(json.dumps(record))
    assert _skipped(path)
    records.write_text('{"messages": [{"role": "user", "content": "hello, edited"}]}\n')
    assert not run_recipe(load_recipe(str(path)), **QUIET)["sft"]["skipped"]


# --------------------------------------------------------------------------- the run lock


def test_a_refused_command_leaves_no_lock_where_there_was_none(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="refused"):
        with run_lock.held(str(run)):
            assert (run / run_lock.RUN_LOCK).exists()
            raise ConfigError("refused")
    assert os.listdir(run) == ["metrics.jsonl"]
    with run_lock.held(str(tmp_path / "new")):  # a run made here: the lock goes with its holder
        pass
    assert os.listdir(tmp_path / "new") == []


def test_a_lock_file_that_was_there_stays(tmp_path):
    """One left by an older raylm (or a holder killed before it could remove it) is not this
    process's to remove."""
    run = tmp_path / "run"
    run.mkdir()
    (run / run_lock.RUN_LOCK).write_text("a raylm run, pid 1 on elsewhere\n")
    with pytest.raises(ConfigError):
        with run_lock.held(str(run)):
            raise ConfigError("refused")
    assert os.listdir(run) == [run_lock.RUN_LOCK]


def test_a_newcomer_that_locked_a_removed_lock_file_tries_again(tmp_path):
    """A holder removes the lock file it made when it lets go. A newcomer that opened that file
    before the removal and locks it after holds a file no one else opens: it must look again,
    or it and the next holder (of a new file) would both hold the run. The newcomer is a real
    process whose flock waits for the test's word after the file is opened."""
    run, go = str(tmp_path / "run"), str(tmp_path / "go")
    newcomer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        from raylm import run_lock
        from raylm.errors import StorageError
        real, first = fcntl.flock, [True]

        def flock(fd, op):  # between the open and the lock: the window
            if first[0]:
                first[0] = False
                print("opened", flush=True)
                while not os.path.exists({go!r}):
                    time.sleep(0.01)
            return real(fd, op)

        fcntl.flock = flock
        try:
            with run_lock.held({run!r}):
                print("held", flush=True)
        except StorageError:
            print("refused", flush=True)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        with run_lock.held(run):
            assert newcomer.stdout.readline().strip() == "opened"
        with run_lock.held(run):  # the next holder, on a new file
            Path(go).touch()
            assert newcomer.stdout.readline().strip() == "refused"
    finally:
        Path(go).touch()
        newcomer.wait(timeout=60)
    assert not os.path.exists(os.path.join(run, run_lock.RUN_LOCK))


def test_a_refused_pretraining_resume_leaves_the_run_as_it_was(tmp_path):
    """`raylm pretrain` resuming a run with another seed: refused before the data, and before,
    it left `.raylm.lock` in a run directory that had none (a run made before the lock, or
    copied from S3, where the lease is removed at the end)."""
    import numpy as np

    from raylm.config import load_config
    from raylm.pipeline import absolute_paths, ensure_data, ensure_tokenizer, pretrain
    from raylm.train import train_local

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"document {i} about rivers, stones and light" for i in range(300)))
    base = [f"storage={tmp_path}", "name=r", f"data.path={corpus}", "data.seq_len=32", "data.dedup=none",
            "data.min_chars=1", "tokenizer.vocab_size=300", "tokenizer.sample_bytes=100000", "model.dim=32",
            "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=32", "train.micro_batch_size=4",
            "train.global_batch_size=4", "train.num_workers=1", "train.warmup_steps=0", "train.max_steps=1",
            "train.ckpt_every=1", "train.eval_every=1", "train.eval_batches=1", "train.async_checkpoint=false"]
    cfg, tok = ensure_tokenizer(absolute_paths(load_config(overrides=base)))
    _, manifest = ensure_data(cfg, tok)
    blocks = np.random.default_rng(0).integers(0, tok.vocab_size, (8, 33)).astype(np.int32)
    train_local(cfg, blocks, blocks[:4], log=lambda *_: None, manifest=manifest)
    before = sorted(os.listdir(cfg.run_dir))
    assert run_lock.RUN_LOCK not in before
    with pytest.raises(ConfigError, match="seed=1337, now 7"):
        pretrain(load_config(overrides=[*base, "seed=7"]), samples=False)
    assert sorted(os.listdir(cfg.run_dir)) == before


def test_a_holder_still_refuses_a_newcomer(tmp_path):
    run = str(tmp_path / "run")
    with run_lock.held(run):
        with pytest.raises(StorageError, match="in use by a raylm run"):
            with run_lock.held(run):
                pass
        assert os.listdir(run) == [run_lock.RUN_LOCK]  # the refused one removed nothing
    assert os.listdir(run) == []
