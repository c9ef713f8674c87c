"""Weights loaded without a throwaway random init: a checkpoint for inference (in a chosen
dtype), and Hugging Face Llama weights to start training from (`raylm pretrain --init-from-hf`).

The HF direction is tested on raylm's own export of the session's tiny run: started from that
export, a run's initial weights and logits are the source run's exactly (one file and
sharded); what does not fit is refused in one line before any cluster work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raylm import checkpoint, cli
from raylm.generate import load_for_inference, resolve_checkpoint
from raylm.model import build_model


@pytest.fixture(scope="module")
def source(tiny_run):
    model, tok, meta = load_for_inference(tiny_run)
    return model, tok


@pytest.fixture(scope="module")
def hf_exports(tiny_run, tmp_path_factory):
    """The tiny run exported as one safetensors file and as shards with an index."""
    from raylm.export.hf import export_run

    root = tmp_path_factory.mktemp("hf")
    return {"single": export_run(tiny_run, str(root / "single")),
            "sharded": export_run(tiny_run, str(root / "sharded"), max_shard_bytes=40_000)}


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


def test_load_for_inference_draws_no_random_init(tiny_run, source):
    """The loaded model computes what the checkpoint's weights compute, and loading leaves the
    global RNG where it was: a random init (which draws from it) would move it on."""
    model, tok = source
    ckpt = resolve_checkpoint(tiny_run)
    reference = build_model(model.cfg, seed=7)  # random init, then every weight overwritten
    checkpoint.load_model_weights(reference, ckpt)
    x = _tokens(tok.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(x)[0], reference.eval()(x)[0])

    torch.manual_seed(123)
    expected = torch.rand(8)
    torch.manual_seed(123)
    load_for_inference(tiny_run)
    assert torch.equal(torch.rand(8), expected), "loading drew from the global RNG (a random init ran)"


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16])
def test_load_for_inference_in_a_dtype(tiny_run, source, dtype):
    """Parameters come in the asked dtype, equal to the fp32 weights rounded once; the RoPE
    tables stay fp32 and the logits stay close to fp32's."""
    fp32, tok = source
    model, _, _ = load_for_inference(tiny_run, dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    for (name, p), (_, q) in zip(fp32.named_parameters(), model.named_parameters(), strict=True):
        assert q.dtype == want, name
        assert torch.equal(q, p.to(want)), name
    assert model.rope_cos.dtype == torch.float32 and torch.equal(model.rope_sin, fp32.rope_sin)
    x = _tokens(tok.vocab_size)
    with torch.no_grad():
        low, ref = model(x)[0], fp32(x)[0]
    assert low.dtype == want
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="float64"):
        load_for_inference(tiny_run, dtype="float64")


def _pretrain_args(hf_dir: str, tiny_run: str, tmp_path, *extra: str):
    return ["pretrain", "--init-from-hf", hf_dir, f"tokenizer.path={tiny_run}/tokenizer",
            f"storage={tmp_path}", "name=from-hf", "data.seq_len=64", *extra]


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_pretrain_starts_from_hf_weights(tiny_run, source, hf_exports, tmp_path, layout):
    """`raylm pretrain --init-from-hf DIR` derives the model from DIR's config.json, and the
    run's initial weights (what `setup_model` gives the training loop) are the source run's."""
    from raylm.train import setup_model

    src, tok = source
    if layout == "sharded":
        with open(f"{hf_exports[layout]}/model.safetensors.index.json") as f:
            assert len(set(json.load(f)["weight_map"].values())) > 1
    args = cli.build_parser().parse_args(_pretrain_args(hf_exports[layout], tiny_run, tmp_path))
    cfg = cli._pretrain_config(args)
    m = cfg.model
    s = src.cfg
    assert (m.dim, m.n_layers, m.n_heads, m.kv_heads, m.hidden_dim, m.vocab_size, m.max_seq_len, m.rope_theta,
            m.norm_eps, m.tie_embeddings) == (s.dim, s.n_layers, s.n_heads, s.kv_heads, s.hidden_dim, s.vocab_size,
                                              s.max_seq_len, s.rope_theta, s.norm_eps, s.tie_embeddings)
    assert cfg.init_from == hf_exports[layout]

    model, _, start = setup_model(cfg, torch.device("cpu"), "never", log=lambda *_: None)
    assert start.step == 0
    got, want = model.state_dict(), src.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    x = _tokens(tok.vocab_size)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[0], src(x)[0])


def _main(argv, capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("override, named", [
    ("model.n_layers=3", "num_hidden_layers=2 but this run has model.n_layers=3"),
    ("model.ffn_dim=128", "intermediate_size=192 but this run has model.ffn_dim=128"),
    ("model.tie_embeddings=false", "tie_word_embeddings=True but this run has model.tie_embeddings=False"),
    ("model.vocab_size=448", "vocab_size=384 but this run has model.vocab_size=448"),
    # Not the shape, but another function of the same weights: accepted once, silently.
    ("model.norm_eps=0.1", "rms_norm_eps=1e-05 but this run has model.norm_eps=0.1"),
    ("model.width_scaling=mup model.base_dim=32", "model.width_scaling=mup with model.base_dim=32, "
                                                  "which divides the logits by 2"),
])
def test_shape_mismatch_is_one_line(tiny_run, hf_exports, tmp_path, capsys, override, named):
    rc, err = _main(_pretrain_args(hf_exports["single"], tiny_run, tmp_path, *override.split()), capsys)
    assert rc == 2
    assert len(err.splitlines()) == 1 and named in err and "config.json" in err, err


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_what_cannot_start_a_run_is_one_line(tiny_run, hf_exports, tmp_path, capsys):
    """Pickle weights, another architecture and a missing tokenizer are refused before training."""
    pickled = _copy(hf_exports["single"], tmp_path / "pickled")
    (tmp_path / "pickled" / "model.safetensors").rename(tmp_path / "pickled" / "pytorch_model.bin")
    rc, err = _main(_pretrain_args(pickled, tiny_run, tmp_path), capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "pytorch_model.bin: pickle weights are not read" in err, err

    gpt2 = _copy(hf_exports["single"], tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    rc, err = _main(_pretrain_args(gpt2, tiny_run, tmp_path), capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "architectures=['GPT2LMHeadModel']" in err, err

    rc, err = _main(["pretrain", "--init-from-hf", hf_exports["single"], f"storage={tmp_path}", "data.seq_len=64"],
                    capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "set tokenizer.path=DIR" in err, err


@pytest.mark.parametrize("patch, named", [
    ({"rope_scaling": "linear"}, 'rope_scaling="linear"; expected an object or null'),
    ({"num_attention_heads": "4"}, 'num_attention_heads="4"; expected an integer'),
    ({"rms_norm_eps": None}, "rms_norm_eps=null; expected a number"),
    ({"tie_word_embeddings": "yes"}, 'tie_word_embeddings="yes"; expected true or false'),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}}, 'rope_parameters.rope_theta="1e4"'),
    # The plain type in one key must not hide a scaled one in the other.
    ({"rope_scaling": {"rope_type": "default"}, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}},
     "RoPE scaling 'llama3' (rope_parameters)"),
])
def test_a_malformed_config_json_is_one_line_naming_the_key(tiny_run, hf_exports, tmp_path, capsys, patch, named):
    d = _copy(hf_exports["single"], tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **patch}))
    rc, err = _main(_pretrain_args(d, tiny_run, tmp_path), capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{d}/config.json: " in err and named in err, err


def test_stale_weights_beside_an_export_are_not_read(source, hf_exports, tmp_path):
    """A raylm export's marker lists its files: weights of the other layout beside them (left
    by an earlier export to the same place) are not the model. Without that list, a directory
    holding both layouts is refused: which one is current is unknown."""
    from safetensors.torch import load_file, save_file

    from raylm.errors import ConfigError
    from raylm.export.hf import EXPORT_MARKER
    from raylm.hf import hf_weight_files, read_hf_weights

    src, _ = source
    mixed = _copy(hf_exports["single"], tmp_path / "mixed")
    for f in Path(hf_exports["sharded"]).iterdir():  # stale shards (zeros) and their index
        if f.name.startswith("model-"):
            save_file({k: torch.zeros_like(t) for k, t in load_file(f).items()}, tmp_path / "mixed" / f.name,
                      metadata={"format": "pt"})
        elif f.name == "model.safetensors.index.json":
            shutil.copy(f, tmp_path / "mixed" / f.name)
    assert hf_weight_files(mixed) == [f"{mixed}/model.safetensors"]  # the index was preferred
    got = read_hf_weights(mixed, src.cfg)
    for name, want in src.state_dict().items():
        assert torch.equal(got[name], want), name

    marker = json.loads((tmp_path / "mixed" / EXPORT_MARKER).read_text())
    assert "model.safetensors" in marker["files"] and EXPORT_MARKER not in marker["files"]
    (tmp_path / "mixed" / EXPORT_MARKER).unlink()
    with pytest.raises(ConfigError, match=r"mixed: holds both model\.safetensors and model\.safetensors\.index\.json"):
        hf_weight_files(mixed)
