"""Loading a checkpoint for inference (generate, serve, export, eval) reads the model settings
of the config it recorded, checked as the model's own; its training settings are not checked
again, so a check added to train.* since (train.warmup_steps past train.max_steps, say) does
not make checkpoints trained before it unusable. A refused model config names the meta.json."""

import dataclasses
import json

import pytest
import torch

from raylm import checkpoint
from raylm.config import Config, ModelConfig, TrainConfig, to_dict
from raylm.errors import CheckpointError
from raylm.generate import generate, load_for_inference
from raylm.model import build_model
from raylm.train import make_optimizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from raylm.tokenizer import train_tokenizer

    texts = ["The quick brown fox jumps over the lazy dog.\n", "Ray schedules tasks across a cluster.\n"] * 50
    return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), 300)


def model_config(tok) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=1, n_heads=2, max_seq_len=32, ffn_multiple_of=16).with_vocab(tok.vocab_size)


def committed_run(run, tok, config: dict) -> str:
    """`run` with one committed checkpoint of a model_config(tok) model whose meta.json records
    `config`, as training writes it."""
    model = build_model(model_config(tok), seed=0)
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    uri = str(run / checkpoint.checkpoint_name(1))
    meta = {"step": 1, "config": config, "tokenizer": tok.path, "tokenizer_sha256": tok.sha256}
    checkpoint.write_local(model, opt, meta, uri)
    checkpoint.commit(uri, meta, files=checkpoint.file_digests(uri))
    return uri


def config_dict(tok, **train) -> dict:
    # Built directly, as a config recorded by an earlier raylm: nothing validates it here.
    return to_dict(Config(model=model_config(tok), train=dataclasses.replace(TrainConfig(), **train)))


def test_a_checkpoint_whose_training_settings_are_now_refused_still_loads(tmp_path, tok):
    committed_run(tmp_path, tok, config_dict(tok, max_steps=1000, warmup_steps=2000))
    model, loaded_tok, meta = load_for_inference(str(tmp_path))
    assert meta["config"]["train"]["warmup_steps"] == 2000
    assert model.cfg.dim == 32 and loaded_tok.sha256 == tok.sha256
    assert len(generate(model, loaded_tok.encode("The "), 3, temperature=0.0)) <= 3


def test_a_refused_model_config_is_one_line_naming_the_meta_json(tmp_path, tok):
    bad = config_dict(tok)
    bad["model"]["n_heads"] = 3  # 32 is not a multiple of 3 heads
    uri = committed_run(tmp_path, tok, bad)
    with pytest.raises(CheckpointError) as e:
        load_for_inference(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{uri}/{checkpoint.META}: its config: model.dim=32 is not divisible by model.n_heads=3")


def test_a_tokenizer_of_another_hash_names_the_tokenizer_it_read(tmp_path, tok):
    """The message named meta.json's own text for the tokenizer ("tokenizer", relative to the
    run), not the directory that was read."""
    import shutil

    shutil.copytree(tok.path, tmp_path / "tokenizer")
    uri = committed_run(tmp_path, tok, config_dict(tok))
    meta_path = f"{uri}/{checkpoint.META}"
    meta = checkpoint.read_meta(uri)
    meta.update(tokenizer="tokenizer", tokenizer_sha256="0" * 64)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    checkpoint.commit(uri, meta, files=checkpoint.file_digests(uri))
    with pytest.raises(CheckpointError) as e:
        load_for_inference(str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path}/tokenizer: tokenizer hash {tok.sha256[:12]} differs") and "000000000000" in msg
