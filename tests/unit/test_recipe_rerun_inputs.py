"""Recipes (raylm/recipe.py): a stage run again because a stage it reads was redone (same key,
other content) makes its outputs from the new input, never keeps what it made from the old
one. No Ray: pre-training and fine-tuning are stand-ins, the export is the real stage with a
stand-in writer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import uuid
from pathlib import Path

import raylm.recipe as R
from raylm.recipe import load_recipe, run_recipe


def _checkpoint(out: str, content: str) -> dict:
    from raylm import checkpoint

    ck = Path(out) / "ckpt-00000002"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / checkpoint.COMMIT_MARKER).write_text(content)
    return {"path": out, "checkpoint": str(ck), "sha256": hashlib.sha256(content.encode()).hexdigest()}


def _stand_ins(monkeypatch):
    """Pre-training that never comes out byte for byte the same, and fine-tuning that, like
    the real one (resume="auto"), goes on from its own newest checkpoint when there is one."""
    from raylm import checkpoint

    def run_pretrain(run):
        return _checkpoint(run.out, uuid.uuid4().hex)

    def run_sft(run):
        ck = Path(run.out) / "ckpt-00000002" / checkpoint.COMMIT_MARKER
        if ck.exists():  # resumed: nothing left to train
            return _checkpoint(run.out, ck.read_text())
        parent = (Path(run.inputs["pretrain"]["checkpoint"]) / checkpoint.COMMIT_MARKER).read_text()
        return _checkpoint(run.out, f"sft of {parent}")

    runs = {"pretrain": run_pretrain, "sft": run_sft}
    stages = tuple(dataclasses.replace(s, run=runs[s.name]) if s.name in runs else s for s in R.STAGES)
    monkeypatch.setattr(R, "STAGES", stages)
    monkeypatch.setattr(R, "STAGE_BY_NAME", {s.name: s for s in stages})


def test_a_stage_whose_model_was_redone_is_made_from_the_new_model(tmp_path, monkeypatch):
    """The pre-trained run was lost and trained again: the SFT stage 'ran again' but resumed
    its finished run (started from the old weights), and the export stage found its old
    export's marker and kept it; both were recorded as made from the new model."""
    from raylm import checkpoint
    from raylm.export import hf

    def fake_export(ckpt, out, s3, dtype):
        Path(out).mkdir(parents=True)  # as the real one: an existing export is refused
        source = (Path(ckpt) / checkpoint.COMMIT_MARKER).read_text()
        (Path(out) / "raylm_export.json").write_text(json.dumps({"source": source}))

    _stand_ins(monkeypatch)
    monkeypatch.setattr(hf, "export_run", fake_export)
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n  pretrain: {{data.path: /c.txt}}\n"
                    "  sft: {synthetic: word_after}\n  export: {format: hf}\n")
    first = run_recipe(load_recipe(str(path)), log=lambda m: None)
    again = run_recipe(load_recipe(str(path)), log=lambda m: None)
    assert all(r["skipped"] for r in again.values())
    shutil.rmtree(first["pretrain"]["outputs"]["path"])  # lost, so trained again
    logs = []
    second = run_recipe(load_recipe(str(path)), log=logs.append)
    new = (Path(second["pretrain"]["outputs"]["checkpoint"]) / checkpoint.COMMIT_MARKER).read_text()
    sft = (Path(second["sft"]["outputs"]["checkpoint"]) / checkpoint.COMMIT_MARKER).read_text()
    assert sft == f"sft of {new}"
    exported = json.loads((Path(second["export"]["outputs"]["path"]) / "raylm_export.json").read_text())
    assert exported["source"] == sft
    assert second["export"]["inputs"]["sft"]["sha256"] == second["sft"]["outputs"]["sha256"]
    assert "recipe: export: sft changed since it ran, running it again" in logs


def test_an_adopted_tokenizer_replaced_at_its_path_reruns_what_reads_it(tmp_path, monkeypatch):
    """tokenizer.path names someone's tokenizer: one put there since was skipped over (the
    record's sha256 kept), and the data prepared by the old one was trained on."""
    from raylm.tokenizer import train_tokenizer

    texts = [f"line {i} of a small corpus about ray, tokens and tests" for i in range(400)]
    tok_dir = tmp_path / "tok"
    train_tokenizer(texts, str(tok_dir), 300, sample_bytes=20000)

    def run_data(run):
        Path(run.out).mkdir(parents=True, exist_ok=True)
        (Path(run.out) / "manifest.json").write_text(run.inputs["tokenizer"]["sha256"])
        return {"path": run.out, "sha256": hashlib.sha256(run.inputs["tokenizer"]["sha256"].encode()).hexdigest()}

    stages = tuple(dataclasses.replace(s, run=run_data) if s.name == "data" else s for s in R.STAGES)
    monkeypatch.setattr(R, "STAGES", stages)
    monkeypatch.setattr(R, "STAGE_BY_NAME", {s.name: s for s in stages})
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\ndata: {{path: /c.txt}}\nstages:\n"
                    f"  tokenizer: {{tokenizer.path: {tok_dir}}}\n  data: {{}}\n")
    first = run_recipe(load_recipe(str(path)), log=lambda m: None)
    assert all(r["skipped"] for r in run_recipe(load_recipe(str(path)), log=lambda m: None).values())
    train_tokenizer(texts, str(tok_dir), 320, sample_bytes=20000)  # another tokenizer, same path
    second = run_recipe(load_recipe(str(path)), log=lambda m: None)
    assert not second["tokenizer"]["skipped"] and not second["data"]["skipped"]
    assert second["tokenizer"]["outputs"]["sha256"] != first["tokenizer"]["outputs"]["sha256"]
    assert (Path(second["data"]["outputs"]["path"]) / "manifest.json").read_text() == \
        second["tokenizer"]["outputs"]["sha256"]


def test_synthetic_records_are_on_disk_before_they_are_in_place(tmp_path, monkeypatch):
    """The records are reused whenever their file is there: the rename that puts them there
    must not reach the disk before their content (a crash between left empty records)."""
    import os

    from raylm import storage
    from raylm.config import Config

    calls = []
    real_durable, real_replace = storage.make_durable, os.replace
    monkeypatch.setattr(storage, "make_durable",
                        lambda uri, *a, **k: (calls.append(("durable", Path(uri).name)), real_durable(uri, *a, **k)))
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", Path(a).name)), real_replace(a, b)))
    run = R.StageRun("sft", Config(), {"synthetic": "word_after"}, {}, str(tmp_path / "sft"), str(tmp_path),
                     print, None)
    records = Path(R._synthetic_records(run, "messages"))
    assert records.stat().st_size > 0
    renamed = next(i for i, c in enumerate(calls) if c[0] == "replace" and c[1].startswith(".records-"))
    assert ("durable", calls[renamed][1]) in calls[:renamed]  # the temporary directory, before its rename
    assert ("durable", tmp_path.name) in calls[renamed:]  # then the directory holding the rename


def test_a_stage_record_that_is_not_a_record_reruns_the_stage(tmp_path, monkeypatch):
    """A foreign stage record is taken as none; JSON that is not an object (or not UTF-8) ended
    the run with an AttributeError (UnicodeDecodeError) traceback."""
    from raylm.recipe import read_stage_record, record_uri

    def run_tok(run):
        p = Path(run.out) / "tokenizer"
        p.mkdir(parents=True, exist_ok=True)
        (p / "tokenizer.json").write_text("{}")
        return {"path": str(p), "sha256": "0" * 64, "corpus": ""}

    stages = tuple(dataclasses.replace(s, run=run_tok) if s.name == "tokenizer" else s for s in R.STAGES)
    monkeypatch.setattr(R, "STAGES", stages)
    monkeypatch.setattr(R, "STAGE_BY_NAME", {s.name: s for s in stages})
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n  tokenizer: {{}}\n")
    recipe = load_recipe(str(path))
    uri = Path(record_uri(recipe, "tokenizer"))
    uri.parent.mkdir(parents=True)
    for foreign in (b"[1, 2]", b'"done"', b"\xff\xfe{}"):
        uri.write_bytes(foreign)
        assert read_stage_record(recipe, "tokenizer", None) is None
        uri.write_bytes(foreign)
        assert not run_recipe(recipe, log=lambda m: None)["tokenizer"]["skipped"]
