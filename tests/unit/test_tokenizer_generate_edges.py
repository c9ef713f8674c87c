"""Tokenizer files and training at their edges: a tokenizer directory whose sidecar was written
for a model file that is not a SentencePiece model, or that describes another vocabulary than
the model's, is one line naming the file (SentencePiece's bare "ParseFromArray" traceback; an
empty model loaded as a tokenizer of no pieces; an edited vocab_size was ignored); a vocabulary
too small for the corpus names the size that fits; a training text holding a lone surrogate is
a DataError, not a UnicodeEncodeError. Round trips of whitespace, control and combining text."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest

from raylm.errors import ConfigError, DataError
from raylm.tokenizer import META_FILE, MODEL_FILE, Tokenizer, train_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.\n", "Ray schedules tasks across a cluster.\n",
         "def f(x):\n    return  x\t+ 1\n"] * 40


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(TEXTS, str(out), 320)
    return out


def altered(tok_dir, where, model: bytes | None = None, **meta_fields):
    """A copy of `tok_dir` with its model replaced by `model` (the sidecar's sha256 made to
    match it, as a hand-made sidecar would) and sidecar fields set."""
    shutil.copytree(tok_dir, where)
    meta = json.loads((where / META_FILE).read_text())
    if model is not None:
        (where / MODEL_FILE).write_bytes(model)
        meta["sha256"] = hashlib.sha256(model).hexdigest()
    meta.update(meta_fields)
    (where / META_FILE).write_text(json.dumps(meta))
    return where


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_a_model_file_that_is_not_a_sentencepiece_model_is_one_line_naming_it(tok_dir, tmp_path, kind):
    good = (tok_dir / MODEL_FILE).read_bytes()
    model = {"garbage": b"version https://git-lfs.github.com/spec/v1\n", "truncated": good[:len(good) // 2],
             "empty": b""}[kind]
    bad = altered(tok_dir, tmp_path / "bad", model)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad / MODEL_FILE))}: .*not a SentencePiece model") as err:
        Tokenizer.load(str(bad))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field, value", [("vocab_size", 999), ("eos_id", 7)])
def test_a_sidecar_describing_another_vocabulary_is_one_line_naming_it(tok_dir, tmp_path, field, value):
    bad = altered(tok_dir, tmp_path / "bad", **{field: value})
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad / META_FILE))}: records {field} {value}, but "
                                          rf"{re.escape(str(bad / MODEL_FILE))} has ") as err:
        Tokenizer.load(str(bad))
    assert "\n" not in str(err.value)


def test_a_sidecar_without_those_fields_still_loads(tok_dir, tmp_path):
    where = tmp_path / "old"
    shutil.copytree(tok_dir, where)
    meta = json.loads((where / META_FILE).read_text())
    (where / META_FILE).write_text(json.dumps({"sha256": meta["sha256"]}))
    assert Tokenizer.load(str(where)).vocab_size == 320


def test_a_vocabulary_too_small_for_the_corpus_names_the_size_that_fits(tmp_path):
    with pytest.raises(ConfigError, match=r"^vocab_size=270 is too small .*\(source: unit\); use vocab_size >= (\d+) "
                                          r"or lower character_coverage$") as err:
        train_tokenizer(TEXTS, str(tmp_path / "small"), 270, source="unit")
    need = int(re.search(r">= (\d+)", str(err.value)).group(1))
    assert train_tokenizer(TEXTS, str(tmp_path / "fits"), need).vocab_size == need


def test_a_lone_surrogate_in_the_training_corpus_is_a_one_line_data_error(tmp_path):
    with pytest.raises(DataError, match=r"^tokenizer training document #1: .*surrogate U\+DCFF at character 4"):
        train_tokenizer(["fine text", "abc \udcff def", *TEXTS], str(tmp_path / "t"), 300)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("text", ["  two leading, two trailing  ", "\n\nnewlines\n\n", "a    b\t\tc", "\t", "   ",
                                  "a\x00b", "\x01\x1b[31m\x7f", "e\u0301 A\u030a \u0301", "👨‍👩‍👧 👍🏽", "日本語 中文",
                                  "\ufeffbom \u200b zw \u00a0nbsp \u3000", "\r\n\r", "\u2028\u2029\x85",
                                  "<|bos|> <|eos|> <unk>"])
def test_round_trip_of_whitespace_control_and_combining_text(tok_dir, text):
    tok = Tokenizer.load(str(tok_dir))
    for ids in (tok.encode(text), tok.encode_plain(text), list(tok.encode_flat([text])[0])):
        assert tok.decode(ids) == text


def test_a_tokenizer_with_ids_past_the_model_is_refused_where_the_checkpoint_records_no_hash(tmp_path, tok_dir):
    """meta.json's tokenizer_sha256 is empty where the data's manifest had none: a run's tokenizer
    larger than its model then failed on the first prompt with torch's IndexError."""
    import torch

    from raylm import checkpoint
    from raylm.config import Config, ModelConfig, to_dict
    from raylm.corpus import iter_builtin_documents
    from raylm.errors import CheckpointError
    from raylm.generate import load_for_inference
    from raylm.model import build_model

    texts = [d for _, d in zip(range(60), iter_builtin_documents())]
    big = train_tokenizer(texts, str(tmp_path / "run" / "tokenizer"), 400)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=32, ffn_multiple_of=16).with_vocab(
        Tokenizer.load(str(tok_dir)).vocab_size)
    assert cfg.vocab_size < big.vocab_size
    model = build_model(cfg, seed=0)
    uri = str(tmp_path / "run" / checkpoint.checkpoint_name(1))
    meta = {"step": 1, "config": to_dict(Config(model=cfg)), "tokenizer": "tokenizer", "tokenizer_sha256": ""}
    checkpoint.write_local(model, torch.optim.AdamW(model.parameters()), meta, uri)
    checkpoint.commit(uri, meta, files=checkpoint.file_digests(uri))
    tok_uri = re.escape(str(tmp_path / "run" / "tokenizer"))
    with pytest.raises(CheckpointError, match=rf"^{tok_uri}: tokenizer of {big.vocab_size} ids, more than the "
                                              rf"{cfg.vocab_size} of the model in "):
        load_for_inference(str(tmp_path / "run"))
