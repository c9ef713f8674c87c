"""`raylm eval --limit N` scores the first N items of each task, and of each `--corpus` the
first N documents (a quick check of a big corpus ends as quickly as one of a big task)."""

from __future__ import annotations

import json

import pytest

from raylm.config import load_config
from raylm.eval.bpb import corpus_bpb
from raylm.eval.run import evaluate_run
from raylm.generate import load_for_inference, resolve_checkpoint

DOCS = ["the cat sat on the mat", "a quick brown fox jumps over", "code reads data and trains models"]


def test_limit_scores_the_first_documents_of_a_corpus(tiny_run, tmp_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({"text": DOCS[0]}) + "\n")
    cfg = load_config(overrides=["eval.workers=0"])
    out = evaluate_run(str(tiny_run), cfg, corpora=[str(corpus)], limit=1, out=str(tmp_path / "out"),
                       log=lambda *_: None)
    rows = {r["metric"]: r for r in json.load(open(out["paths"]["json"]))["results"]}

    model, tok, _ = load_for_inference(resolve_checkpoint(str(tiny_run)))
    want, full = corpus_bpb(model, tok, str(first)), corpus_bpb(model, tok, str(corpus))
    assert want["tokens_scored"] < full["tokens_scored"]
    assert rows["bpb"]["n"] == want["tokens_scored"]
    assert rows["bpb"]["value"] == pytest.approx(want["bpb"], rel=1e-6)
    # A limited score says so: written to <run>/eval/<ckpt>, it is never read as the full one.
    assert json.load(open(out["paths"]["json"]))["limit"] == 1
    assert "--limit 1: the first 1 items" in open(out["paths"]["markdown"]).read()


def test_the_printed_table_of_a_limited_eval_says_so(tiny_run, tmp_path, capsys):
    """`raylm eval --limit 1 ... > results.md` printed the bare table on stdout: only the files
    it wrote said the score was partial."""
    from raylm.cli import main

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert main(["eval", str(tiny_run), "--corpus", str(corpus), "--limit", "1", "--out", str(tmp_path / "out"),
                 "eval.workers=0"]) in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("--limit 1: the first 1 items of each task and documents of each corpus only, not the "
                          "full score\n\n| task |"), out
