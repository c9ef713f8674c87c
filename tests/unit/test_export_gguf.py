"""The GGUF export reads back as what raylm holds, in the layout llama.cpp computes with.

A tiny model and tokenizer are exported and read back with gguf's own `GGUFReader`:
metadata, every tensor (f32 exactly, f16 to fp16 rounding, q8_0 to its quantization step),
and the SentencePiece vocabulary. The q/k permutation is checked against a reference
attention that applies RoPE the way llama.cpp does (interleaved pairs). Also: what llama.cpp's
`llama` architecture cannot express is refused, and a half-written file never appears at the
output path. With llama-cpp-python installed, llama.cpp itself decodes as raylm does.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import raylm.export.gguf as export_mod  # noqa: E402
from raylm.export.gguf import (  # noqa: E402
    MARKER_SUFFIX, PENDING_SUFFIX, export_gguf, export_run_gguf, gguf_name, permute_for_llama_cpp,
    unpermute_from_llama_cpp)
from raylm.export.hf import CHAT_TEMPLATE  # noqa: E402
from raylm.generate import greedy_decode  # noqa: E402
from raylm.model import apply_rope, rope_tables  # noqa: E402
from raylm.tokenizer import END, ROLE_TOKENS, train_tokenizer  # noqa: E402
from tests.unit.test_export_hf import unit_scale_model  # noqa: E402

Q = gguf.GGMLQuantizationType
T = gguf.TokenType
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3:14 p.m., isn't it?\n",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))\n",
    "Café au lait, naïve résumé, déjà vu.\n",
] * 40


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, str(tmp_path_factory.mktemp("tok") / "tokenizer"), 400)


def _model(tok, tie: bool = True, **kw):
    # rope_theta is low so that every pair rotates visibly.
    return unit_scale_model(tok, tie, rope_theta=500.0, **kw)


def _read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def _values(t) -> np.ndarray:
    """A read-back tensor as float32 in numpy (rows, cols) order, dequantized if need be."""
    if t.tensor_type in (Q.F32, Q.F16):
        return np.asarray(t.data, dtype=np.float32)
    return gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)


def _expected(model, name: str) -> torch.Tensor:
    """raylm's tensor under the exported `name`, in llama.cpp's q/k layout."""
    t = model.state_dict()[name].detach().float()
    if name.endswith("wq.weight"):
        return permute_for_llama_cpp(t, model.cfg.n_heads)
    if name.endswith("wk.weight"):
        return permute_for_llama_cpp(t, model.cfg.kv_heads)
    return t


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """One export per dtype of the same (tied) model."""
    model = _model(tok)
    d = tmp_path_factory.mktemp("gguf")
    return model, {dt: export_gguf(model, tok, {"step": 7, "source": "run/ckpt-7"}, str(d / f"m-{dt}.gguf"), dt)
                   for dt in ("f32", "f16", "q8_0")}


@pytest.mark.parametrize("dtype,ftype", [("f32", 0), ("f16", 1), ("q8_0", 7)])
def test_metadata(tok, exported, dtype, ftype):
    model, paths = exported
    cfg = model.cfg
    fields, _ = _read(paths[dtype])
    expected = {
        "general.architecture": "llama",
        "general.file_type": ftype,
        "llama.context_length": 64,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": cfg.hidden_dim,
        "llama.block_count": 2,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 16,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": tok.vocab_size,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": tok.bos_id,
        "tokenizer.ggml.eos_token_id": tok.eos_id,
        "tokenizer.ggml.padding_token_id": tok.pad_id,
        "tokenizer.ggml.eot_token_id": tok.special_ids[END],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
        "raylm.step": 7,
        "raylm.source": "run/ckpt-7",
        "raylm.tokenizer_sha256": tok.sha256,
    }
    assert {k: fields.get(k) for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert fields["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_tensors_round_trip(exported, dtype):
    model, paths = exported
    _, tensors = _read(paths[dtype])
    sd = model.state_dict()
    assert sorted(tensors) == sorted(gguf_name(n) for n in sd)  # tied: no `output.weight`
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    for name in sd:
        t = tensors[gguf_name(name)]
        want = _expected(model, name)
        got = torch.from_numpy(_values(t).reshape(want.shape).copy())
        if want.ndim == 1 or dtype == "f32":  # norms are f32 in every file type
            assert t.tensor_type == Q.F32, name
            assert torch.equal(got, want), name
        elif dtype == "f16":
            assert t.tensor_type == Q.F16, name
            assert torch.equal(got, want.half().float()), name
        else:
            assert t.tensor_type == Q.Q8_0, name
            # q8_0: blocks of 32 values share a scale amax/127, stored in fp16: rounding is within
            # half a step, plus the scale's rounding (2**-11 relative) times up to 127 steps.
            amax = want.reshape(-1, 32).abs().amax(-1, keepdim=True)
            err = (got - want).reshape(-1, 32).abs()
            assert (err <= amax * (0.5 / 127 + 2**-11) + 1e-7).all(), name
            assert err.max() > 0  # really quantized


def test_untied_head_is_written(tok, tmp_path):
    model = _model(tok, tie=False)
    _, tensors = _read(export_gguf(model, tok, {}, str(tmp_path / "m.gguf")))
    assert torch.equal(torch.from_numpy(_values(tensors["output.weight"]).copy()), model.output.weight.detach())


def test_vocabulary_round_trips(tok, exported):
    _, paths = exported
    fields, _ = _read(paths["f32"])
    n = tok.vocab_size
    assert fields["tokenizer.ggml.tokens"] == [tok.id_to_piece(i) for i in range(n)]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([tok._sp.get_score(i) for i in range(n)])
    types = fields["tokenizer.ggml.token_type"]
    control = {tok.bos_id, tok.eos_id, tok.pad_id, *(tok.special_ids[t] for t in (*ROLE_TOKENS.values(), END))}
    byte = {i for i in range(n) if re.fullmatch(r"<0x[0-9A-F]{2}>", tok.id_to_piece(i))}
    assert len(byte) == 256 and len(control) == 7
    for i, ty in enumerate(types):
        want = (T.CONTROL if i in control else T.BYTE if i in byte else T.UNKNOWN if i == tok._sp.unk_id()
                else T.USER_DEFINED if tok.id_to_piece(i) == "\n" else T.NORMAL)
        assert ty == want, (i, tok.id_to_piece(i))


def test_a_vocabulary_padded_to_64s_exports_the_tokenizers_rows(tok, tmp_path):
    """llama.cpp wants a token for every embedding row: the rows past the tokenizer's pieces
    (model.vocab_size=0 rounds up to a multiple of 64) are left out, so none can be sampled."""
    n, padded = tok.vocab_size, -(-tok.vocab_size // 64) * 64
    model = unit_scale_model(tok, vocab_size=padded)
    fields, tensors = _read(export_gguf(model, tok, {}, str(tmp_path / "m.gguf")))
    assert fields["llama.vocab_size"] == n and _values(tensors["token_embd.weight"]).shape[0] == n
    assert fields["tokenizer.ggml.tokens"] == [tok.id_to_piece(i) for i in range(n)]


def test_a_missing_gguf_package_is_one_line_naming_the_extra(tok, tmp_path, monkeypatch):
    import sys

    from raylm.errors import ConfigError

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ConfigError, match=r"needs the `gguf` package: pip install -e '\.\[export\]'"):
        export_gguf(_model(tok), tok, {}, str(tmp_path / "m.gguf"))
    assert list(tmp_path.iterdir()) == []


def test_permutation_inverts():
    w = torch.randn(8 * 16, 5)
    p = permute_for_llama_cpp(w, 8)
    assert not torch.equal(p, w)
    assert torch.equal(unpermute_from_llama_cpp(p, 8), w)
    # Per head: rows [0..8) and [8..16) interleave as 0, 8, 1, 9, ...
    assert torch.equal(p[:4, 0], w[[0, 8, 1, 9], 0])


# --------------------------------------------------------------------------- RoPE layout


def _rope_interleaved(x: np.ndarray, theta: float) -> np.ndarray:
    """RoPE as llama.cpp's `llama` architecture applies it (ggml_rope, mode 0): rotate the
    pairs (x[2i], x[2i+1]) by pos * theta**(-2i/d). x: (H, T, d)."""
    _, n, d = x.shape
    ang = np.arange(n)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]  # (T, d/2)
    cos, sin = np.cos(ang), np.sin(ang)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _scores_llama_cpp(x: np.ndarray, wq: np.ndarray, wk: np.ndarray, cfg) -> np.ndarray:
    """Pre-softmax attention scores (H, T, T) from GGUF q/k weights, computed as llama.cpp does."""
    d = cfg.head_dim
    q = (x @ wq.T).reshape(len(x), cfg.n_heads, d).transpose(1, 0, 2)
    k = (x @ wk.T).reshape(len(x), cfg.kv_heads, d).transpose(1, 0, 2)
    q, k = _rope_interleaved(q, cfg.rope_theta), _rope_interleaved(k, cfg.rope_theta)
    k = np.repeat(k, cfg.n_heads // cfg.kv_heads, axis=0)  # GQA: query head h reads kv head h // group
    return q @ k.transpose(0, 2, 1) / math.sqrt(d)


def _scores_raylm(x: torch.Tensor, model) -> torch.Tensor:
    cfg, att = model.cfg, model.layers[0].attention
    n = len(x)
    q = att.wq(x).view(n, cfg.n_heads, cfg.head_dim).transpose(0, 1)
    k = att.wk(x).view(n, cfg.kv_heads, cfg.head_dim).transpose(0, 1)
    cos, sin = rope_tables(cfg.head_dim, n, cfg.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(cfg.n_heads // cfg.kv_heads, dim=0)
    return q @ k.transpose(1, 2) / math.sqrt(cfg.head_dim)


def test_exported_qk_give_raylm_attention_under_llama_cpp_rope(tok, exported):
    """The exported attn_q/attn_k under interleaved RoPE give raylm's attention scores; the
    unpermuted weights do not (so leaving the permutation out fails this test)."""
    model, paths = exported
    _, tensors = _read(paths["f32"])
    x = torch.randn(12, model.cfg.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = _scores_raylm(x, model).double().numpy()
    wq, wk = _values(tensors["blk.0.attn_q.weight"]), _values(tensors["blk.0.attn_k.weight"])
    theirs = _scores_llama_cpp(x.double().numpy(), wq.astype(np.float64), wk.astype(np.float64), model.cfg)
    assert np.abs(ours).max() > 1
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    raw = model.layers[0].attention
    unpermuted = _scores_llama_cpp(x.double().numpy(), raw.wq.weight.detach().double().numpy(),
                                   raw.wk.weight.detach().double().numpy(), model.cfg)
    assert np.abs(unpermuted - ours).max() > 0.1


# --------------------------------------------------------------------------- refusals, completeness


def test_qk_norm_is_refused_in_one_line(tok, tmp_path):
    with pytest.raises(ValueError, match="model.qk_norm") as e:
        export_gguf(_model(tok, qk_norm=True), tok, {}, str(tmp_path / "m.gguf"))
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_bad_dtype_and_existing_output_are_refused(tok, tmp_path):
    with pytest.raises(ValueError, match="'bf16'"):
        export_gguf(_model(tok), tok, {}, str(tmp_path / "m.gguf"), dtype="bf16")
    (tmp_path / "m.gguf").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        export_gguf(_model(tok), tok, {}, str(tmp_path / "m.gguf"))
    assert (tmp_path / "m.gguf").read_bytes() == b"x"


def test_half_written_file_never_appears(tok, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    seen = []
    real = export_mod._array

    def failing(t, qtype, g):
        # Mid-write: the header and some tensors are on disk, in a hidden sibling only.
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        if len(seen) == 5:
            raise OSError("disk full")
        return real(t, qtype, g)

    monkeypatch.setattr(export_mod, "_array", failing)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(_model(tok), tok, {}, str(out))
    assert all(len(names) == 1 and names[0].startswith(".m.gguf.tmp-") for names in seen)
    assert list(tmp_path.iterdir()) == []  # neither `out` nor the temporary


def test_export_run_loads_the_named_checkpoint(tok, tmp_path, monkeypatch):
    import raylm.generate

    model = _model(tok)
    seen = []
    monkeypatch.setattr(raylm.generate, "load_for_inference",
                        lambda uri, s3=None: (seen.append(uri), (model, tok, {"step": 3}))[1])
    out = tmp_path / "out" / "m.gguf"
    assert export_run_gguf(str(tmp_path / "run"), str(out), checkpoint="ckpt-00000003", dtype="f16") == str(out)
    assert seen == [str(tmp_path / "run" / "ckpt-00000003")]
    fields, _ = _read(out)
    assert fields["raylm.step"] == 3 and fields["raylm.source"] == seen[0] and fields["general.file_type"] == 1


def test_s3_export_uploads_the_file_then_the_marker(tok, monkeypatch):
    """Object storage has no rename: the file is uploaded as one object, then the marker."""
    import raylm.generate

    model = _model(tok)
    monkeypatch.setattr(raylm.generate, "load_for_inference", lambda uri, s3=None: (model, tok, {"step": 5}))
    storage = export_mod.storage
    events = []

    def upload_dir(local, uri, s3=None, **kw):
        from pathlib import Path

        files = sorted(p.name for p in Path(local).rglob("*"))
        events.append(("upload", uri, files))
        assert _read(Path(local) / "m.gguf")[0]["raylm.step"] == 5  # complete when uploaded

    monkeypatch.setattr(storage, "exists", lambda uri, s3=None: False)
    monkeypatch.setattr(storage, "upload_dir", upload_dir)
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data, s3=None: events.append(
        ("write", uri, json.loads(data).get("step"))))
    monkeypatch.setattr(storage, "delete", lambda uri, s3=None: events.append(("delete", uri)))
    out = "s3://b/exports/m.gguf"
    assert export_run_gguf("s3://b/run", out, dtype="q8_0") == out
    # The pending marker first (a rerun knows the object is this export's), the marker last.
    assert events == [("write", out + PENDING_SUFFIX, None), ("upload", "s3://b/exports", ["m.gguf"]),
                      ("write", out + MARKER_SUFFIX, 5), ("delete", out + PENDING_SUFFIX)]


def test_s3_export_refuses_a_finished_one(tok, monkeypatch):
    storage = export_mod.storage
    monkeypatch.setattr(storage, "exists", lambda uri, s3=None: uri == "s3://b/m.gguf" + MARKER_SUFFIX)
    with pytest.raises(FileExistsError):
        export_run_gguf("s3://b/run", "s3://b/m.gguf")


# --------------------------------------------------------------------------- llama.cpp itself


def test_llama_cpp_greedy_equals_raylm(tok, exported):
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python not installed; to run this test: pip install llama-cpp-python (builds "
                    "llama.cpp from source, ~8 min on 2 cores), then "
                    "python -m pytest tests/unit/test_export_gguf.py -k llama_cpp")
    model, paths = exported
    llm = llama_cpp.Llama(model_path=paths["f32"], n_ctx=64, logits_all=True, verbose=False)
    text = "The quick brown fox"
    prompt = tok.encode(text)
    # llama.cpp's SentencePiece tokenizer gives raylm's ids (no BOS, no space prefix).
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == prompt
    n = 24
    ours = greedy_decode(model, torch.tensor([prompt]), n)[0].tolist()
    theirs, ids = [], list(prompt)
    llm.reset()
    for _ in range(n):
        llm.eval(ids)
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(nxt)
        ids = [nxt]
    assert theirs == ours
