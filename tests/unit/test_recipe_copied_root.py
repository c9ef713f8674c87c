"""A recipe's storage copied or moved to another directory (or bucket) goes on there
(raylm.recipe.read_stage_record): the records' paths under the old root name the copies. They
used to name the original, so a copy's stages were skipped but read what the original held,
and a moved one ran every stage again: the data prepared anew, and pre-training's resume then
refused the run it found. No Ray: the first pre-training is a stand-in that leaves a
checkpoint as a real one would; the real stage is stopped where it would start Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import raylm.pipeline as P
from raylm.recipe import lineage, load_recipe, run_recipe
from tests.unit.test_recipe_pretrain_after_corpus_edit import ReachedRay, _fake_pretrain, _run_data_without_ray, _use

RECIPE = ("name: t\nstorage: {storage}\ndata: {{path: {corpus}, seq_len: 32}}\n"
          "tokenizer: {{vocab_size: 300, sample_bytes: 20000}}\nmodel: {{max_seq_len: 32}}\n"
          "stages:\n  tokenizer: {{}}\n  data: {{}}\n  pretrain: {{}}\n")


def _ran_once(tmp_path, monkeypatch) -> Path:
    """The recipe run once under <tmp>/a/runs; the real pre-training stage from then on, which
    gets no further than starting Ray."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about ray, tokens and tests" for i in range(400)))
    (tmp_path / "a").mkdir()
    path = tmp_path / "a" / "r.yaml"
    path.write_text(RECIPE.format(storage="./runs", corpus=corpus))
    monkeypatch.chdir(tmp_path / "a")
    _use(monkeypatch, {"data": _run_data_without_ray, "pretrain": _fake_pretrain})
    run_recipe(load_recipe(str(path)), log=lambda m: None)
    _use(monkeypatch, {"data": _run_data_without_ray})

    def no_ray(*_, **__):
        raise ReachedRay()

    monkeypatch.setattr(P, "beside_ray_start", no_ray)
    return path


def test_a_moved_recipe_goes_on_where_it_stopped(tmp_path, monkeypatch):
    _ran_once(tmp_path, monkeypatch)
    shutil.move(tmp_path / "a", tmp_path / "b")  # the project moved: its ./runs with it
    monkeypatch.chdir(tmp_path / "b")
    logs: list[str] = []
    done = run_recipe(load_recipe("r.yaml"), log=logs.append)  # used to re-prepare, then refuse to resume
    assert [m for m in logs if "skipped" in m] == [f"recipe: {s}: done (key {done[s]['key'][:10]}), skipped"
                                                   for s in ("tokenizer", "data", "pretrain")], logs
    root = str(tmp_path / "b" / "runs" / "t")
    assert done["pretrain"]["outputs"]["checkpoint"].startswith(root + "/pretrain-")
    assert done["pretrain"]["inputs"]["data"]["path"].startswith(root + "/data-")
    assert [r["outputs"]["path"].startswith(root + "/") for r in lineage(load_recipe("r.yaml"), "pretrain")] \
        == [True, True, True]


def test_a_copied_recipe_reads_its_own_outputs_not_the_originals(tmp_path, monkeypatch):
    _ran_once(tmp_path, monkeypatch)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    done = run_recipe(load_recipe("r.yaml"), log=lambda m: None)
    root = str(tmp_path / "b" / "runs" / "t")
    assert all(done[s]["skipped"] and done[s]["outputs"]["path"].startswith(root + "/") for s in done), done
    shutil.rmtree(tmp_path / "a")  # the original goes: the copy still has all it needs
    again = run_recipe(load_recipe("r.yaml"), log=lambda m: None)
    assert all(r["skipped"] for r in again.values())


@pytest.mark.timeout(30)
def test_lineage_follows_only_earlier_stages(tmp_path):
    """Records whose inputs name a later stage (edited, or another tool's) went round for ever."""
    import json

    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path}\nstages:\n  pretrain: {{data.path: /c.txt}}\n"
                    "  sft: {synthetic: word_after}\n")
    stages = tmp_path / "t" / "stages"
    stages.mkdir(parents=True)
    (stages / "sft.json").write_text(json.dumps({"stage": "sft", "outputs": {}, "inputs": {"pretrain": {}}}))
    (stages / "pretrain.json").write_text(json.dumps({"stage": "pretrain", "outputs": {}, "inputs": {"sft": {}}}))
    assert [r["stage"] for r in lineage(load_recipe(str(path)), "sft")] == ["sft", "pretrain"]
