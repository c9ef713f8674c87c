"""A killed export's hidden temporary is removed by the next export to the same output; a live
export's never is.

An export writes into a hidden sibling (`.NAME.tmp-...`) and renames it into place; a process
killed mid-export (SIGKILL, OOM) runs no cleanup and left that sibling, possibly gigabytes,
behind for good: every retry added one. The temporary's name now carries a tag of this kernel
boot and PID namespace and the exporting process's id, and an export removes the siblings of
its output whose process is gone. A temporary whose process runs (a concurrent export), one
from another machine or container (another tag), an older raylm's (no process in its name)
and anything that is not what an export makes (a link) are left alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raylm.export.hf import EXPORT_MARKER, _instance_tag, export_hf, temp_prefix
from raylm.tokenizer import train_tokenizer

pytestmark = pytest.mark.skipif(_instance_tag() is None, reason="needs Linux's /proc to tell processes apart")

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3:14 p.m., isn't it?\n",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))\n",
] * 40
ROOT = Path(__file__).resolve().parents[2]

# A child process that exports `out` and blocks for good once the export is writing its
# weights, after saying so in `ready`: killed there, it leaves its temporary behind.
CHILD = r"""
import sys, time
from pathlib import Path
import torch
from raylm.config import ModelConfig
from raylm.model import build_model
from raylm.tokenizer import Tokenizer
fmt, tok_dir, out, ready = sys.argv[1:]
tok = Tokenizer.load(tok_dir)
model = build_model(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                                max_seq_len=32), seed=0).eval()

def block(*args, **kw):
    Path(ready).write_text("writing")
    time.sleep(3600)

if fmt == "hf":
    import raylm.export.hf as m
    m.save_file = block
    m.export_hf(model, tok, {}, out)
else:
    import raylm.export.gguf as m
    m._array = block
    m.export_gguf(model, tok, {}, out)
"""


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, str(tmp_path_factory.mktemp("tok") / "tokenizer"), 320)


def _model(tok):
    from raylm.config import ModelConfig
    from raylm.model import build_model

    return build_model(ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                                   max_seq_len=32), seed=0).eval()


def _temps(d: Path, out: str) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(f".{out}.tmp-"))


def _blocked_export(fmt: str, tok, out: Path, ready: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, fmt, tok.path,
                              str(out), str(ready)], env=env, cwd=str(ROOT))
    deadline = time.monotonic() + 300  # a guard against hanging, not a timing assertion
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child export exited ({child.returncode}) or never started writing")
        time.sleep(0.1)
    return child


def _export(fmt: str, tok, out: Path):
    if fmt == "hf":
        return export_hf(_model(tok), tok, {}, str(out))
    pytest.importorskip("gguf")
    from raylm.export.gguf import export_gguf

    return export_gguf(_model(tok), tok, {}, str(out))


@pytest.mark.parametrize("fmt,name", [("hf", "hf"), ("gguf", "m.gguf")])
def test_killed_exports_temporary_is_removed_live_ones_kept(fmt, name, tok, tmp_path):
    """A live export's temporary survives another export to the same output; once its process
    is killed, the next export to that output removes it (before, it stayed for good)."""
    if fmt == "gguf":
        pytest.importorskip("gguf")
    d = tmp_path / "exports"
    d.mkdir()
    out = d / name
    child = _blocked_export(fmt, tok, out, tmp_path / "ready")
    try:
        (theirs,) = _temps(d, name)
        assert theirs.startswith(f".{name}.tmp-{_instance_tag()}-{child.pid}-")

        # Concurrent: the child's export is alive, so its temporary is not touched.
        _export(fmt, tok, d / name)
        assert _temps(d, name) == [theirs]
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
    # Killed: its temporary is left behind, and the next export to the output removes it.
    assert _temps(d, name) == [theirs]
    if fmt == "gguf":
        out.unlink()
    else:
        shutil.rmtree(out)
    _export(fmt, tok, out)
    assert sorted(p.name for p in d.iterdir()) == [name]
    if fmt == "hf":
        assert (out / EXPORT_MARKER).exists()


def test_temporaries_that_cannot_be_told_dead_are_kept(tok, tmp_path):
    """Only a temporary of this boot and PID namespace whose process is gone is removed: one
    from another machine or container (another tag), an older raylm's (no process id), one of
    a live process (this one: an export in another thread), and a link are kept, the link's
    target untouched; a dead one of ours beside them is removed."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    out = tmp_path / "hf"
    tag = _instance_tag()
    ours = f".hf.tmp-{tag}-"
    assert temp_prefix(out) == f"{ours}{os.getpid()}-"
    other_tag = "0" * 12 if tag != "0" * 12 else "1" * 12
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    keep = [
        f".hf.tmp-{other_tag}-{dead}-abc_12z9",  # another machine's or container's
        ".hf.tmp-k3j_x9q2",  # an older raylm's: no process in its name
        f"{ours}{os.getpid()}-livexyz1",  # a live process's (this one)
        f"{ours}{dead}-link0001",  # a link, not a directory an export made
    ]
    for n in keep[:3]:
        (tmp_path / n).mkdir()
        (tmp_path / n / "model.safetensors").write_bytes(b"partial")
    (tmp_path / keep[3]).symlink_to(target, target_is_directory=True)
    stale = f"{ours}{dead}-dead0001"
    (tmp_path / stale).mkdir()
    (tmp_path / stale / "model.safetensors").write_bytes(b"partial")

    export_hf(_model(tok), tok, {}, str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*keep, "hf", "elsewhere"])
    assert (target / "keep.txt").read_text() == "mine"
