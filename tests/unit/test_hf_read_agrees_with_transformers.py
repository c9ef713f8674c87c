"""`--init-from-hf` reads what transformers reads, or refuses in one line.

Directories are written by transformers' own `save_pretrained` (and edited where a case needs
it); the reference is transformers' `LlamaForCausalLM.from_pretrained` of the same directory.

* The RoPE base may sit in three places of config.json (top-level `rope_theta`,
  `rope_parameters`, `rope_scaling`). transformers >= 5 takes it from `rope_scaling`, then
  `rope_parameters`, then the top level; earlier versions from the top level alone. Where
  two disagree the base depends on the reader: refused. One alone is read.
* A tied checkpoint that carries both `lm_head.weight` and `model.embed_tokens.weight`,
  different: transformers keeps them apart (an untied model); raylm has one matrix: refused.
  Equal: loads.
* A shard an index names that is missing (a stopped download), an empty weight_map, a tensor
  in two shards, an integer tensor, another model_type and a quantized checkpoint are refused
  in one line naming the file or key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from raylm.errors import ConfigError  # noqa: E402
from raylm.hf import hf_weight_files, model_config_from_hf, read_hf_config, read_hf_weights  # noqa: E402
from raylm.model import Transformer  # noqa: E402
from tests.weights import redraw_at_unit_scale  # noqa: E402

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
TOL = dict(atol=1e-5, rtol=1e-4)  # fp32 round-off, as tests/unit/test_hf_parity.py


def _save(d: Path, tied: bool, **extra) -> Path:
    config = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=tied, architectures=["LlamaForCausalLM"],
                                      **extra)
    torch.manual_seed(0)
    model = redraw_at_unit_scale(transformers.LlamaForCausalLM(config).float(), seed=1)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("untied") / "hf", tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("tied") / "hf", tied=True)


def _copy(src: Path, dst: Path, **config_patch) -> Path:
    shutil.copytree(src, dst)
    if config_patch:
        config = json.loads((dst / "config.json").read_text())
        config.update(config_patch)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def _tokens() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))


def _read(d: Path) -> tuple:
    cfg = model_config_from_hf(read_hf_config(str(d)))
    return cfg, read_hf_weights(str(d), cfg)


def _logits_agree(d: Path) -> None:
    cfg, sd = _read(d)
    model = Transformer(cfg)
    model.load_state_dict(sd, strict=True)
    ref = transformers.LlamaForCausalLM.from_pretrained(d, attn_implementation="eager").float().eval()
    x = _tokens()
    with torch.no_grad():
        want = ref(input_ids=x).logits
        got = model.eval()(x)[0]
    assert want.abs().max() > 1  # not a comparison of near-zero numbers
    torch.testing.assert_close(got, want, **TOL)


def _refused(d: Path, *named: str) -> str:
    with pytest.raises(ConfigError) as e:
        _read(d)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in named), msg
    return msg


def test_a_transformers_checkpoint_gives_transformers_logits(untied, tied):
    _logits_agree(untied)
    _logits_agree(tied)


def test_the_rope_base_of_rope_scaling_alone_is_read(untied, tmp_path):
    """transformers >= 5 reads rope_scaling's rope_theta (raylm took the default 10000)."""
    d = _copy(untied, tmp_path / "hf")
    config = json.loads((d / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.pop("rope_theta", None)
    config["rope_scaling"] = {"rope_type": "default", "rope_theta": 30000.0}
    (d / "config.json").write_text(json.dumps(config))
    assert model_config_from_hf(read_hf_config(str(d))).rope_theta == 30000.0
    _logits_agree(d)


@pytest.mark.parametrize("patch, named", [
    # transformers >= 5 computes with 1e4 from rope_scaling, < 5 with the top-level 5e5
    ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "default", "rope_theta": 10000.0}},
     "rope_scaling.rope_theta=10000 but rope_theta=500000"),
    ({"rope_theta": 500000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
     "rope_parameters.rope_theta=10000 but rope_theta=500000"),
    # rope_scaling given: transformers >= 5 ignores rope_parameters and takes the top-level base
    ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "default"},
      "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
     "rope_parameters.rope_theta=10000 but rope_theta=500000"),
])
def test_rope_bases_that_disagree_are_refused(untied, tmp_path, patch, named):
    _refused(_copy(untied, tmp_path / "hf", **patch), "config.json: ", named)


def test_equal_rope_bases_in_two_places_are_read(untied, tmp_path):
    d = _copy(untied, tmp_path / "hf", rope_theta=500000.0,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert model_config_from_hf(read_hf_config(str(d))).rope_theta == 500000.0
    _logits_agree(d)


def _with_head(tied: Path, dst: Path, head) -> Path:
    d = _copy(tied, dst)
    sd = load_file(d / "model.safetensors")
    assert "lm_head.weight" not in sd  # save_pretrained keeps the embedding alone
    sd["lm_head.weight"] = head(sd["model.embed_tokens.weight"])
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_a_tied_pair_that_differs_is_refused(tied, tmp_path):
    """transformers >= 5 keeps a differing pair apart (lm_head its own matrix): raylm, tied,
    would compute with the embedding as the head."""
    d = _with_head(tied, tmp_path / "hf", lambda e: e.flip(0).clone())
    ref = transformers.LlamaForCausalLM.from_pretrained(d).float()
    assert not torch.equal(ref.lm_head.weight, ref.model.embed_tokens.weight)  # the premise
    _refused(d, "model.safetensors: lm_head.weight differs from model.embed_tokens.weight",
             "tie_word_embeddings")


def test_a_tied_pair_that_is_equal_loads(tied, tmp_path):
    _logits_agree(_with_head(tied, tmp_path / "hf", lambda e: e.clone()))


def _two_shards(src: Path, dst: Path, move: str = "model.norm.weight", copy: bool = False) -> Path:
    """src's weights as two shards with an index: `move` in the second (in both where `copy`)."""
    d = _copy(src, dst)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    second = {move: sd[move] if copy else sd.pop(move)}
    save_file(sd, d / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(second, d / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {k: "model-00001-of-00002.safetensors" for k in sd}
    weight_map[move] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_a_missing_shard_is_refused_before_reading(untied, tmp_path):
    """hf_weight_files is the up-front check (check_init_from_hf, before any cluster work)."""
    d = _two_shards(untied, tmp_path / "hf")
    _logits_agree(d)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model-00002-of-00002\.safetensors: not found, though "
                                          r"model\.safetensors\.index\.json names it"):
        hf_weight_files(str(d))


def test_an_empty_weight_map_is_refused(untied, tmp_path):
    d = _two_shards(untied, tmp_path / "hf")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    with pytest.raises(ConfigError, match=r"model\.safetensors\.index\.json: weight_map is empty"):
        hf_weight_files(str(d))


def test_a_tensor_in_two_shards_is_refused(untied, tmp_path):
    d = _two_shards(untied, tmp_path / "hf", copy=True)
    _refused(d, "model-00002-of-00002.safetensors: holds model.norm.weight, which",
             "model-00001-of-00002.safetensors holds too")


def test_an_integer_tensor_is_refused(untied, tmp_path):
    d = _copy(untied, tmp_path / "hf")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].round().to(torch.int8)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    _refused(d, "model.safetensors: model.layers.0.mlp.up_proj.weight is int8")


def test_a_bias_in_the_weights_is_refused_naming_it(untied, tmp_path):
    d = _copy(untied, tmp_path / "hf")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    _refused(d, "model.safetensors: model.layers.1.self_attn.q_proj.bias is not a parameter raylm's decoder has")


@pytest.mark.parametrize("patch, named", [
    ({"model_type": "mistral", "sliding_window": 16}, 'model_type="mistral"'),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}},
     'quantization_config (quant_method="fp8")'),
])
def test_what_is_not_a_plain_llama_is_refused(untied, tmp_path, patch, named):
    _refused(_copy(untied, tmp_path / "hf", **patch), "config.json: ", named)


def _damage(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # a download cut short


def _extra_tensor(d: Path) -> None:
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.bias"] = torch.zeros(96)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


def _missing_tensor(d: Path) -> None:
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("spoil, named", [
    (_damage, "model.safetensors: not a readable safetensors file"),
    (_extra_tensor, "model.safetensors: model.layers.0.mlp.up_proj.bias is not a parameter"),
    (_missing_tensor, "no weight for layers.1.feed_forward.w2.weight"),
])
def test_weights_that_do_not_fit_are_refused_before_any_cluster_work(untied, tmp_path, spoil, named):
    """`raylm pretrain --init-from-hf DIR`'s up-front check reads a local directory's
    safetensors headers: what reading the weights on the cluster would refuse is refused here."""
    from raylm import cli

    d = _copy(untied, tmp_path / "hf")
    argv = ["pretrain", "--init-from-hf", str(d), "tokenizer.path=unused", f"storage={tmp_path}", "name=x",
            "data.seq_len=24"]
    cli._pretrain_config(cli.build_parser().parse_args(argv))  # the intact directory passes
    spoil(d)
    with pytest.raises(ConfigError) as e:
        cli._pretrain_config(cli.build_parser().parse_args(argv))
    assert "\n" not in str(e.value) and named in str(e.value), str(e.value)


@pytest.mark.parametrize("name", ["../outside.safetensors", "ABS", "sub\\x.safetensors", "config.json", 7])
def test_an_index_naming_a_file_outside_the_directory_is_refused(untied, tmp_path, name):
    """The index is data from the download: its file names are names in the directory, never
    paths (here a valid weights file sits where "../" and the absolute path point)."""
    d = _two_shards(untied, tmp_path / "hf")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(d / "model-00002-of-00002.safetensors", outside)
    name = str(outside) if name == "ABS" else name
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"model\.safetensors\.index\.json: weight file .* is not a \.safetensors "
                                          r"file in the directory"):
        hf_weight_files(str(d))
