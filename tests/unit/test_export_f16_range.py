"""Weights too large for float16 are refused by the exports, not written as inf.

float16 holds magnitudes up to 65504; converting 65520 or more gives inf, and a model with an
inf weight computes NaNs. The HF export with dtype float16 and the GGUF export's f16 tensors
(and q8_0's float16 block scales, a block's largest magnitude / 127) converted such weights
silently. They are now refused in one line (a ConfigError) that names the tensor and its
largest magnitude, before anything is written; f32 tensors (GGUF's 1-D norm weights) hold any
value, and NaN/inf already in the weights are exported as they are, as in every dtype.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from raylm.config import ModelConfig
from raylm.errors import ConfigError
from raylm.export.hf import WEIGHTS, export_hf, export_run
from raylm.model import build_model
from raylm.tokenizer import train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3:14 p.m., isn't it?\n",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))\n",
] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, str(tmp_path_factory.mktemp("tok") / "tokenizer"), 320)


def _model(tok, value: float | None = None, where: str = "layers.0.feed_forward.w2.weight"):
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=32,
                      tie_embeddings=False)
    model = build_model(cfg, seed=0).eval()
    if value is not None:
        with torch.no_grad():
            model.state_dict()[where].view(-1)[3] = value
    return model


def test_hf_float16_refuses_weights_beyond_its_range(tok, tmp_path, monkeypatch):
    """`raylm export --dtype float16` wrote a weight of 70000 as inf; now export_run refuses it
    in one line naming the HF tensor and the magnitude, and nothing appears beside the output."""
    import raylm.generate

    model = _model(tok, -70000.0)
    monkeypatch.setattr(raylm.generate, "load_for_inference", lambda uri, s3=None: (model, tok, {"step": 1}))
    with pytest.raises(ConfigError, match=r"^export dtype float16: model\.layers\.0\.mlp\.down_proj\.weight holds "
                                          r"a value of magnitude 70000, beyond ±65504 .*bfloat16 or float32$"):
        export_run(str(tmp_path / "run"), str(tmp_path / "out" / "hf"), dtype="float16")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the parent directory

    # bfloat16 and float32 hold it, as the message says.
    out = export_hf(model, tok, {}, str(tmp_path / "bf16"), "bfloat16")
    assert load_file(f"{out}/{WEIGHTS}")["model.layers.0.mlp.down_proj.weight"].view(-1)[3] == -70000.0


def test_hf_float16_keeps_what_fits(tok, tmp_path):
    """65504 and 65519 (which rounds to 65504) fit float16 and are exported."""
    model = _model(tok, 65519.0)
    with torch.no_grad():
        model.layers[0].attention.wq.weight.view(-1)[0] = -65504.0
    sd = load_file(f"{export_hf(model, tok, {}, str(tmp_path / 'hf'), 'float16')}/{WEIGHTS}")
    assert sd["model.layers.0.mlp.down_proj.weight"].view(-1)[3] == 65504.0
    assert sd["model.layers.0.self_attn.q_proj.weight"].view(-1)[0] == -65504.0
    assert all(torch.isfinite(t).all() for t in sd.values())


def test_hf_float16_nonfinite_weights_stay_as_before(tok, tmp_path):
    """NaN and inf already in the weights are not what the conversion makes: float16 exports
    them as float32 does (unchanged); a finite value beyond float16 beside them is refused."""
    model = _model(tok, math.nan)
    with torch.no_grad():
        model.layers[0].attention.wq.weight.view(-1)[0] = math.inf
    sd = load_file(f"{export_hf(model, tok, {}, str(tmp_path / 'hf'), 'float16')}/{WEIGHTS}")
    assert torch.isnan(sd["model.layers.0.mlp.down_proj.weight"].view(-1)[3])
    assert sd["model.layers.0.self_attn.q_proj.weight"].view(-1)[0] == math.inf
    with torch.no_grad():
        model.layers[0].attention.wq.weight.view(-1)[1] = 1e5
    with pytest.raises(ConfigError, match=r"q_proj\.weight holds a value of magnitude 100000,"):
        export_hf(model, tok, {}, str(tmp_path / "hf2"), "float16")
    assert not (tmp_path / "hf2").exists()


def _gguf():
    return pytest.importorskip("gguf")


def _read(path):
    gguf = _gguf()
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        data = np.asarray(t.data)
        out[t.name] = (data.astype(np.float32) if t.tensor_type in (gguf.GGMLQuantizationType.F32,
                                                                     gguf.GGMLQuantizationType.F16)
                       else gguf.quants.dequantize(data, t.tensor_type))
    return out


def test_gguf_f16_refuses_weights_beyond_its_range(tok, tmp_path, monkeypatch):
    """The GGUF export's f16 tensors turned 70000 into inf (numpy's astype(float16)); now it is
    refused naming the llama.cpp tensor, before any file appears. A 1-D norm weight is written
    as f32 in every dtype, so it may hold 70000."""
    _gguf()
    import raylm.generate
    from raylm.export.gguf import export_gguf, export_run_gguf

    model = _model(tok, 70000.0)
    monkeypatch.setattr(raylm.generate, "load_for_inference", lambda uri, s3=None: (model, tok, {"step": 1}))
    with pytest.raises(ConfigError, match=r"^GGUF export dtype f16: blk\.0\.ffn_down\.weight holds a value of "
                                          r"magnitude 70000, beyond ±65504 .*dtype f32$"):
        export_run_gguf(str(tmp_path / "run"), str(tmp_path / "out" / "m.gguf"), dtype="f16")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the parent directory

    norm = _model(tok, 70000.0, where="layers.0.ffn_norm.weight")
    got = _read(export_gguf(norm, tok, {}, str(tmp_path / "norm.gguf"), "f16"))
    assert got["blk.0.ffn_norm.weight"].reshape(-1)[3] == 70000.0
    assert all(np.isfinite(v).all() for v in got.values())


def test_gguf_q8_0_refuses_scales_beyond_float16(tok, tmp_path):
    """q8_0 keeps each 32-value block's largest magnitude / 127 as a float16 scale: a weight of
    1e7 made the scale inf and the whole block NaN. 70000 (scale 551) is fine."""
    _gguf()
    from raylm.export.gguf import export_gguf

    with pytest.raises(ConfigError, match=r"^GGUF export dtype q8_0: blk\.0\.ffn_down\.weight holds a value of "
                                          r"magnitude 1e\+07, beyond ±8319008 .*dtype f32$"):
        export_gguf(_model(tok, 1e7), tok, {}, str(tmp_path / "big.gguf"), "q8_0")
    assert list(tmp_path.iterdir()) == []
    got = _read(export_gguf(_model(tok, 70000.0), tok, {}, str(tmp_path / "m.gguf"), "q8_0"))
    assert all(np.isfinite(v).all() for v in got.values())
    assert got["blk.0.ffn_down.weight"].reshape(-1)[3] == pytest.approx(70000.0, rel=0.01)


def test_gguf_nonfinite_weights_stay_as_before(tok, tmp_path):
    """NaN already in a weight is exported as NaN by f16 as by f32, not refused."""
    _gguf()
    from raylm.export.gguf import export_gguf

    got = _read(export_gguf(_model(tok, math.nan), tok, {}, str(tmp_path / "m.gguf"), "f16"))
    assert np.isnan(got["blk.0.ffn_down.weight"].reshape(-1)[3])
