"""A directory given to `--init-from-hf` may be someone else's (a cloned model repository,
links and all): a `config.json`, marker or weight file that is a link to a pipe or a device is
refused in one line before anything reads it. Opening a pipe waited for ever (in C code, for
a shard: SIGTERM did not stop it), and reading a link to /dev/zero filled memory; a JSON file
is read only up to 16 MiB. A link to a regular file (Hugging Face's cache is made of them) is
read as before."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from raylm import cli
from raylm.errors import ConfigError


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory):
    from raylm.export.hf import export_run

    return export_run(tiny_run, str(tmp_path_factory.mktemp("hf") / "sharded"), max_shard_bytes=40_000)


def _args(hf_dir, tiny_run, tmp_path) -> list[str]:
    return ["pretrain", "--init-from-hf", str(hf_dir), f"tokenizer.path={tiny_run}/tokenizer",
            f"storage={tmp_path}/runs", "name=from-hf", "data.seq_len=64", "--data", str(tmp_path / "no-corpus")]


def _check(hf_dir, tiny_run, tmp_path):
    """cli._pretrain_config: the checks before any cluster work."""
    return cli._pretrain_config(cli.build_parser().parse_args(_args(hf_dir, tiny_run, tmp_path)))


def _link_tree(export: str, to) -> None:
    """The export as links to its files, as Hugging Face's cache snapshot is made."""
    to.mkdir()
    for name in os.listdir(export):
        (to / name).symlink_to(os.path.join(export, name))


@pytest.mark.parametrize("name, kind", [
    ("config.json", "pipe"), ("raylm_export.json", "/dev/null"),  # /dev/null: a device whose reads end
    ("model.safetensors.index.json", "pipe"), ("model-00002-of-*.safetensors", "pipe"),
])
def test_a_link_to_a_pipe_or_device_is_refused_in_one_line(export, tiny_run, tmp_path, name, kind):
    """The command itself, in a process killed after 60 s: a reader blocked opening a pipe
    (in safetensors' C code, holding the interpreter) cannot be stopped from inside."""
    d = tmp_path / "repo"
    _link_tree(export, d)
    (target,) = d.glob(name)
    target.unlink()
    if kind == "pipe":
        os.mkfifo(target)
    else:
        target.symlink_to(kind)
    try:
        done = subprocess.run([sys.executable, "-m", "raylm.cli", *_args(d, tiny_run, tmp_path)],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"raylm waited on {target}")
    err = done.stderr.strip()
    assert done.returncode == 2 and err == f"raylm: error: {target}: not a regular file (a link to a device or " \
                                          f"a pipe?); raylm reads {'safetensors' if 'model-' in name else 'JSON'} " \
                                          f"files only there", err


def test_links_to_regular_files_are_read(export, tiny_run, tmp_path):
    d = tmp_path / "snapshot"
    _link_tree(export, d)
    assert _check(d, tiny_run, tmp_path).init_from == str(d)


def test_an_oversized_json_file_is_refused_unread(export, tiny_run, tmp_path):
    d = tmp_path / "big"
    shutil.copytree(export, d)
    with open(d / "config.json", "r+b") as f:
        f.truncate(64 << 20)  # sparse: no disk used
    with pytest.raises(ConfigError, match=r"config\.json: 67,108,864 bytes, more than a model's JSON file holds"):
        _check(d, tiny_run, tmp_path)
