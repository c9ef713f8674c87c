"""An HF export is a normal directory: every file in it is readable by others, as the
directory itself is (safetensors writes its weights file 0600)."""

from __future__ import annotations

import itertools
import os
import stat

import pytest

pytest.importorskip("safetensors")

from raylm.config import ModelConfig  # noqa: E402
from raylm.corpus import iter_builtin_documents  # noqa: E402
from raylm.export.hf import export_hf  # noqa: E402
from raylm.model import build_model  # noqa: E402
from raylm.tokenizer import train_tokenizer  # noqa: E402


@pytest.mark.parametrize("max_shard_bytes", [None, 64 * 1024])  # one file, and shards with their index
def test_every_exported_file_is_world_readable(tmp_path, max_shard_bytes):
    texts = list(itertools.islice(iter_builtin_documents(), 50))
    tok = train_tokenizer(texts, str(tmp_path / "tok"), 384)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, max_seq_len=32), seed=0)
    out = tmp_path / "hf"
    kw = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    old = os.umask(0o022)
    try:
        export_hf(model, tok, {"step": 1}, str(out), **kw)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert any(n.endswith(".safetensors") for n in modes)
    assert {n: m for n, m in modes.items() if m & 0o044 != 0o044} == {}
