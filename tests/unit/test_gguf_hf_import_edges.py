"""Edges of the GGUF export and of `--init-from-hf`, checked against transformers.

* GGUF: every `--dtype` the CLI offers for `--format gguf` (f32, f16, q8_0), tied and untied,
  with a vocabulary padded to a multiple of 64, is read back by transformers' own GGUF loader
  (which dequantizes and undoes llama.cpp's q/k permutation, as llama.cpp's converter defines
  it); its `LlamaForCausalLM` gives raylm's logits for the same weights rounded as the file
  stores them (f16, q8_0 blocks), so a layout or permutation mistake shows far above the
  tolerance.
* HF import: what raylm's decoder cannot compute is refused in one line naming config.json and
  its key (a GQA ratio, head_dim, scaled RoPE, biases; a tied checkpoint under a config.json
  that says untied); half-precision safetensors give transformers' logits; a pickle file beside
  the safetensors is never unpickled.
* With llama-cpp-python installed, llama.cpp itself computes each dtype's file as raylm does and
  tokenizes a prompt rendered with the file's chat template as raylm's chat encoding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from raylm.errors import ConfigError  # noqa: E402
from raylm.export.gguf import export_gguf  # noqa: E402
from raylm.hf import model_config_from_hf, read_hf_config, read_hf_weights  # noqa: E402
from raylm.model import Transformer, build_model  # noqa: E402
from raylm.tokenizer import train_tokenizer  # noqa: E402
from tests.unit.test_export_gguf import TEXTS  # noqa: E402
from tests.unit.test_export_hf import unit_scale_model  # noqa: E402
from tests.unit.test_hf_read_agrees_with_transformers import SHAPE, _copy, tied, untied  # noqa: E402,F401 (fixtures)

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, str(tmp_path_factory.mktemp("tok") / "tokenizer"), 400)


def _as_stored(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """`t` rounded as the GGUF file stores it (norms stay f32; q8_0 rows of whole blocks)."""
    if t.ndim == 1 or dtype == "f32":
        return t
    if dtype == "f16":
        return t.half().float()
    a = t.numpy()
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0).copy())


def _stored_model(model, dtype: str) -> torch.nn.Module:
    """A copy of `model` with its weights rounded as a `dtype` GGUF file stores them."""
    stored = build_model(model.cfg, seed=0).eval()
    with torch.no_grad():
        for name, p in stored.named_parameters():
            p.copy_(_as_stored(dict(model.named_parameters())[name].detach(), dtype))
    return stored


def _transformers_from_gguf(path: str) -> torch.nn.Module:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = {k: v for k, v in load_gguf_checkpoint(path)["config"].items()
              if k not in ("model_type", "_model_name_or_path")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float().eval()
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config["tie_word_embeddings"]:
        assert missing == ["lm_head.weight"]
        model.tie_weights()
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_transformers_reads_every_gguf_dtype_as_raylms_model(tok, tmp_path, dtype, tie):
    n = tok.vocab_size
    model = unit_scale_model(tok, tie, vocab_size=-(-n // 64) * 64, rope_theta=500.0)  # padded rows
    assert model.cfg.vocab_size > n
    path = export_gguf(model, tok, {}, str(tmp_path / "m.gguf"), dtype)
    theirs = _transformers_from_gguf(path)
    assert theirs.config.vocab_size == n

    x = torch.randint(0, n, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = _stored_model(model, dtype)(x)[0][..., :n]
        got = theirs(input_ids=x).logits
    assert want.abs().max() > 1
    # Tighter than the rounding itself changes the logits (f16 ~4e-3, q8_0 ~0.1 of ~4): what
    # is compared is the layout, the rounding being the same on both sides.
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- --init-from-hf

def _read(d: Path):
    where = str(d / "config.json")
    cfg = model_config_from_hf(read_hf_config(str(d)), where)
    return cfg, read_hf_weights(str(d), cfg)


def _refused(d: Path, *named: str) -> None:
    with pytest.raises(ConfigError) as e:
        _read(d)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in named), msg


@pytest.mark.parametrize("patch, named", [
    ({"num_key_value_heads": 3}, "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    ({"num_key_value_heads": 0}, "num_key_value_heads=0"),
    ({"hidden_size": 66}, "hidden_size=66 is not divisible by num_attention_heads=4"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}}, "RoPE scaling 'llama3' (rope_scaling)"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling 'linear' (rope_scaling)"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
])
def test_what_the_decoder_cannot_compute_is_refused_naming_the_key(untied, tmp_path, patch, named):
    _refused(_copy(untied, tmp_path / "hf", **patch), f"{tmp_path / 'hf' / 'config.json'}: ", named)


def test_a_tied_checkpoint_under_an_untied_config_names_tie_word_embeddings(tied, tmp_path):
    """save_pretrained of a tied model stores the embedding alone; with config.json edited to
    untied, transformers would start lm_head at random."""
    _refused(_copy(tied, tmp_path / "hf", tie_word_embeddings=False),
             "no lm_head.weight, but config.json has tie_word_embeddings false or absent")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_safetensors_give_transformers_logits(untied, tmp_path, dtype):
    d = _copy(untied, tmp_path / "hf")
    sd = load_file(d / "model.safetensors")
    save_file({k: v.to(dtype) for k, v in sd.items()}, d / "model.safetensors", metadata={"format": "pt"})
    cfg, weights = _read(d)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    model = Transformer(cfg)
    model.load_state_dict(weights, strict=True)
    ref = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    x = torch.randint(0, SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[0], ref(input_ids=x).logits, atol=1e-5, rtol=1e-4)


class _Trap:
    """Unpickling it creates the file `path`: evidence that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_beside_the_safetensors_is_never_unpickled(untied, tmp_path):
    import pickle

    d = _copy(untied, tmp_path / "hf")
    trap = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "training_args.bin"):
        (d / name).write_bytes(pickle.dumps(_Trap(str(trap))))
    _read(d)
    (d / "model.safetensors").unlink()
    _refused(d, "pickle weights are not read")
    assert not trap.exists()


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_computes_every_gguf_dtype_as_raylm(tok, tmp_path, dtype):
    """With llama-cpp-python installed (pip install llama-cpp-python; it builds llama.cpp):
    an untied model with padded vocabulary rows, in each dtype, gives raylm's logits (llama.cpp
    keeps its KV cache in f16, and q8_0 matmuls quantize the activations too: hence the
    tolerance), and a chat prompt rendered with the file's template and tokenized as llama.cpp's
    chat completion does (parse_special) gives raylm's chat ids."""
    try:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except ImportError:
        pytest.skip("llama-cpp-python not installed")
    n = tok.vocab_size
    model = unit_scale_model(tok, False, vocab_size=-(-n // 64) * 64, rope_theta=500.0)
    path = export_gguf(model, tok, {}, str(tmp_path / "m.gguf"), dtype)
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, verbose=False)
    assert llm.n_vocab() == n
    ids = tok.encode("The quick brown fox jumps over\n the lazy dog")
    llm.eval(ids)
    with torch.no_grad():
        want = _stored_model(model, dtype)(torch.tensor([ids]))[0][0, :, :n].numpy()
    got = llm.scores[:len(ids)]
    assert abs(want).max() > 1
    assert abs(got - want).max() < (0.15 if dtype == "q8_0" else 0.02)

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi\nthere"}]
    prompt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|eos|>",
                                 bos_token="<|bos|>")(messages=messages).prompt
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == \
        tok.encode_chat(messages, add_generation_prompt=True)[0]
    assert llm.token_eos() == tok.eos_id and llm.token_bos() == tok.bos_id
