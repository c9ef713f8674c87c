"""A post-training resume that the run's checkpoint refuses is refused before Ray, the
records' preparation and DPO's reference pass: before, `raylm sft` / `raylm dpo` started Ray,
tokenized the chat or preference records into the run's data/ (and, for DPO, scored them with
the reference) under the refused settings, and only then refused. A resume with the run's own
settings passes the early check, DPO's stored reference pass included."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

import raylm.posttrain as pt
from raylm import chat_data, run_lock
from raylm import synthetic as S
from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.generate import load_tokenizer
from raylm.pipeline import absolute_paths, keep_in_run
from raylm.record import write_record
from raylm.train import train_local

RUN = ["data.seq_len=64", "data.val_fraction=0.1", "train.micro_batch_size=4", "train.global_batch_size=4",
       "train.num_workers=1", "train.cpus_per_worker=1", "train.warmup_steps=0", "train.max_steps=1",
       "train.ckpt_every=1", "train.eval_every=1", "train.eval_batches=1", "train.async_checkpoint=false"]
PRECOMPUTE_REFERENCE = pt.precompute_reference  # the fixtures' own, whatever the spies replace


class _Reached(Exception):
    """Raised by a spy: the stage got that far."""


def _snapshot(root: str) -> dict:
    """The run's files but its lock (which the stage takes before its checks, and leaves)."""
    return {os.path.relpath(os.path.join(d, f), root): (st.st_size, st.st_mtime_ns)
            for d, _, files in os.walk(root) for f in files if f != run_lock.RUN_LOCK
            for st in [os.stat(os.path.join(d, f))]}


def _prepare_chat_key(cfg, tok) -> str:
    """The dataset key `prepare_chat` computes for cfg's records, taken from prepare_chat itself
    (stopped there: the rows need Ray Data)."""
    real, seen = chat_data.dataset_key, []

    def spy(*args):
        seen.append(real(*args))
        raise _Reached

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chat_data, "dataset_key", spy)
        with pytest.raises(_Reached):
            chat_data.prepare_chat(cfg.stage, cfg.data, tok, os.path.join(cfg.run_dir, "data"), cfg.seed, cfg.s3)
    return seen[0]


def _rows(stage: str, tok, n: int = 8, T: int = 65) -> dict:
    g = np.random.default_rng(0)
    mask = np.zeros((n, T), np.int8)
    mask[:, 8:] = 1
    if stage == "sft":
        return {"tokens": g.integers(3, tok.vocab_size, (n, T)).astype(np.int32), "loss_mask": mask}
    prompt = g.integers(3, tok.vocab_size, (n, 8))
    return {**{k: np.concatenate([prompt, g.integers(3, tok.vocab_size, (n, T - 8))], 1).astype(np.int32)
               for k in ("chosen", "rejected")}, "chosen_mask": mask, "rejected_mask": mask}


def _scored(rows: dict) -> dict:
    """Pair rows with the reference's log-probs: any numbers, the key of the stored pass is what
    counts here."""
    return {**rows, **{k: np.full(len(rows["chosen"]), -1.0, np.float32) for k in pt.REFERENCE_COLUMNS}}


class _Split:
    """A split's pair rows given to the reference pass, scored without a model."""

    def __init__(self, rows):
        self.rows = rows

    def map_batches(self, fn, **kwargs):
        return self

    def iter_batches(self, **kwargs):
        yield _scored(self.rows)


def _with_reference(cfg, manifest: dict, parent: dict, rows: dict) -> tuple[dict, dict]:
    """The manifest and rows of the stored reference pass, as `precompute_reference` writes them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pt, "prepared_datasets", lambda d, m, s3: {"train": _Split(rows), "val": _Split(rows)})
        n, T = len(rows["chosen"]), rows["chosen"].shape[1]
        _, new = PRECOMPUTE_REFERENCE(cfg, os.path.join(cfg.run_dir, "data"),
                                      dict(manifest, row_bytes=4 * T * 4, seq_len=T - 1, train={"blocks": n},
                                           val={"blocks": n}), parent)
    return new, _scored(rows)


def _trained(tmp_path, tiny_run, stage: str, *extra: str) -> list[str]:
    """A `stage` run from the tiny run, trained one step without Ray, its checkpoint recording
    the tokenizer's hash and the data's key as `raylm sft` / `raylm dpo` would (the records'
    key from prepare_chat, DPO's stored reference pass's from precompute_reference), and its
    record naming its parent. Returns the overrides that made it."""
    records = S.write_jsonl(str(tmp_path / "records"), "reverse", 40, 5, seed=0, length=3)
    path = records["train.messages" if stage == "sft" else "train.preference"]
    base = [f"stage={stage}", f"init_from={tiny_run}", f"data.path={path}", f"storage={tmp_path / 'runs'}",
            f"name={stage}", *RUN, *extra]
    cfg, parent = pt.parent_of(absolute_paths(load_config(overrides=base)))
    tok = load_tokenizer(cfg.tokenizer.path)
    own = os.path.join(cfg.run_dir, "tokenizer")
    keep_in_run(tok, own, None)
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=own))
    manifest = {"key": _prepare_chat_key(cfg, tok), "tokenizer_sha256": tok.sha256, "eos_id": tok.eos_id,
                "pad_id": tok.pad_id, "columns": list(chat_data.COLUMNS[stage]), "sources": [], "val_sources": []}
    rows = _rows(stage, tok)
    if stage == "dpo" and cfg.dpo.precompute_reference:
        manifest, rows = _with_reference(cfg, manifest, parent, rows)
    write_record(cfg, stage, tok, manifest, extra={"parent": parent})
    train_local(cfg, rows, rows, log=lambda *_: None, manifest=manifest)
    return base


@pytest.fixture
def spies(monkeypatch):
    """Ray, the records' preparation and the reference pass, each failing the test if reached."""
    reached: list[str] = []

    def spy(name):
        def called(*args, **kwargs):
            reached.append(name)
            raise _Reached(name)
        return called

    for name in ("init_ray", "prepare_chat", "precompute_reference"):
        monkeypatch.setattr(pt, name, spy(name))
    return reached


@pytest.mark.parametrize("stage,extra", [("sft", []), ("dpo", []), ("dpo", ["dpo.precompute_reference=true"])],
                         ids=["sft", "dpo", "dpo-precomputed-reference"])
@pytest.mark.parametrize("change,refused", [("seed=7", "seed=1337, now 7"),
                                            ("data.val_fraction=0.2", "data_key=")], ids=["seed", "data"])
def test_a_refused_resume_starts_no_cluster_and_prepares_no_records(tmp_path, tiny_run, spies, stage, extra,
                                                                     change, refused):
    base = _trained(tmp_path, tiny_run, stage, *extra)
    run_dir = str(tmp_path / "runs" / stage)
    before = _snapshot(run_dir)
    with pytest.raises(ConfigError, match=refused):
        pt.posttrain(load_config(overrides=[*base, change, "train.max_steps=2"]))
    assert spies == []
    assert _snapshot(run_dir) == before  # the run's record, tokenizer and data as they were


@pytest.mark.parametrize("stage,extra", [("sft", []), ("dpo", []), ("dpo", ["dpo.precompute_reference=true"])],
                         ids=["sft", "dpo", "dpo-precomputed-reference"])
def test_a_resume_with_the_runs_own_settings_goes_on_to_the_cluster(tmp_path, tiny_run, spies, stage, extra):
    base = _trained(tmp_path, tiny_run, stage, *extra)
    with pytest.raises(_Reached, match="init_ray"):
        pt.posttrain(load_config(overrides=[*base, "train.max_steps=2"]))
    assert spies == ["init_ray"]


def test_the_early_check_takes_the_keys_the_stages_write(tmp_path, tiny_run):
    """What the early check compares is what the checkpoint recorded: the records' key from
    prepare_chat, and with a stored reference pass, that pass's key."""
    base = _trained(tmp_path, tiny_run, "dpo", "dpo.precompute_reference=true")
    cfg, parent = pt.parent_of(absolute_paths(load_config(overrides=base)))
    tok = load_tokenizer(cfg.tokenizer.path)
    meta = json.loads((tmp_path / "runs" / "dpo" / "ckpt-00000001" / "meta.json").read_text())
    assert pt.resume_facts(cfg, tok, parent) == {"tokenizer_sha256": tok.sha256, "key": meta["data_key"]}
    plain = dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, precompute_reference=False))
    assert pt.resume_facts(plain, tok, parent)["key"] == _prepare_chat_key(plain, tok) != meta["data_key"]


def test_a_finished_run_without_checkpoints_is_not_started_over_unasked(tmp_path, tiny_run, spies):
    """Its checkpoints removed (after an export, say), rerunning a finished SFT run's command
    started it over, deleting its metrics and eval results: refused before Ray and the records,
    everything kept, until its summary.json is removed too."""
    import shutil

    from raylm import checkpoint

    base = _trained(tmp_path, tiny_run, "sft")
    run_dir = str(tmp_path / "runs" / "sft")
    for _, uri, _ in checkpoint.list_checkpoints(run_dir):
        shutil.rmtree(uri)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"step": 1}, f)
    before = _snapshot(run_dir)
    with pytest.raises(ConfigError, match=r"holds a finished run \(summary.json\) and no complete checkpoint"):
        pt.posttrain(load_config(overrides=base))
    assert spies == [] and _snapshot(run_dir) == before
    os.remove(os.path.join(run_dir, "summary.json"))
    with pytest.raises(_Reached, match="init_ray"):  # asked for: it starts over
        pt.posttrain(load_config(overrides=base))
