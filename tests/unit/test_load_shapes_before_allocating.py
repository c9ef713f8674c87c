"""A checkpoint whose meta.json claims another model (mismatched or altered) is refused from
its own index (DCP `.metadata`) before the model is allocated, in one line naming meta.json and
the first differing tensor; a model that could never fit in memory is refused in one line too."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest

from raylm.errors import CheckpointError


def _copy(tiny_run, tmp_path):
    return shutil.copytree(tiny_run, tmp_path / "run") / "ckpt-00000200"


def _rewrite(ckpt, name, data: bytes):
    """As a writer would have committed it: COMMITTED records each file's size and sha256."""
    (ckpt / name).write_bytes(data)
    marker = json.loads((ckpt / "COMMITTED").read_text())
    marker["files"][name] = [len(data), hashlib.sha256(data).hexdigest()]
    (ckpt / "COMMITTED").write_text(json.dumps(marker))


def _set_model(ckpt, **model):
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"].update(model)
    _rewrite(ckpt, "meta.json", json.dumps(meta).encode())


# The old loader allocated first: a RuntimeError traceback from the allocator (dim, vocab_size,
# max_seq_len), or minutes building 10^5 layers on meta and then the allocator (n_layers).
@pytest.mark.parametrize("field,value,says", [
    ("dim", 10**6, r"tok_embeddings\.weight is \(384, 1000000\) in the model, \(384, 64\) in the checkpoint"),
    ("n_layers", 10**5, r"layers\.2\.attention_norm\.weight \(64,\) in the model is not in the checkpoint"),
    ("vocab_size", 10**9, r"tok_embeddings\.weight is \(1000000000, 64\) in the model"),
    ("max_seq_len", 10**11, r"its model needs 596\d\.\d GiB .*RoPE tables for max_seq_len=100000000000\), more than"),
])
def test_a_huge_model_claimed_by_meta_json_is_refused_before_allocating(tiny_run, tmp_path, field, value, says):
    ckpt = _copy(tiny_run, tmp_path)
    _set_model(ckpt, **{field: value})
    # In a process of its own with 4 GiB of address space: an allocation must not reach this machine.
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        from raylm.errors import CheckpointError
        from raylm.generate import load_for_inference
        try:
            load_for_inference({str(ckpt)!r})
        except CheckpointError as e:
            print("REFUSED", e)
            sys.exit(3)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{field}={value}: still loading after 90 s")
    assert out.returncode == 3, out.stderr[-2000:]
    line = out.stdout.strip()
    assert "\n" not in line
    prefix = f"REFUSED {ckpt}/meta.json: "
    assert line.startswith(prefix), line
    import re

    assert re.search(says, line), line


def test_more_or_fewer_layers_or_another_width_names_the_first_differing_tensor(tiny_run, tmp_path):
    from raylm.generate import load_for_inference

    ckpt = _copy(tiny_run, tmp_path)
    for model, first in [({"n_layers": 1}, r"layers\.1\.attention_norm\.weight \(64,\) in the checkpoint is not in the "
                                           r"model"),
                         ({"n_layers": 2, "n_kv_heads": 4}, r"layers\.0\.attention\.wk\.weight is \(64, 64\) in the "
                                                            r"model, \(32, 64\) in the checkpoint")]:
        _set_model(ckpt, **model)
        with pytest.raises(CheckpointError, match=rf"^{ckpt}/meta\.json: its config's model does not match the "
                                                  rf"checkpoint's weights: {first} \("):
            load_for_inference(str(ckpt))
    _set_model(ckpt, n_kv_heads=2)  # back as trained: loads
    assert load_for_inference(str(ckpt))[0].cfg.n_layers == 2


def test_an_index_claiming_more_than_its_files_hold_is_refused(tiny_run, tmp_path):
    """meta.json and .metadata altered together to agree on a huge embedding: the index's
    claimed shape is more bytes than the checkpoint stores for it, so it is refused unread."""
    from raylm.checkpoint import _load_metadata
    from raylm.generate import load_for_inference

    ckpt = _copy(tiny_run, tmp_path)
    sizes = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    md = _load_metadata(str(ckpt / ".metadata"), sizes)
    entry = md.state_dict_metadata["model.tok_embeddings.weight"]
    entry.size = type(entry.size)([10**9, 64])
    _rewrite(ckpt, ".metadata", pickle.dumps(md))
    _set_model(ckpt, vocab_size=10**9)
    with pytest.raises(CheckpointError, match=rf"^{ckpt}/\.metadata: entry 'model\.tok_embeddings\.weight' claims "
                                              rf"\(1000000000, 64\) float32 \(256000000000 bytes\), but the checkpoint "
                                              rf"stores \d+ bytes of it"):
        load_for_inference(str(ckpt))
