"""`--init-from-hf` on Hugging Face directories raylm did not write, and a run setting the
checkpoint cannot have.

* A tied model saved with `safetensors.torch.save_model` keeps one tensor of the tied pair,
  `lm_head.weight`, and drops `model.embed_tokens.weight`; transformers loads that file, and
  so must raylm: the head is then the embedding (in a one-file directory or in any shard).
* `model.qk_norm=true` has no Llama equivalent: it is refused by the up-front check, in one
  line naming the setting and the checkpoint's config.json, before any cluster work.

Everything is built here from transformers' own Llama; no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file, save_model  # noqa: E402

from raylm import cli  # noqa: E402
from raylm.errors import ConfigError  # noqa: E402
from raylm.hf import check_init_from_hf, model_config_from_hf, read_hf_config, read_hf_weights  # noqa: E402
from raylm.model import Transformer  # noqa: E402
from tests.weights import redraw_at_unit_scale  # noqa: E402

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True)
TOL = dict(atol=1e-5, rtol=1e-4)  # fp32 round-off, as tests/unit/test_hf_parity.py


@pytest.fixture(scope="module")
def hf_model():
    """A tied transformers Llama at unit scale (near-uniform attention and equal norm weights
    would hide a mix-up below the tolerance; see test_hf_parity._raylm)."""
    config = transformers.LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"], attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return redraw_at_unit_scale(model, seed=1)


def _tokens():
    return torch.randint(0, SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))


def _save_model_dir(model, d: Path) -> Path:
    d.mkdir()
    model.config.save_pretrained(d)
    save_model(model, str(d / "model.safetensors"))
    return d


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory) -> Path:
    return _save_model_dir(hf_model, tmp_path_factory.mktemp("tied") / "hf")


def _shard(src: Path, d: Path, head_in: int, embed_too: bool = False, head=None) -> Path:
    """src's weights as two shards with an index; lm_head.weight (or `head`) in shard `head_in`
    (1 or 2), model.embed_tokens.weight too (in the other shard) where `embed_too`."""
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    emb = sd.pop("lm_head.weight")
    names = sorted(sd)
    parts = {1: {k: sd[k] for k in names[: len(names) // 2]}, 2: {k: sd[k] for k in names[len(names) // 2:]}}
    parts[head_in]["lm_head.weight"] = emb if head is None else head
    if embed_too:
        parts[3 - head_in]["model.embed_tokens.weight"] = emb
    weight_map = {}
    for i, part in parts.items():
        name = f"model-0000{i}-of-00002.safetensors"
        save_file(part, d / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _raylm_logits(d: Path, x: torch.Tensor) -> torch.Tensor:
    cfg = model_config_from_hf(read_hf_config(str(d)))
    assert cfg.tie_embeddings
    model = Transformer(cfg)
    model.load_state_dict(read_hf_weights(str(d), cfg), strict=True)
    with torch.no_grad():
        return model.eval()(x)[0]


def test_save_model_keeps_only_the_head(saved):
    """The premise: save_model de-duplicates the tied pair to lm_head.weight, and transformers
    loads the file with the embedding filled from it."""
    keys = set(load_file(saved / "model.safetensors"))
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" not in keys
    loaded = transformers.LlamaForCausalLM.from_pretrained(saved).float().eval()
    assert torch.equal(loaded.model.embed_tokens.weight, load_file(saved / "model.safetensors")["lm_head.weight"])


def test_a_tied_checkpoint_with_only_the_head_loads(hf_model, saved):
    x = _tokens()
    with torch.no_grad():
        want = hf_model(input_ids=x).logits
    got = _raylm_logits(saved, x)
    assert want.abs().max() > 1  # the comparison is not of near-zero numbers
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("head_in", [1, 2])
def test_a_sharded_tied_checkpoint_with_only_the_head_loads(hf_model, saved, tmp_path, head_in):
    d = _shard(saved, tmp_path / "sharded", head_in)
    x = _tokens()
    with torch.no_grad():
        want = hf_model(input_ids=x).logits
    torch.testing.assert_close(_raylm_logits(d, x), want, **TOL)


@pytest.mark.parametrize("head_in", [1, 2])
def test_a_tied_pair_must_be_equal_when_both_are_there(hf_model, saved, tmp_path, head_in):
    """Where a tied checkpoint carries both, raylm's embedding is that one matrix, whichever
    shard comes first; a pair that differs is refused: transformers >= 5 keeps it apart (an
    untied model), where raylm would compute with the embedding as the head."""
    emb = load_file(saved / "model.safetensors")["lm_head.weight"]
    d = _shard(saved, tmp_path / "both", head_in, embed_too=True)
    cfg = model_config_from_hf(read_hf_config(str(d)))
    assert torch.equal(read_hf_weights(str(d), cfg)["tok_embeddings.weight"], emb)
    d = _shard(saved, tmp_path / "differ", head_in, embed_too=True, head=torch.zeros_like(emb))
    with pytest.raises(ConfigError, match=r"model-0000\d-of-00002\.safetensors: lm_head\.weight differs from "
                                          r"model\.embed_tokens\.weight"):
        read_hf_weights(str(d), cfg)


def test_a_head_of_the_wrong_shape_is_refused_naming_it(saved, tmp_path):
    emb = load_file(saved / "model.safetensors")["lm_head.weight"]
    d = _shard(saved, tmp_path / "bad", 2, head=emb[:-1])
    cfg = model_config_from_hf(read_hf_config(str(d)))
    with pytest.raises(ConfigError, match=r"model-00002-of-00002\.safetensors: tok_embeddings\.weight \(from "
                                          r"lm_head\.weight.*has shape \(127, 64\), the model needs \(128, 64\)"):
        read_hf_weights(str(d), cfg)


def test_pretrain_starts_from_a_save_model_checkpoint(hf_model, saved, tmp_path):
    """The whole init path: `raylm pretrain --init-from-hf DIR`'s config, then setup_model,
    whose initial model computes transformers' logits."""
    from raylm.train import setup_model

    args = cli.build_parser().parse_args(["pretrain", "--init-from-hf", str(saved), "tokenizer.path=unused",
                                          f"storage={tmp_path}", "name=from-save-model", "data.seq_len=24"])
    cfg = cli._pretrain_config(args)
    model, _, start = setup_model(cfg, torch.device("cpu"), "never", log=lambda *_: None)
    assert start.step == 0
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[0], hf_model(input_ids=x).logits, **TOL)


def test_qk_norm_is_refused_up_front_in_one_line(saved, tmp_path, capsys, monkeypatch):
    import ray

    def no_cluster(*a, **k):
        raise AssertionError("the cluster was started before the refusal")

    monkeypatch.setattr(ray, "init", no_cluster)
    argv = ["pretrain", "--init-from-hf", str(saved), "tokenizer.path=unused", f"storage={tmp_path}",
            "name=qk", "data.seq_len=24", "model.qk_norm=true"]
    with pytest.raises(ConfigError) as e:
        cli._pretrain_config(cli.build_parser().parse_args(argv))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "model.qk_norm" in msg and f"{saved}/config.json" in msg, msg
    assert "export" not in msg, msg  # the up-front check's words, not the exporter's

    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model.qk_norm" in err and "config.json" in err, err

    # check_init_from_hf itself, as cli calls it; and the same directory without the setting passes.
    cfg = cli._pretrain_config(cli.build_parser().parse_args(argv[:-1]))
    check_init_from_hf(cfg)
