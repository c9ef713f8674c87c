"""The Hugging Face export loads in transformers and computes, decodes and tokenizes as raylm.

A tiny model and tokenizer are exported, loaded back with `AutoModelForCausalLM` and
`AutoTokenizer`, and compared with raylm: fp32 logits (tied and untied heads, one file and
sharded), greedy decoding, token ids of plain text and of the chat template. Also: what Llama
cannot express is refused, and a failed export leaves no directory behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import raylm.export.hf as export_mod  # noqa: E402
from raylm.config import ModelConfig  # noqa: E402
from raylm.export.hf import EXPORT_MARKER, INDEX, PENDING_MARKER, WEIGHTS, export_hf, export_run  # noqa: E402
from raylm.generate import greedy_decode  # noqa: E402
from raylm.model import build_model  # noqa: E402
from raylm.tokenizer import train_tokenizer  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-4)
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3:14 p.m., isn't it?\n",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 40))\n",
    "Café au lait, naïve résumé, déjà vu.\n",
    "Ray schedules tasks and actors across a cluster of machines.\n",
] * 40
# ASCII, Unicode seen in training, characters only byte fallback can encode (CJK, emoji, an
# unseen accent), leading and repeated spaces, tabs, newlines, chat markers in raw text, and
# the text of the control tokens.
SAMPLES = [
    "The lazy dog jumps.",
    "Café déjà vu, naïve.",
    "日本語 😀 and ŷ",
    "   leading spaces  and  doubled",
    " one leading space",
    "line one\nline two\n\n\tindented\n",
    "say <|user|> then <|end|>\n",
    # SentencePiece never matches its control pieces (nor <unk>) in text: no document injects EOS.
    "a <|eos|> b",
    "<|bos|>x pad<|pad|> <unk>\n<|end|><|eos|>",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Add 2 and 40.\n  Café? 😀"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": " and again"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, str(tmp_path_factory.mktemp("tok") / "tokenizer"), 420)


def unit_scale_model(tok, tie: bool = True, vocab_size: int = 0, **kw):
    cfg = ModelConfig(vocab_size=vocab_size or tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      tie_embeddings=tie, **kw)
    model = build_model(cfg, seed=0).eval()
    # raylm's init gives near-uniform attention, equal norm weights and near-tied logits, which
    # would hide layout mistakes and make greedy argmax fragile: redraw at unit scale, as the
    # parity test does.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.ndim == 1
                    else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model


def _load(out):
    return transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def _tokens(tok, seed=0, B=2, T=40):
    return torch.randint(0, tok.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _ids(result):
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list.
    return list(result["input_ids"]) if hasattr(result, "keys") else list(result)


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    model = unit_scale_model(tok, tie=True)
    out = tmp_path_factory.mktemp("exp") / "hf"
    export_hf(model, tok, {"step": 7}, str(out))
    return model, out


@pytest.mark.parametrize("tie", [True, False])
def test_logits_equal_raylm(tok, tmp_path, tie):
    model = unit_scale_model(tok, tie=tie)
    out = tmp_path / "hf"
    assert export_hf(model, tok, {"step": 7}, str(out)) == str(out)
    hf = _load(out)
    assert hf.config.tie_word_embeddings is tie
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id)
    tokens = _tokens(tok)
    with torch.no_grad():
        ours, theirs = model(tokens)[0], hf(input_ids=tokens).logits
    assert ours.abs().max() > 1  # not a comparison of near-zero numbers
    torch.testing.assert_close(theirs, ours, **TOL)
    # Safe formats only: JSON, safetensors, the SentencePiece protobuf.
    names = sorted(p.name for p in out.iterdir())
    assert all(n.endswith((".json", ".safetensors", ".model")) for n in names), names
    assert WEIGHTS in names and INDEX not in names
    assert json.loads((out / EXPORT_MARKER).read_text())["step"] == 7


def test_a_vocabulary_padded_to_64s_exports_the_tokenizers_rows(tok, tmp_path):
    """model.vocab_size=0 rounds the tokenizer's vocabulary up to a multiple of 64 (420 -> 448
    here): the export keeps the tokenizer's rows only, whose logits are raylm's over those ids."""
    padded = -(-tok.vocab_size // 64) * 64
    assert padded > tok.vocab_size
    model = unit_scale_model(tok, vocab_size=padded)
    hf = _load(export_hf(model, tok, {"step": 1}, str(tmp_path / "hf")))
    assert hf.config.vocab_size == tok.vocab_size
    tokens = _tokens(tok)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, model(tokens)[0][..., :tok.vocab_size], **TOL)
    with pytest.raises(export_mod.CheckpointError, match=r"model\.vocab_size=64 is smaller than the tokenizer's"):
        export_hf(unit_scale_model(tok, vocab_size=64), tok, {}, str(tmp_path / "small"))
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("tie", [True, False])
def test_a_mup_model_exports_its_logit_multiplier(tok, tmp_path, tie):
    """muP divides the final hidden states by the width multiplier; HF's Llama has no such
    step, so the export folds it into the final norm's weight."""
    model = unit_scale_model(tok, tie=tie, width_scaling="mup", base_dim=16)  # multiplier 4
    assert model.cfg.width_multiplier == 4
    export_hf(model, tok, {"step": 1}, str(tmp_path / "hf"))
    tokens = _tokens(tok)
    with torch.no_grad():
        ours, theirs = model(tokens)[0], _load(tmp_path / "hf")(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, **TOL)


@pytest.mark.parametrize("text", ["The quick brown fox", " and"])  # " and" runs into <|end|>s
def test_greedy_generate_equals_raylm(tok, exported, text):
    model, out = exported
    hf = _load(out)
    prompt = torch.tensor([tok.encode(text)])
    n = 24
    ours = greedy_decode(model, prompt, n)[0].tolist()
    # eos_token_id=None: no stopping, as greedy_decode always produces n tokens.
    theirs = hf.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_id)[0, prompt.shape[1]:].tolist()
    assert theirs == ours
    # With generation_config.json's defaults, generation stops after the first EOS or <|end|>.
    stops = {tok.eos_id, tok.special_ids["<|end|>"]}
    cut = next((i + 1 for i, t in enumerate(ours) if t in stops), n)
    assert hf.generate(prompt, max_new_tokens=n, do_sample=False)[0, prompt.shape[1]:].tolist() == ours[:cut]


def test_tokenizer_ids_equal_raylm(tok, exported):
    _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(hf_tok) == tok.vocab_size
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert any(tok.id_to_piece(i).startswith("<0x") for s in SAMPLES for i in tok.encode(s))  # byte fallback used
    for s in SAMPLES:
        ids = hf_tok.encode(s)
        assert ids == tok.encode(s), s  # and so no BOS/EOS added
        assert hf_tok.decode(ids) == tok.decode(ids) == s
    assert hf_tok(SAMPLES)["input_ids"] == tok.encode_batch(SAMPLES)


@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_ids_equal_raylm(tok, exported, gen):
    _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen) == \
        tok.apply_chat_template(MESSAGES, gen)
    ids = _ids(hf_tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen))
    assert ids == tok.encode_chat(MESSAGES, add_generation_prompt=gen)[0]


def test_sharded_export_loads_equal(tok, tmp_path):
    model = unit_scale_model(tok, tie=False)
    out = tmp_path / "hf"
    export_hf(model, tok, {}, str(out), max_shard_bytes=60_000)
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / INDEX).read_text())
    assert len(shards) > 2 and not (out / WEIGHTS).exists()
    assert sorted(set(index["weight_map"].values())) == shards
    with torch.no_grad():
        tokens = _tokens(tok, seed=1)
        torch.testing.assert_close(_load(out)(input_ids=tokens).logits, model(tokens)[0], **TOL)


def test_bfloat16_export(tok, tmp_path):
    from safetensors import safe_open

    model = unit_scale_model(tok)
    export_hf(model, tok, {}, str(tmp_path / "hf"), dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / WEIGHTS), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_qk_norm_is_refused_in_one_line(tok, tmp_path):
    model = unit_scale_model(tok, qk_norm=True)
    with pytest.raises(ValueError, match="model.qk_norm") as e:
        export_hf(model, tok, {}, str(tmp_path / "hf"))
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_nothing(tok, tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # after the JSON, the tokenizer and one shard are written
            raise OSError("disk full")
        real_save(tensors, path, metadata=metadata)

    real_save = export_mod.save_file
    monkeypatch.setattr(export_mod, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf(unit_scale_model(tok), tok, {}, str(tmp_path / "hf"), max_shard_bytes=60_000)
    assert list(tmp_path.iterdir()) == []  # neither `hf` nor its temporary sibling


def test_existing_output_is_refused(tok, tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError):
        export_hf(unit_scale_model(tok), tok, {}, str(tmp_path / "hf"))


def test_export_run_loads_the_named_checkpoint(tok, tmp_path, monkeypatch):
    import raylm.generate

    model = unit_scale_model(tok)
    seen = []

    def fake_load(uri, s3=None):
        seen.append(uri)
        return model, tok, {"step": 3}

    monkeypatch.setattr(raylm.generate, "load_for_inference", fake_load)
    out = tmp_path / "hf"
    export_run(str(tmp_path / "run"), str(out), checkpoint="ckpt-00000003", dtype="float32")
    assert seen == [str(tmp_path / "run" / "ckpt-00000003")]
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["step"] == 3 and marker["source"] == seen[0]
    with torch.no_grad():
        tokens = _tokens(tok, seed=2)
        torch.testing.assert_close(_load(out)(input_ids=tokens).logits, model(tokens)[0], **TOL)


def test_s3_export_uploads_the_marker_last(tok, monkeypatch):
    """Object storage has no rename: the export is complete when its marker exists, so the
    marker must be the last object written and not part of the bulk upload."""
    import raylm.generate

    model = unit_scale_model(tok)
    monkeypatch.setattr(raylm.generate, "load_for_inference", lambda uri, s3=None: (model, tok, {"step": 5}))
    events = []
    storage = export_mod.storage
    monkeypatch.setattr(storage, "list_files", lambda uri, s3=None, **kw: [])  # an empty prefix
    monkeypatch.setattr(storage, "upload_dir", lambda local, uri, s3=None, **kw: events.append(
        ("upload", uri, sorted(p.name for p in Path(local).iterdir()))))
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data, s3=None: events.append(
        ("write", uri, json.loads(data))))
    monkeypatch.setattr(storage, "delete", lambda uri, s3=None: events.append(("delete", uri)))
    assert export_run("s3://b/run", "s3://b/hf") == "s3://b/hf"
    pending, (kind, uri, names), config, marker, done = events
    files = sorted(names + ["config.json"])
    # First the list of the files about to be uploaded, so a retry after a failure removes them.
    assert pending == ("write", f"s3://b/hf/{PENDING_MARKER}", {"files": files})
    assert (kind, uri) == ("upload", "s3://b/hf") and WEIGHTS in names and EXPORT_MARKER not in names
    # config.json after the rest (HF readers take a prefix with it for a model), then the marker.
    assert config[:2] == ("write", "s3://b/hf/config.json") and "config.json" not in names
    assert marker[:2] == ("write", f"s3://b/hf/{EXPORT_MARKER}") and marker[2]["step"] == 5
    assert marker[2]["files"] == files
    assert done == ("delete", f"s3://b/hf/{PENDING_MARKER}")


def test_s3_export_retry_replaces_a_failed_upload(tok, s3_prefix, monkeypatch):
    """An upload that failed before its marker leaves files behind (sharded, here); the retry
    (one file) removes them rather than uploading beside them: a stale index would be read as
    the model. A prefix with anything else in it is refused and left as it is."""
    import raylm.generate
    from raylm import storage
    from raylm.hf import hf_weight_files, read_hf_weights

    model = unit_scale_model(tok, tie=False)
    monkeypatch.setattr(raylm.generate, "load_for_inference", lambda uri, s3=None: (model, tok, {"step": 5}))
    out = f"{s3_prefix}/hf"
    real_write = storage.write_bytes

    def dropped(uri, data, s3=None):
        if uri.endswith(EXPORT_MARKER):
            raise ConnectionError("network dropped before the marker")
        real_write(uri, data, s3)

    monkeypatch.setattr(storage, "write_bytes", dropped)
    with pytest.raises(ConnectionError):
        export_run("s3://b/run", out, max_shard_bytes=60_000)
    monkeypatch.setattr(storage, "write_bytes", real_write)
    assert any(f.uri.endswith(INDEX) for f in storage.list_files(out))

    export_run("s3://b/run", out, dtype="bfloat16")
    names = sorted(storage.relative(f.uri, out) for f in storage.list_files(out))
    assert names == sorted(json.loads(storage.read_bytes(f"{out}/{EXPORT_MARKER}"))["files"] + [EXPORT_MARKER])
    assert WEIGHTS in names and INDEX not in names and PENDING_MARKER not in names
    assert hf_weight_files(out) == [f"{out}/{WEIGHTS}"]
    got = read_hf_weights(out, model.cfg)
    assert torch.equal(got["tok_embeddings.weight"], model.tok_embeddings.weight.detach().bfloat16().float())

    with pytest.raises(FileExistsError, match="already holds a complete export"):
        export_run("s3://b/run", out)
    theirs = f"{s3_prefix}/theirs"
    storage.write_bytes(f"{theirs}/notes.txt", b"mine")
    with pytest.raises(FileExistsError, match=f"^{theirs}/notes.txt: {theirs} holds files that no raylm export wrote"):
        export_run("s3://b/run", theirs)
    assert [f.uri for f in storage.list_files(theirs)] == [f"{theirs}/notes.txt"]
