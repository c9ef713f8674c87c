"""A checkpoint named the way a user types it inside its run directory (`ckpt-00000200`,
`./ckpt-00000200`, `.`): the run directory is the one holding it (raylm.storage.parent), not
what is left of the string after its last '/', which for a bare name is the name itself.
README: every command takes relative, `./` and absolute paths alike."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from raylm import storage
from raylm.cli import main

CKPT = "ckpt-00000200"


@pytest.mark.parametrize("uri, parent", [
    ("ckpt-00000200", "{cwd}"),
    ("./ckpt-00000200", "{cwd}"),
    ("ckpt-00000200/", "{cwd}"),
    ("runs/tiny/ckpt-00000200", "{cwd}/runs/tiny"),
    ("./runs/tiny/ckpt-00000200/", "{cwd}/runs/tiny"),
    ("runs/../tiny/ckpt-00000200", "{cwd}/tiny"),
    (".", "{up}"),
    ("/abs/runs/tiny/ckpt-00000200", "/abs/runs/tiny"),
    ("/abs/runs/tiny/ckpt-00000200/", "/abs/runs/tiny"),
    ("file:///abs/runs/tiny/ckpt-00000200", "/abs/runs/tiny"),
    ("s3://bucket/runs/tiny/ckpt-00000200", "s3://bucket/runs/tiny"),
    ("s3://bucket/runs/tiny/ckpt-00000200/", "s3://bucket/runs/tiny"),
    ("s3://bucket/ckpt-00000200", "s3://bucket"),
])
def test_parent_of_every_way_a_path_is_written(uri, parent, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cwd = os.getcwd()
    assert storage.parent(uri) == parent.format(cwd=cwd, up=os.path.dirname(cwd))


@pytest.fixture
def run_dir(tiny_run, tmp_path, monkeypatch):
    """A copy of the tiny run (the fixture's is read-only), the working directory."""
    run = shutil.copytree(tiny_run, tmp_path / "tiny")
    monkeypatch.chdir(run)
    return run


@pytest.mark.parametrize("ckpt", [CKPT, f"./{CKPT}", f"{CKPT}/", "."])
def test_generate_inside_the_run_directory(run_dir, ckpt, capsys):
    assert main(["generate", ckpt, "--prompt", "The ", "--max-new-tokens", "3", "--temperature", "0"]) == 0, \
        capsys.readouterr().err
    assert capsys.readouterr().out.strip()


def test_tokenizer_of_a_bare_checkpoint_name_is_the_runs(run_dir):
    from raylm import checkpoint
    from raylm.generate import tokenizer_of

    meta = checkpoint.read_meta(CKPT)
    assert tokenizer_of(CKPT, meta) == str(run_dir / "tokenizer")
    assert tokenizer_of(f"./{CKPT}/", meta) == str(run_dir / "tokenizer")


def test_posttrain_parent_from_a_bare_checkpoint_name(run_dir):
    from raylm.config import ConfigError, load_config
    from raylm.posttrain import parent_of

    cfg, facts = parent_of(load_config(overrides=["stage=sft", f"init_from={CKPT}", "data.seq_len=64"]))
    assert facts["tokenizer"] == cfg.tokenizer.path == str(run_dir / "tokenizer")
    # A resumed run's record names the absolute checkpoint: `--from .` (the run, here) is that
    # checkpoint's run, and `--from ckpt-00000200` the checkpoint itself.
    recorded = str(run_dir / CKPT)
    for given in (".", CKPT, f"./{CKPT}/", str(run_dir)):
        cfg, facts = parent_of(load_config(overrides=["stage=sft", f"init_from={given}", "data.seq_len=64"]),
                               recorded)
        assert facts["checkpoint"] == recorded
    with pytest.raises(ConfigError, match=rf"pass --from {run_dir}, or start a new run"):
        parent_of(load_config(overrides=["stage=sft", "init_from=..", "data.seq_len=64"]), recorded)


@pytest.mark.parametrize("given", [".", CKPT, f"./{CKPT}", f"./{CKPT}/"])
def test_posttrain_names_its_run_after_the_parent_run(run_dir, given, monkeypatch):
    """`raylm sft --from .` (or a checkpoint of the run) inside the run: `tiny-sft`, not `.-sft`."""
    import raylm.posttrain

    seen = {}
    monkeypatch.setattr(raylm.posttrain, "posttrain", lambda cfg, **kw: seen.setdefault("cfg", cfg) and {})
    assert main(["sft", "--from", given, "--data", "chat.jsonl"]) == 0
    assert seen["cfg"].name == "tiny-sft"


def test_eval_of_a_bare_checkpoint_name_writes_beside_the_run(run_dir, capsys):
    corpus = run_dir.parent / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"The cat sat on the mat {i}."}) + "\n" for i in range(4)))
    assert main(["eval", CKPT, "--corpus", str(corpus)]) == 0, capsys.readouterr().err
    paths = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert os.path.dirname(paths["json"]) == str(run_dir / "eval" / CKPT)
    assert not (run_dir / CKPT / "eval").exists()
