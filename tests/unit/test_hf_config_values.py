"""config.json values transformers' Llama accepts: `--init-from-hf` reads each one that computes
what raylm's decoder computes, with transformers' logits, and refuses in one line the ones
that would compute something else.

Read and equal to transformers (`LlamaForCausalLM.from_pretrained` of the same directory):
hidden_act "swish" (ACT2FN maps it to torch.nn.SiLU, as "silu"), pretraining_tp > 1 (older
transformers split the head's matmul into that many slices, the same logits; 5.x ignores
it), an explicit head_dim equal to hidden_size / num_attention_heads (or null), a null
num_key_value_heads (num_attention_heads), any rms_norm_eps, and "default" RoPE whatever
else its parameters carry (Llama's default RoPE reads neither factor nor
partial_rotary_factor). attention_dropout applies in training only: the logits agree.
Refused: any other activation, RoPE scaling of another type (even linear at factor 1), a
head_dim of its own (raylm derives it), and attention or MLP biases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.unit.test_hf_read_agrees_with_transformers import (  # noqa: E402
    SHAPE, _copy, _logits_agree, _read, _refused, untied)

__all__ = ["untied"]  # the module-scoped fixture, shared


@pytest.fixture(scope="module")
def mha(tmp_path_factory) -> Path:
    """A checkpoint with as many kv heads as query heads (num_key_value_heads null reads so)."""
    import transformers
    import torch

    from tests.weights import redraw_at_unit_scale

    shape = {**SHAPE, "num_key_value_heads": SHAPE["num_attention_heads"]}
    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("mha") / "hf"
    redraw_at_unit_scale(transformers.LlamaForCausalLM(config).float(), seed=1).save_pretrained(d)
    return d


def test_swish_is_silu(untied, tmp_path):
    """transformers computes hidden_act "swish" with torch.nn.SiLU; raylm refused it."""
    _logits_agree(_copy(untied, tmp_path / "hf", hidden_act="swish"))


@pytest.mark.parametrize("patch", [
    dict(pretraining_tp=2),
    dict(head_dim=16),
    dict(head_dim=None),
    dict(rms_norm_eps=1e-6),
    dict(rms_norm_eps=3e-2),  # large enough to move the logits if it were not applied
    dict(attention_dropout=0.1),
    dict(rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                                               "partial_rotary_factor": 0.5}),
    dict(rope_scaling={"rope_type": "default", "rope_theta": 10000.0, "factor": 8.0}),
], ids=lambda p: ",".join(p))
def test_values_transformers_accepts_give_its_logits(untied, tmp_path, patch):
    _logits_agree(_copy(untied, tmp_path / "hf", **patch))


def test_null_kv_heads_are_the_query_heads(mha, tmp_path):
    d = _copy(mha, tmp_path / "hf", num_key_value_heads=None)
    assert _read(d)[0].kv_heads == 4
    _logits_agree(d)


@pytest.mark.parametrize("patch,named", [
    (dict(hidden_act="gelu"), "hidden_act='gelu'; raylm's decoder has hidden_act='silu' (or 'swish', the same "
                              "function)"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 1.0}), "RoPE scaling 'linear' (rope_scaling)"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}), "RoPE scaling 'llama3'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}),
     "RoPE scaling 'yarn' (rope_parameters)"),
    (dict(head_dim=32), "head_dim=32 is not hidden_size/num_attention_heads"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
])
def test_values_computed_otherwise_are_refused(untied, tmp_path, patch, named):
    _refused(_copy(untied, tmp_path / "hf", **patch), "config.json: ", named)
