"""Recipes (raylm/recipe.py): a stage that reads files no stage writes (a corpus, chat or
preference records) runs again when they change since it ran, and so does each stage after it;
a stage whose files are as they were is still skipped. No Ray: the training and data stages
are stand-ins, the export is the real stage with a stand-in writer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import raylm.recipe as R
from raylm.recipe import load_recipe, read_stage_record, run_recipe


def _checkpoint(out: str, content: str) -> dict:
    from raylm import checkpoint

    ck = Path(out) / "ckpt-00000002"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / checkpoint.COMMIT_MARKER).write_text(content)
    return {"path": out, "checkpoint": str(ck), "sha256": hashlib.sha256(content.encode()).hexdigest()}


def _marker(outputs: dict) -> str:
    from raylm import checkpoint

    return (Path(outputs["checkpoint"]) / checkpoint.COMMIT_MARKER).read_text()


def _replace_stages(monkeypatch, runs: dict) -> None:
    stages = tuple(dataclasses.replace(s, run=runs[s.name]) if s.name in runs else s for s in R.STAGES)
    monkeypatch.setattr(R, "STAGES", stages)
    monkeypatch.setattr(R, "STAGE_BY_NAME", {s.name: s for s in stages})
    if "pretrain" in runs:  # a stand-in's checkpoints record no tokenizer or data to compare
        monkeypatch.setattr(R, "_trained_on_other_data", lambda cfg: False)


def _sft_recipe(tmp_path, monkeypatch) -> tuple[str, Path]:
    """pretrain -> sft on a records file -> export. Fine-tuning, like the real one
    (resume="auto"), goes on from its own newest checkpoint when there is one."""
    from raylm import checkpoint
    from raylm.export import hf

    def run_sft(run):
        if (Path(run.out) / "ckpt-00000002" / checkpoint.COMMIT_MARKER).exists():  # resumed: nothing to train
            return _checkpoint(run.out, _marker({"checkpoint": str(Path(run.out) / "ckpt-00000002")}))
        return _checkpoint(run.out, f"sft on {Path(run.cfg.data.path).read_text()}")

    def fake_export(ckpt, out, s3, dtype):
        Path(out).mkdir(parents=True)  # as the real one: an existing export is refused
        (Path(out) / "raylm_export.json").write_text(json.dumps({"source": _marker({"checkpoint": ckpt})}))

    _replace_stages(monkeypatch, {"pretrain": lambda run: _checkpoint(run.out, "pretrained"), "sft": run_sft})
    monkeypatch.setattr(hf, "export_run", fake_export)
    records = tmp_path / "chat.jsonl"
    records.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n  pretrain: {{data.path: /c.txt}}\n"
                    f"  sft: {{data.path: {records}}}\n  export: {{format: hf}}\n")
    return str(path), records


def test_edited_sft_records_rerun_sft_and_the_stages_after_it(tmp_path, monkeypatch):
    """The SFT records were edited after the recipe ran: the SFT stage was skipped and its old
    run recorded as made from the records as they are now."""
    path, records = _sft_recipe(tmp_path, monkeypatch)
    first = run_recipe(load_recipe(path), log=lambda m: None)
    assert all(r["skipped"] for r in run_recipe(load_recipe(path), log=lambda m: None).values())
    records.write_text('{"messages": [{"role": "user", "content": "hello, edited"}]}\n')
    logs = []
    second = run_recipe(load_recipe(path), log=logs.append)
    assert second["pretrain"]["skipped"] and not second["sft"]["skipped"] and not second["export"]["skipped"]
    assert _marker(second["sft"]["outputs"]) == f"sft on {records.read_text()}"  # not resumed from the old run
    exported = json.loads((Path(second["export"]["outputs"]["path"]) / "raylm_export.json").read_text())
    assert exported["source"] == _marker(second["sft"]["outputs"])
    assert second["sft"]["outputs"]["sha256"] != first["sft"]["outputs"]["sha256"]
    assert f"recipe: sft: {records} changed since it ran, running it again" in logs
    assert all(r["skipped"] for r in run_recipe(load_recipe(path), log=lambda m: None).values())


def test_a_corpus_file_added_or_edited_reruns_the_stages_that_read_it(tmp_path, monkeypatch):
    """A corpus directory gained a file, then one was edited: the tokenizer and data stages
    read it, pre-training reads their outputs; all were skipped on the old corpus."""

    def run_tok(run):
        out = Path(run.out) / "tokenizer"
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text("{}")
        return {"path": str(out), "sha256": "0" * 64, "corpus": run.cfg.data.path}

    def run_data(run):
        text = "".join(p.read_text() for p in sorted(Path(run.cfg.data.path).iterdir()))
        Path(run.out).mkdir(parents=True, exist_ok=True)
        (Path(run.out) / "manifest.json").write_text(text)
        return {"path": run.out, "sha256": hashlib.sha256(text.encode()).hexdigest()}

    _replace_stages(monkeypatch, {"tokenizer": run_tok, "data": run_data,
                                  "pretrain": lambda run: _checkpoint(run.out, _manifest(run))})
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first document\n")
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\ndata: {{path: {corpus}}}\nstages:\n"
                    "  tokenizer: {}\n  data: {}\n  pretrain: {}\n")
    run_recipe(load_recipe(str(path)), log=lambda m: None)
    assert all(r["skipped"] for r in run_recipe(load_recipe(str(path)), log=lambda m: None).values())
    for change in (lambda: (corpus / "b.txt").write_text("second document\n"),
                   lambda: (corpus / "a.txt").write_text("first document, edited\n")):
        change()
        done = run_recipe(load_recipe(str(path)), log=lambda m: None)
        assert not any(r["skipped"] for r in done.values())
        assert _marker(done["pretrain"]["outputs"]) == "".join(p.read_text() for p in sorted(corpus.iterdir()))
        assert all(r["skipped"] for r in run_recipe(load_recipe(str(path)), log=lambda m: None).values())


def _manifest(run) -> str:
    return (Path(run.inputs["data"]["path"]) / "manifest.json").read_text()


def test_a_record_without_input_files_keeps_its_stage(tmp_path, monkeypatch):
    """A stage record written before raylm listed input files has nothing to compare them
    with: the stage is kept, not trained again on every recipe once raylm is upgraded."""
    path, records = _sft_recipe(tmp_path, monkeypatch)
    recipe = load_recipe(path)
    run_recipe(recipe, log=lambda m: None)
    record_path = Path(R.record_uri(recipe, "sft"))
    record = read_stage_record(recipe, "sft", None)
    assert list(record["options"][R.INPUT_FILES]) == [str(records)]
    del record["options"][R.INPUT_FILES]
    record_path.write_text(json.dumps(record))
    records.write_text('{"messages": [{"role": "user", "content": "hello, edited"}]}\n')
    assert run_recipe(load_recipe(path), log=lambda m: None)["sft"]["skipped"]


def test_a_tokenizer_trained_on_an_edited_corpus_is_trained_again(tmp_path):
    """The tokenizer stage for real (no Ray): run again on an edited corpus, it found the
    tokenizer it had trained in its directory and kept it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about ray, tokens and tests" for i in range(400)))
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\ndata: {{path: {corpus}}}\n"
                    "tokenizer: {vocab_size: 300, sample_bytes: 20000}\nstages:\n  tokenizer: {}\n")
    first = run_recipe(load_recipe(str(path)), log=lambda m: None)["tokenizer"]
    corpus.write_text("\n".join(f"zebra {i} quartz jumping vexed wizards fjord nymph" for i in range(400)))
    second = run_recipe(load_recipe(str(path)), log=lambda m: None)["tokenizer"]
    assert not second["skipped"] and second["outputs"]["sha256"] != first["outputs"]["sha256"]
