"""Device-aware defaults and the vocabulary: what a benchmark measures is what `raylm pretrain`
runs on the same device, and a model's vocabulary always comes from its tokenizer.

Both devices' resolution is checked here on CPU: the resolver takes the device type."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from raylm.config import (CUDA_LOSS_CHUNK, MODEL_PRESETS, PRESET_TOKENIZER_VOCAB, ConfigError, ModelConfig,
                          device_defaults, load_config)
from raylm.model import count_params

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_throughput():
    return _bench("train_throughput")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_benchmark_resolves_the_config_pretrain_runs(train_throughput, preset, device):
    """Without flags, train_throughput's settings are `raylm pretrain model.preset=<preset>`'s
    on that device, as the training worker resolves them (Config.for_device)."""
    args = train_throughput.parse_args(["--preset", preset, "--device", device])
    bench = train_throughput.resolved_config(args)
    pretrain = load_config(None, [f"model.preset={preset}"]).for_device(device)
    assert bench.train == pretrain.train and bench.model == pretrain.model
    tc = pretrain.train
    assert (args.compile, args.chunked_ce, args.ce_chunk) == (tc.compile, tc.loss_chunk_size > 0, tc.loss_chunk_size)
    assert train_throughput.model_config(preset, 128).vocab_size == \
        pretrain.model.with_vocab(PRESET_TOKENIZER_VOCAB[preset]).vocab_size


def test_auto_means_on_for_cuda_and_off_for_cpu():
    assert device_defaults("cuda") == {"precision": "bf16", "compile": True, "loss_chunk_size": CUDA_LOSS_CHUNK}
    assert device_defaults("cpu") == {"precision": "fp32", "compile": False, "loss_chunk_size": 0}
    tc = load_config(None, []).train
    assert (tc.precision, tc.compile, tc.loss_chunk_size) == ("auto", "auto", "auto")  # the defaults
    assert tc.for_device("cuda").compile is True and tc.for_device("cpu").loss_chunk_size == 0
    # An explicit setting wins on either device.
    mine = load_config(None, ["train.compile=false", "train.loss_chunk_size=512", "train.precision=fp32"]).train
    assert mine.for_device("cuda") == mine


def test_benchmark_flags_are_overrides_of_the_same_config(train_throughput):
    args = train_throughput.parse_args(["--preset", "tiny", "--device", "cuda", "--no-compile", "--ce-chunk", "48"])
    tc = train_throughput.resolved_config(args).train
    assert (tc.compile, tc.loss_chunk_size, tc.precision) == (False, 48, "bf16")
    args = train_throughput.parse_args(["--preset", "tiny", "--device", "cuda", "--no-chunked-ce"])
    assert train_throughput.resolved_config(args).train.loss_chunk_size == 0


def test_compile_auto_does_not_compile_on_cpu():
    from raylm.parallel import build_parallel_model

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=8)
    model = build_parallel_model(cfg, torch.device("cpu"), "fp32", seed=0, compile="auto")
    assert not any(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in model.layers)


@pytest.mark.parametrize("bad", ["train.compile=maybe", "train.loss_chunk_size=big"])
def test_auto_is_the_only_text_these_take(bad):
    with pytest.raises(ConfigError, match=re.escape(bad.split("=")[0])):
        load_config(None, [bad])


# --------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_presets_take_the_vocabulary_from_the_tokenizer(preset):
    m = MODEL_PRESETS[preset]
    assert m.vocab_size == 0  # no preset fixes a vocabulary
    assert m.with_vocab(2048).vocab_size == 2048  # the default tokenizer: no unused rows
    assert preset in PRESET_TOKENIZER_VOCAB  # and each names the size it was designed for


def test_design_vocabularies_give_the_published_sizes():
    def params(name):
        return count_params(MODEL_PRESETS[name].with_vocab(PRESET_TOKENIZER_VOCAB[name]))

    assert params("gpt2-124m") == pytest.approx(124e6, rel=0.02)
    assert MODEL_PRESETS["gpt2-124m"].with_vocab(50257).vocab_size == 50304  # GPT-2's padded size
    assert params("1b") == pytest.approx(1.1e9, rel=0.05)
    assert 6.7e9 <= params("7b") <= 7.3e9


def test_a_vocabulary_that_is_not_a_rounding_is_refused_naming_both():
    with pytest.raises(ConfigError) as e:
        replace(MODEL_PRESETS["1b"], vocab_size=32000).with_vocab(2048)
    assert "32000" in str(e.value) and "2048" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="1000.*2048"):
        ModelConfig(vocab_size=1000).with_vocab(2048)
    # A rounding is fine: the tokenizer's size or up to the next multiple of 64.
    assert ModelConfig(vocab_size=2050).with_vocab(2050).vocab_size == 2050
    assert ModelConfig(vocab_size=2112).with_vocab(2050).vocab_size == 2112
    with pytest.raises(ConfigError):
        ModelConfig(vocab_size=2176).with_vocab(2050)


# --------------------------------------------------------------------------- torch version


def test_pyproject_asks_for_the_torch_readme_says_is_tested():
    pin = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    tested = re.search(r"tested with torch ([\d.]+)", (ROOT / "README.md").read_text()).group(1)
    assert tested.startswith(pin), (pin, tested)
    installed = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert installed >= tuple(int(x) for x in pin.split(".")[:2])


# --------------------------------------------------------------------------- GPU decode, on CPU


def test_masked_gqa_attention_never_asks_sdpa_for_enable_gqa(monkeypatch):
    """On CUDA a boolean mask with enable_gqa leaves SDPA only its math kernel; the decode
    step's masked call folds the query groups instead (tests/gpu asserts the kernel). Here:
    what reaches SDPA, and that the tokens are the plain ones."""
    import torch.nn.functional as F

    import raylm.model
    from raylm.generate import greedy_decode
    from raylm.model import build_model

    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, max_seq_len=32)
    model = build_model(cfg, seed=0).eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((attn_mask is not None, enable_gqa, q.shape[1], k.shape[1]))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(raylm.model.F, "scaled_dot_product_attention", spy)
    got = greedy_decode(model, prompt, 6)
    masked = [c for c in calls if c[0]]
    assert masked and all(not gqa and hq == hk for _, gqa, hq, hk in masked)  # folded: equal head counts
    monkeypatch.setattr(raylm.model.F, "scaled_dot_product_attention", real)
    seq = prompt
    for _ in range(6):  # the reference: the whole sequence again, no cache, no mask
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq[:, 5:])


def test_decode_marks_each_step_for_cuda_graphs(monkeypatch):
    """A compiled step's CUDA graphs reuse their output buffers: greedy_decode and generate
    mark the start of every step (prefill included) so a replay may overwrite the last."""
    from raylm.generate import generate, greedy_decode
    from raylm.model import build_model

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = build_model(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=32), seed=0).eval()
    greedy_decode(model, torch.zeros(1, 3, dtype=torch.long), 5)
    assert len(marks) == 5
    marks.clear()
    generate(model, [1, 2, 3], 5, temperature=0)
    assert len(marks) == 5  # the prefill and 4 steps: the 5th token needs no further step
