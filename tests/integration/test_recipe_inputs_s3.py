"""Recipes (raylm/recipe.py) against a real S3 server (SeaweedFS on loopback, tests/s3server.py):
a recipe file given as s3:// is read from there, and records on S3 that changed since their
stage ran (another ETag in the listing) run that stage again. No Ray: the training stages are
stand-ins."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

import raylm.recipe as R
from raylm import storage
from raylm.errors import PathNotFoundError
from raylm.recipe import load_recipe, run_recipe

pytestmark = pytest.mark.usefixtures("s3_server")


def _checkpoint(out: str, content: str) -> dict:
    from raylm import checkpoint

    ck = Path(out) / "ckpt-00000002"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / checkpoint.COMMIT_MARKER).write_text(content)
    return {"path": out, "checkpoint": str(ck), "sha256": hashlib.sha256(content.encode()).hexdigest()}


def test_a_recipe_file_on_s3_is_read_from_there(s3_prefix, tmp_path):
    """`raylm run s3://bucket/recipe.yaml` said the recipe was not found, there or not."""
    uri = storage.join(s3_prefix, "recipes", "r.yaml")
    storage.write_text(uri, f"name: t\nstorage: {tmp_path}\nstages:\n  tokenizer: {{tokenizer.vocab_size: 300}}\n")
    recipe = load_recipe(uri)
    assert recipe.path == uri and [s.name for s in recipe.stages] == ["tokenizer"]
    with pytest.raises(PathNotFoundError, match=r"^recipe s3://\S+/missing\.yaml: not found$"):
        load_recipe(storage.join(s3_prefix, "recipes", "missing.yaml"))


def test_sft_records_replaced_on_s3_rerun_the_sft_stage(s3_prefix, tmp_path, monkeypatch):
    records = storage.join(s3_prefix, "chat", "train.jsonl")

    def run_sft(run):  # data.path is the glob that lists `records`
        return _checkpoint(run.out, f"sft on {storage.read_text(records)}")

    runs = {"pretrain": lambda run: _checkpoint(run.out, "pretrained"), "sft": run_sft}
    stages = tuple(dataclasses.replace(s, run=runs[s.name]) if s.name in runs else s for s in R.STAGES)
    monkeypatch.setattr(R, "STAGES", stages)
    monkeypatch.setattr(R, "STAGE_BY_NAME", {s.name: s for s in stages})
    storage.write_text(records, '{"messages": "first"}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n  pretrain: {{data.path: /c.txt}}\n"
                    f"  sft: {{data.path: '{storage.join(s3_prefix, 'chat', '*.jsonl')}'}}\n")
    run_recipe(load_recipe(str(path)), log=lambda m: None)
    assert all(r["skipped"] for r in run_recipe(load_recipe(str(path)), log=lambda m: None).values())
    storage.write_text(records, '{"messages": "other"}\n')  # the same size: only the ETag differs
    done = run_recipe(load_recipe(str(path)), log=lambda m: None)
    assert done["pretrain"]["skipped"] and not done["sft"]["skipped"]
