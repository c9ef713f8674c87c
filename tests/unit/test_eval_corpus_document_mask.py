"""`raylm eval --corpus` scores a run with the mask it trained with: a checkpoint whose config
says data.document_mask=true gets bits per byte with the mask, one without it without
(raylm.eval.bpb's module docstring)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from raylm import checkpoint
from raylm.config import load_config
from raylm.eval.bpb import corpus_bpb
from raylm.eval.run import evaluate_run
from raylm.generate import load_for_inference, resolve_checkpoint

DOCS = ["the cat sat on the mat", "a quick brown fox jumps", "code reads data and trains models"]


@pytest.mark.parametrize("mask", [True, False])
def test_corpus_bpb_follows_the_checkpoints_document_mask(tiny_run, tmp_path, mask):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ckpt = resolve_checkpoint(str(run))
    meta_path = f"{ckpt}/meta.json"
    meta = json.load(open(meta_path))
    meta["config"]["data"]["document_mask"] = mask
    blob = json.dumps(meta).encode()
    open(meta_path, "wb").write(blob)
    marker = json.load(open(f"{ckpt}/{checkpoint.COMMIT_MARKER}"))  # as training would have committed it
    marker["files"]["meta.json"] = [len(blob), hashlib.sha256(blob).hexdigest()]
    json.dump(marker, open(f"{ckpt}/{checkpoint.COMMIT_MARKER}", "w"))
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))

    cfg = load_config(overrides=["eval.workers=0"])
    out = evaluate_run(str(run), cfg, corpora=[str(corpus)], out=str(tmp_path / "out"), log=lambda *_: None)
    rows = json.load(open(out["paths"]["json"]))["results"]
    got = next(r["value"] for r in rows if r["metric"] == "bpb")

    model, tok, _ = load_for_inference(ckpt)
    want = {m: corpus_bpb(model, tok, str(corpus), document_mask=m)["bpb"] for m in (True, False)}
    assert want[True] != pytest.approx(want[False], rel=1e-6)  # the mask changes the score here
    assert got == pytest.approx(want[mask], rel=1e-6)
    assert checkpoint.read_meta(ckpt)["config"]["data"]["document_mask"] is mask
