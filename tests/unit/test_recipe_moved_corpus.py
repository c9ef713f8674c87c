"""A recipe whose corpus sits inside its storage, moved with it (a move, cp -a, rsync -a), goes
on where it stopped. The corpus's listing (raylm.recipe.input_fingerprint) and the checkpoints'
data key name its files by path: the moved recipe took its corpus for changed, trained its
tokenizer and prepared its data again, and the recipe's own "trained on another dataset" check
(raylm.recipe._trained_on_other_data) compared the new place's key with the checkpoint's and
removed the pre-training run to train it again from scratch. Both now also take the files
named where they were written (raylm.pipeline.moved_data_key), as pre-training's resume does.
No Ray: the first pre-training is a stand-in that leaves a checkpoint as a real one would; the
real stage is stopped where it would start Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import raylm.pipeline as P
import raylm.recipe as R
from raylm.recipe import load_recipe, run_recipe
from tests.unit.test_recipe_pretrain_after_corpus_edit import ReachedRay, _run_data_without_ray, _use

RECIPE = ("name: t\nstorage: ./runs\ndata: {{path: ./runs/t/corpus.txt, seq_len: 32}}\n"
          "tokenizer: {{vocab_size: 300, sample_bytes: 20000}}\nmodel: {{max_seq_len: 32}}\n"
          "stages:\n{stages}")


def _fake_pretrain(run):
    """What a finished pre-training leaves: its copy of the tokenizer and a committed checkpoint
    whose meta.json names the tokenizer, the data key and the place it was written
    (checkpoint_facts, the run's config)."""
    from raylm import checkpoint
    from raylm.generate import load_tokenizer

    cfg, corpus = P.preflight(P.absolute_paths(run.cfg))
    tok = load_tokenizer(cfg.tokenizer.path, cfg.s3)
    key, _ = P.data_key(cfg, tok.sha256, corpus)
    shutil.copytree(cfg.tokenizer.path, Path(run.out) / "tokenizer")
    ck = Path(run.out) / checkpoint.checkpoint_name(2)
    ck.mkdir(parents=True)
    (ck / checkpoint.META).write_text(json.dumps({"step": 2, "tokenizer_sha256": tok.sha256, "data_key": key,
                                                  "config": {"storage": cfg.storage, "name": cfg.name}}))
    (ck / checkpoint.COMMIT_MARKER).write_text("{}")
    return R._trained(run, run.cfg)


def _ran_then_moved(tmp_path, monkeypatch, stages: tuple[str, ...]) -> dict:
    """The recipe run once in <tmp>/a, its corpus in ./runs/t; the project moved to <tmp>/b
    and set up to run the real pre-training stage, stopped where it would start Ray. Returns
    the first run's records, their paths named under <tmp>/b."""
    (tmp_path / "a" / "runs" / "t").mkdir(parents=True)
    (tmp_path / "a" / "runs" / "t" / "corpus.txt").write_text(
        "\n".join(f"line {i} of a small corpus about ray, tokens and tests" for i in range(400)))
    (tmp_path / "a" / "r.yaml").write_text(RECIPE.format(stages="".join(f"  {s}: {{}}\n" for s in stages)))
    monkeypatch.chdir(tmp_path / "a")
    _use(monkeypatch, {"data": _run_data_without_ray, "pretrain": _fake_pretrain})
    first = run_recipe(load_recipe("r.yaml"), log=lambda m: None)
    _use(monkeypatch, {"data": _run_data_without_ray})

    def no_ray(*_, **__):
        raise ReachedRay()

    monkeypatch.setattr(P, "beside_ray_start", no_ray)
    shutil.move(tmp_path / "a", tmp_path / "b")  # the project moved: its ./runs, corpus and all, with it
    monkeypatch.chdir(tmp_path / "b")
    return json.loads(json.dumps(first).replace(str(tmp_path / "a"), str(tmp_path / "b")))


def test_a_moved_recipe_with_its_corpus_inside_is_done(tmp_path, monkeypatch):
    first = _ran_then_moved(tmp_path, monkeypatch, ("tokenizer", "data", "pretrain"))
    logs: list[str] = []
    done = run_recipe(load_recipe("r.yaml"), log=logs.append)  # used to train it all again
    assert all(done[s]["skipped"] for s in done), logs
    assert Path(first["pretrain"]["outputs"]["checkpoint"]).is_dir()


def test_a_pretrain_run_moved_with_its_corpus_trained_on_it(tmp_path, monkeypatch):
    """What decides whether the pretrain stage, run again, keeps its run or removes it to train
    from scratch (a lost input re-made alike keeps it; another tokenizer or dataset removes it)."""
    first = _ran_then_moved(tmp_path, monkeypatch, ("tokenizer", "pretrain"))
    recipe = load_recipe("r.yaml")
    cfg = R.stage_config(recipe, R.STAGE_BY_NAME["pretrain"], {"tokenizer": first["tokenizer"]["outputs"]})
    assert cfg.run_dir == first["pretrain"]["outputs"]["path"]
    assert not R._trained_on_other_data(cfg)  # used to say it had: the corpus's key names its path
    with open("runs/t/corpus.txt", "a") as f:  # an edit after the move is another dataset
        f.write("\none more line\n")
    assert R._trained_on_other_data(cfg)
