"""Export outputs: a Llama config.json whose hidden_size is not an integer is refused in one
line naming it, not with a TypeError; a local HF export is on disk before it appears; a
format's missing packages are refused when it is chosen. (s3:// GGUF outputs:
tests/integration/test_export_s3_out.py.)"""

from __future__ import annotations

import json

import pytest

from raylm.errors import ConfigError


@pytest.mark.parametrize("key,value,shown", [("hidden_size", "64", '"64"'), ("hidden_size", None, "null"),
                                             ("head_dim", "16", '"16"')])
def test_head_dim_check_refuses_a_wrong_type_in_one_line(tmp_path, key, value, shown):
    from raylm.hf import read_hf_config

    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
              "head_dim": 16, "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 320}
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"config.json: {key}={shown}; expected an integer$"):
        read_hf_config(str(tmp_path))


def test_local_hf_export_is_on_disk_before_it_appears(tmp_path, monkeypatch):
    """The directory is renamed into place once complete; its files must reach the disk
    before that rename (the GGUF export fsyncs its file), or a crash leaves `out` with its
    marker and empty weights, which a recipe rerun skips as finished."""
    pytest.importorskip("safetensors")
    import os

    import raylm.export.hf as export_mod
    from raylm.config import ModelConfig
    from raylm.model import build_model
    from raylm.tokenizer import train_tokenizer

    tok = train_tokenizer(["The quick brown fox jumps over the lazy dog.\n"] * 50, str(tmp_path / "tok"), 300)
    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=16).with_vocab(tok.vocab_size))
    synced: set[str] = set()
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(src, dst):
        src = os.path.realpath(src)
        files = {os.path.join(src, n) for n in os.listdir(src)}
        assert files and files <= synced, f"renamed before these reached the disk: {sorted(files - synced)}"
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(export_mod.os, "rename", rename)
    out = export_mod.export_hf(model, tok, {}, str(tmp_path / "hf"))
    assert (tmp_path / "hf" / export_mod.EXPORT_MARKER).exists() and out == str(tmp_path / "hf")


@pytest.mark.parametrize("module", ["gguf", "sentencepiece.sentencepiece_model_pb2"])
def test_gguf_format_without_its_packages_is_refused_up_front(monkeypatch, module):
    """`exporter` is what `raylm export` and a recipe's load call to refuse a format whose
    packages are missing before any work; for gguf it imported only raylm's module, which
    imports `gguf` (and protobuf's SentencePiece model) when the export runs: after the
    checkpoint was loaded, or after a recipe's whole training."""
    import sys

    from raylm.export import MissingExtra, exporter

    monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError
    if "." in module:  # and `from package import module` no longer finds it on the package
        package, _, name = module.rpartition(".")
        monkeypatch.delattr(sys.modules[package], name, raising=False)
    with pytest.raises(MissingExtra, match=r"^stages\.export\.format=gguf needs .*: pip install -e '\.\[export\]'$"):
        exporter("gguf", None, prefix="stages.export.")
    assert exporter("hf", None)[0] == "float32"  # hf needs neither
