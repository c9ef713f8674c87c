"""A recipe whose corpus file changed runs its stages again "with what follows"
(raylm.recipe.input_fingerprint): the tokenizer and data stages make a new tokenizer and a new
dataset, and the pre-training stage, whose checkpoints name the old ones, starts over. It used
to resume its old run directory, which pre-training's resume check refused, so the recipe could
not go on without the run deleted by hand. A data stage re-made alike (its output lost) still
lets pre-training resume. No Ray: the first pre-training is a stand-in that leaves a
checkpoint as a real one would, the second is the real stage, stopped where it would start Ray."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import raylm.recipe as R
from raylm.recipe import load_recipe, run_recipe


class ReachedRay(Exception):
    pass


def _run_data_without_ray(run):
    """run_data as it is, less init_ray (a tiny corpus is prepared in this process)."""
    from raylm.data import prepare
    from raylm.generate import load_tokenizer
    from raylm.pipeline import absolute_paths, preflight

    cfg, corpus = preflight(absolute_paths(run.cfg), out=run.out)
    tok = load_tokenizer(cfg.tokenizer.path, cfg.s3)
    prepare(cfg.data, tok, run.out, cfg.seed, cfg.s3, log=lambda m: None, corpus=corpus)
    manifest = (Path(run.out) / "manifest.json").read_bytes()
    return {"path": run.out, "sha256": R._sha256(manifest), "tokenizer_sha256": tok.sha256}


def _fake_pretrain(run):
    """What a finished pre-training leaves: its copy of the tokenizer and a committed checkpoint
    whose meta.json names the tokenizer and dataset it trained on (checkpoint_facts)."""
    from raylm import checkpoint

    manifest = json.loads((Path(run.inputs["data"]["path"]) / "manifest.json").read_text())
    shutil.copytree(run.cfg.tokenizer.path, Path(run.out) / "tokenizer")
    ck = Path(run.out) / checkpoint.checkpoint_name(2)
    ck.mkdir(parents=True)
    (ck / checkpoint.META).write_text(json.dumps({"step": 2, "tokenizer_sha256": manifest["tokenizer_sha256"],
                                                  "data_key": manifest["key"]}))
    (ck / checkpoint.COMMIT_MARKER).write_text("{}")
    return R._trained(run, run.cfg)


ORIGINAL = R.STAGES


def _use(monkeypatch, runs: dict) -> None:
    stages = tuple(dataclasses.replace(s, run=runs[s.name]) if s.name in runs else s for s in ORIGINAL)
    monkeypatch.setattr(R, "STAGES", stages)
    monkeypatch.setattr(R, "STAGE_BY_NAME", {s.name: s for s in stages})


def _trained_once(tmp_path, monkeypatch) -> tuple[Path, str, dict]:
    """A tokenizer -> data -> pretrain recipe run once (the stand-in pre-training), then set up
    to run again with the real pre-training stage, stopped where it would start Ray: the
    corpus, the recipe's path and the first run's records."""
    import raylm.pipeline as P

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about ray, tokens and tests" for i in range(400)))
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\ndata: {{path: {corpus}, seq_len: 32}}\n"
                    "tokenizer: {vocab_size: 300, sample_bytes: 20000}\nmodel: {max_seq_len: 32}\n"
                    "stages:\n  tokenizer: {}\n  data: {}\n  pretrain: {}\n")
    _use(monkeypatch, {"data": _run_data_without_ray, "pretrain": _fake_pretrain})
    first = run_recipe(load_recipe(str(path)), log=lambda m: None)
    _use(monkeypatch, {"data": _run_data_without_ray})  # the real pre-training stage from now on

    def no_ray(*_, **__):
        raise ReachedRay()

    monkeypatch.setattr(P, "beside_ray_start", no_ray)
    return corpus, str(path), first


def test_an_edited_corpus_trains_the_pretrain_stage_again(tmp_path, monkeypatch):
    corpus, path, _ = _trained_once(tmp_path, monkeypatch)
    corpus.write_text("\n".join(f"zebra {i} quartz jumping vexed wizards fjord nymph" for i in range(400)))
    logs: list[str] = []
    # The stage trains again (from scratch, on the new tokenizer and data), which here means it
    # gets as far as starting Ray; it used to resume the old run, which its resume check refused.
    with pytest.raises(ReachedRay):
        run_recipe(load_recipe(path), log=logs.append)
    assert any(m.startswith("recipe: pretrain: removing") for m in logs), logs


def test_data_re_made_alike_keeps_the_pretrain_run(tmp_path, monkeypatch):
    _, path, first = _trained_once(tmp_path, monkeypatch)
    shutil.rmtree(first["data"]["outputs"]["path"])  # the data stage's output lost: prepared again alike
    logs: list[str] = []
    try:
        run_recipe(load_recipe(path), log=logs.append)
    except ReachedRay:  # resuming: the same tokenizer and dataset key
        pass
    assert any(m.startswith("recipe: pretrain: data changed") for m in logs), logs  # its manifest is new
    assert not [m for m in logs if m.startswith("recipe: pretrain: removing")], logs
    assert Path(first["pretrain"]["outputs"]["checkpoint"]).is_dir()


HOLD = """
import sys, time
from raylm import run_lock
with run_lock.held(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_stage_run_held_by_another_process_is_refused_not_removed(tmp_path, monkeypatch):
    """Another process at work in the stage's directory (a second recipe, the stage run by
    hand) holds it: the recipe is refused in one line, and the run keeps its checkpoints (it
    removed them under the holder)."""
    import subprocess
    import sys

    from raylm.errors import StorageError

    corpus, path, first = _trained_once(tmp_path, monkeypatch)
    run_dir = first["pretrain"]["outputs"]["path"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        corpus.write_text("\n".join(f"zebra {i} quartz jumping vexed wizards fjord nymph" for i in range(400)))
        with pytest.raises(StorageError, match="raylm run, pid"):
            run_recipe(load_recipe(path), log=lambda m: None)
    finally:
        holder.kill()
        holder.wait()
    assert Path(first["pretrain"]["outputs"]["checkpoint"]).is_dir()
