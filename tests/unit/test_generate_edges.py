"""raylm.generate.greedy_decode at its edges: 0 new tokens gives none (it gave the prefill's
pick, one token nobody asked for), and a negative count is refused in one line rather than
failing inside the KV cache with a shape error."""

import pytest
import torch

from raylm.config import ModelConfig
from raylm.generate import greedy_decode
from raylm.model import build_model


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, max_seq_len=16), seed=0).eval()


def test_zero_new_tokens_gives_none(model):
    prompt = torch.zeros(2, 3, dtype=torch.long)
    assert greedy_decode(model, prompt, 0).shape == (2, 0)
    assert greedy_decode(model, prompt, 1).shape == (2, 1)
    assert torch.equal(greedy_decode(model, prompt, 4)[:, :1], greedy_decode(model, prompt, 1))


def test_a_negative_count_is_refused(model):
    with pytest.raises(ValueError, match=r"^new_tokens=-2: expected 0 or more$"):
        greedy_decode(model, torch.zeros(1, 3, dtype=torch.long), -2)
