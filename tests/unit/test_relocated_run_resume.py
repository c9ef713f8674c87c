"""A run directory copied or moved to another directory (or bucket, or machine) resumes there.
Its checkpoints' data key names the corpus files by path (raylm.data.dataset_key), and the
built-in corpus sits in the run: the copy's key differed and its resume was refused. The key
its files would have had where the checkpoint was written is taken instead, where that is the
checkpoint's (raylm.pipeline.moved_data_key): the same names, sizes and dates. A corpus that
may differ (edited, or copied without its dates) is still refused. A post-training run's
recorded parent checkpoint moved with it is found under --from by its commit marker's hash
(raylm.posttrain.parent_of). No Ray: the checks before the data, as `pretrain` runs them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest

from raylm import pipeline
from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.pipeline import absolute_paths, ensure_data, ensure_tokenizer
from raylm.posttrain import parent_of, recorded_parent
from raylm.train import train_local
from tests.unit.test_refused_resume_before_data import RUN


def write_corpus(corpus) -> None:
    """200 small documents in corpus/a.jsonl (the directory made)."""
    corpus.mkdir(parents=True)
    rng = random.Random(0)
    words = ["some", "words", "here", "and", "there", "code", "river", "stone", "light", "north"]
    (corpus / "a.jsonl").write_text("".join(
        json.dumps({"text": f"document {i}: " + " ".join(rng.choice(words) for _ in range(60))}) + "\n"
        for i in range(200)))


def _settings(root) -> list[str]:
    """A run r under `root`, its corpus inside it as the built-in corpus is."""
    return [f"storage={root}", f"data.path={root}/r/corpus", *RUN]


@pytest.fixture
def trained(tmp_path):
    """Run r under <tmp>/a trained one step, its tokenizer and data made by raylm's own stages."""
    write_corpus(tmp_path / "a" / "r" / "corpus")
    cfg, tok = ensure_tokenizer(absolute_paths(load_config(overrides=_settings(tmp_path / "a"))))
    _, manifest = ensure_data(cfg, tok)
    blocks = np.random.default_rng(0).integers(0, tok.vocab_size, (8, 33)).astype(np.int32)
    train_local(cfg, blocks, blocks[:4], log=lambda *_: None, manifest=manifest)
    return tmp_path


def _check_before_data(root) -> None:
    pipeline.check_resume_before_data(absolute_paths(load_config(overrides=_settings(root))), "auto", None)


@pytest.mark.parametrize("how", [shutil.copytree, shutil.move], ids=["copied", "moved"])
def test_a_copied_or_moved_run_passes_the_resume_check(trained, how):
    how(trained / "a", trained / "b")
    _check_before_data(trained / "b")  # used to be refused: data_key=... (data.path=<tmp>/a/r/corpus)


def test_the_key_accepted_is_handed_on_to_the_workers(trained):
    """The workers check the checkpoint again (raylm.train.check_resumable): the driver hands
    them the key it accepted, with the run's own key for its new checkpoints."""
    from raylm import checkpoint
    from raylm.data import corpus_files
    from raylm.generate import load_tokenizer

    shutil.copytree(trained / "a", trained / "b")
    cfg = absolute_paths(load_config(overrides=_settings(trained / "b")))
    tok = load_tokenizer(f"{cfg.run_dir}/tokenizer")
    corpus = corpus_files(cfg.data, cfg.s3)
    key, _ = pipeline.data_key(cfg, tok.sha256, corpus)
    meta = checkpoint.read_meta(checkpoint.latest_complete(cfg.run_dir), None)
    assert key != meta["data_key"]
    cfg = dataclasses.replace(cfg, model=cfg.model.with_vocab(tok.vocab_size))
    moved = pipeline.check_resume_before_record(
        cfg, "auto", {"tokenizer_sha256": tok.sha256, "key": key},
        lambda m: pipeline.moved_data_key(cfg, tok.sha256, corpus, m))
    assert moved == meta["data_key"]
    # In place nothing moved: no key but the run's own.
    here = absolute_paths(load_config(overrides=_settings(trained / "a")))
    assert pipeline.moved_data_key(here, tok.sha256, None, meta) == ""


def _edit(path) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")


def _lose_dates(path) -> None:  # a plain `cp -r`: the same bytes, today's date
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("change", [_edit, _lose_dates], ids=["edited", "dates-lost"])
def test_a_copy_whose_corpus_may_differ_is_refused(trained, change):
    shutil.copytree(trained / "a", trained / "b")
    change(trained / "b" / "r" / "corpus" / "a.jsonl")
    with pytest.raises(ConfigError, match=r"ckpt-00000001: written with data_key=\w+ \(data\.path=.*/a/r/corpus\), "
                                          r"now \w+ \(data\.path=.*/b/r/corpus\)"):
        _check_before_data(trained / "b")


def test_a_corpus_outside_the_run_is_not_renamed(trained):
    """Only files under the run's old directory or storage are read as moved: a corpus
    elsewhere that the copy names instead is another corpus, whatever its names."""
    shutil.copytree(trained / "a", trained / "b")
    shutil.copytree(trained / "b" / "r" / "corpus", trained / "elsewhere")
    cfg = load_config(overrides=[*_settings(trained / "b"), f"data.path={trained}/elsewhere"])
    with pytest.raises(ConfigError, match="written with data_key="):
        pipeline.check_resume_before_data(absolute_paths(cfg), "auto", None)


# --------------------------------------------------------------------------- the recorded parent


def _sft_run_beside(tiny_run, root):
    """<root>/runs/parent (a copy of the tiny run) and <root>/runs/sft, an SFT run started from
    its checkpoint: a checkpoint of its own and the record `posttrain` writes, naming the parent
    checkpoint by absolute path with its commit marker's sha256."""
    parent = shutil.copytree(tiny_run, root / "runs" / "parent")
    ckpt = parent / "ckpt-00000200"
    run = root / "runs" / "sft"
    shutil.copytree(ckpt, run / "ckpt-00000010")
    from raylm.checkpoint import COMMIT_MARKER

    sha = hashlib.sha256((ckpt / COMMIT_MARKER).read_bytes()).hexdigest()
    (run / "record.json").write_text(json.dumps({"stage": "sft", "parent": {"checkpoint": str(ckpt), "sha256": sha}}))
    return parent


def _sft(root):
    return load_config(overrides=["stage=sft", f"init_from={root}/runs/parent", f"storage={root}/runs", "name=sft",
                                  "data.seq_len=64"])


@pytest.mark.parametrize("how", [shutil.copytree, shutil.move], ids=["copied", "moved"])
def test_a_moved_parent_is_found_under_from(tiny_run, tmp_path, how):
    _sft_run_beside(tiny_run, tmp_path / "a")
    how(tmp_path / "a", tmp_path / "b")
    cfg = _sft(tmp_path / "b")
    # used to be: --from <tmp>/b/runs/parent: run ... started from <tmp>/a/runs/parent/ckpt-00000200
    resolved, facts = parent_of(cfg, recorded_parent(cfg, "auto"))
    assert facts["checkpoint"] == resolved.init_from == str(tmp_path / "b" / "runs" / "parent" / "ckpt-00000200")
    # --from naming the checkpoint itself finds it too.
    cfg = load_config(overrides=["stage=sft", f"init_from={facts['checkpoint']}", f"storage={tmp_path}/b/runs",
                                 "name=sft", "data.seq_len=64"])
    assert parent_of(cfg, recorded_parent(cfg, "auto"))[1]["checkpoint"] == facts["checkpoint"]


def test_another_checkpoint_under_from_is_refused(tiny_run, tmp_path):
    """The same name, another commit marker (another run's checkpoint): not the run's parent."""
    from raylm.checkpoint import COMMIT_MARKER

    _sft_run_beside(tiny_run, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    marker = tmp_path / "b" / "runs" / "parent" / "ckpt-00000200" / COMMIT_MARKER
    marker.write_bytes(marker.read_bytes() + b"\n")
    cfg = _sft(tmp_path / "b")
    with pytest.raises(ConfigError, match=rf"^--from {tmp_path}/b/runs/parent: run {tmp_path}/b/runs/sft started from "
                                          rf"{tmp_path}/a/runs/parent/ckpt-00000200 and resumes"):
        parent_of(cfg, recorded_parent(cfg, "auto"))
