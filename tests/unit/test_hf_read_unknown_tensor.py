"""Reading HF weights back (`--init-from-hf`): a tensor the model that config.json describes has
no place for (a layer past num_hidden_layers) is refused in one line naming the file, as the
docstring promises, not with a bare KeyError from inside the training worker."""

from __future__ import annotations

import json

import pytest

from raylm.config import ModelConfig
from raylm.errors import ConfigError
from raylm.hf import hf_llama_config, model_config_from_hf, read_hf_weights, to_hf_state_dict
from raylm.model import build_model


def test_a_layer_past_config_json_is_refused_in_one_line(tmp_path):
    from safetensors.torch import save_file

    shape = dict(vocab_size=128, dim=32, n_heads=2, max_seq_len=16)
    two = build_model(ModelConfig(n_layers=2, **shape))
    config = hf_llama_config(ModelConfig(n_layers=1, **shape))  # says one layer; the weights have two
    (tmp_path / "config.json").write_text(json.dumps(config))
    sd = to_hf_state_dict(two.cfg, two.state_dict())
    del sd["lm_head.weight"]  # tied: one copy
    save_file({k: v.detach().clone() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model\.safetensors: holds layers\.1\.\S+, which the model that "
                                          r"config\.json describes has no place for") as e:
        read_hf_weights(str(tmp_path), model_config_from_hf(config))
    assert "\n" not in str(e.value)
