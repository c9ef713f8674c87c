"""Each speed or memory switch computes the same training step as the plain path."""

import pytest
import torch
import torch.distributed as dist

from raylm.config import ConfigError, ModelConfig, TrainConfig, load_config
from raylm.parallel import build_parallel_model, data_parallel_mesh, init_local_process_group
from raylm.train import NextTokenObjective, make_optimizer, train_step

CFG = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
TC = TrainConfig()


def one_step(**switches):
    model = build_parallel_model(CFG, torch.device("cpu"), switches.pop("precision", "fp32"), seed=0, **switches)
    opt = make_optimizer(model, TC, torch.device("cpu"))
    batch = torch.randint(0, CFG.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
    stats = train_step(model, opt, [{"tokens": batch}], NextTokenObjective(), 1e-3, 1.0)
    return stats, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_activation_checkpointing_matches_plain():
    plain, w_plain = one_step()
    ckpt, w_ckpt = one_step(activation_checkpointing=True)
    assert ckpt.loss == pytest.approx(plain.loss, rel=1e-6)
    assert ckpt.grad_norm == pytest.approx(plain.grad_norm, rel=1e-5)
    for k, v in w_plain.items():
        key = k if k in w_ckpt else next(x for x in w_ckpt if x.replace("_checkpoint_wrapped_module.", "") == k)
        torch.testing.assert_close(w_ckpt[key], v)


def test_bf16_needs_a_process_group():
    with pytest.raises(ValueError, match="process group"):
        build_parallel_model(CFG, torch.device("cpu"), "bf16", seed=0)


def test_bf16_mixed_precision_runs_through_fsdp2_in_one_process():
    plain, _ = one_step()
    init_local_process_group(torch.device("cpu"))
    try:
        bf16, weights = one_step(precision="bf16")
        fp32_sharded, _ = one_step()
        kept_gathered, _ = one_step(reshard_after_forward=False)
    finally:
        dist.destroy_process_group()
    assert fp32_sharded.loss == pytest.approx(plain.loss, rel=1e-5)  # FSDP2 on one rank = plain
    assert kept_gathered.loss == fp32_sharded.loss and kept_gathered.grad_norm == fp32_sharded.grad_norm
    assert bf16.loss == pytest.approx(plain.loss, rel=2e-2)  # bf16 compute, fp32 master weights
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_training_shards_a_world_of_one_only_for_bf16(tmp_path):
    """fp32 on one rank has nothing to shard (FSDP2 would only add DTensor bookkeeping to each
    step); bf16 needs FSDP2's MixedPrecisionPolicy, so it shards even there."""
    from raylm.config import Config, DataConfig
    from raylm.parallel import is_sharded, sharding_pays
    from raylm.train import setup_model

    init_local_process_group(torch.device("cpu"))
    try:
        assert not sharding_pays("fp32") and sharding_pays("bf16")
        for precision, sharded in (("fp32", False), ("bf16", True)):
            c = Config(name=precision, storage=str(tmp_path), model=CFG, data=DataConfig(seq_len=16),
                       train=TrainConfig(precision=precision, num_workers=1)).validate()
            model, _, _ = setup_model(c, torch.device("cpu"), "never", lambda *_: None)
            assert is_sharded(model) == sharded, precision
    finally:
        dist.destroy_process_group()


def test_float8_matches_plain_to_float8_precision():
    pytest.importorskip("torchao.float8", reason="torchao is not installed (pip install -e '.[float8]')")
    from torchao.float8.float8_linear import Float8Linear

    model = build_parallel_model(CFG, torch.device("cpu"), "fp32", seed=0, float8=True)
    converted = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    assert len(converted) == CFG.n_layers * 7  # q, k, v, o and the three SwiGLU projections
    assert all(n.startswith("layers.") for n in converted)  # never the LM head or embeddings
    plain_keys = set(build_parallel_model(CFG, torch.device("cpu"), "fp32", seed=0).state_dict())
    assert set(model.state_dict()) == plain_keys  # checkpoints and export see the same model

    plain, _ = one_step()
    f8, w_f8 = one_step(float8=True)
    # e4m3 keeps 3 mantissa bits: the same computation to that precision, not bit-equal.
    assert f8.loss == pytest.approx(plain.loss, rel=1e-2)
    assert f8.grad_norm == pytest.approx(plain.grad_norm, rel=0.1)
    assert f8.loss != plain.loss  # the casts really happen
    assert all(v.dtype == torch.float32 for v in w_f8.values())  # fp32 master weights

    # The GPU combination: float8 linears inside FSDP2 with the bf16 MixedPrecisionPolicy.
    init_local_process_group(torch.device("cpu"))
    try:
        f8_bf16, _ = one_step(precision="bf16", float8=True)
    finally:
        dist.destroy_process_group()
    assert f8_bf16.loss == pytest.approx(plain.loss, rel=2e-2)
    assert f8_bf16.grad_norm == pytest.approx(plain.grad_norm, rel=0.15)


def test_float8_errors_name_the_problem(monkeypatch):
    pytest.importorskip("torchao.float8", reason="torchao is not installed")
    narrow = ModelConfig(vocab_size=128, dim=24, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16)
    with pytest.raises(ValueError, match="divisible by 16"):
        build_parallel_model(narrow, torch.device("cpu"), "fp32", seed=0, float8=True)
    monkeypatch.setitem(__import__("sys").modules, "torchao.float8", None)  # as if not installed
    with pytest.raises(ValueError, match=r"needs torchao: pip install -e '\.\[float8\]'"):
        build_parallel_model(CFG, torch.device("cpu"), "fp32", seed=0, float8=True)


@pytest.mark.parametrize("override,message", [
    ("train.replicate_degree=0", "train.replicate_degree=0: expected an integer >= 1"),
    ("train.replicate_degree=2.5", "train.replicate_degree=2.5: expected int"),
    ("train.replicate_degree=3 train.num_workers=2", "train.replicate_degree=3 does not divide train.num_workers=2"),
])
def test_replicate_degree_is_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides=override.split())
    assert "\n" not in str(e.value)


def test_replicate_degree_must_divide_the_world_it_shards():
    """Checked when the config loads, against train.num_workers (the world of a Ray run), and
    where the mesh is built, against the process group's world (one process here)."""
    assert TrainConfig().replicate_degree == 1  # plain FSDP unless asked
    ok = load_config(overrides=["train.num_workers=4", "train.micro_batch_size=8", "train.replicate_degree=2"])
    assert ok.train.replicate_degree == 2
    world_1 = r"train.replicate_degree=2 must be a positive divisor of the world size 1"
    with pytest.raises(ConfigError, match=world_1):
        build_parallel_model(CFG, torch.device("cpu"), "fp32", seed=0, replicate_degree=2)
    init_local_process_group(torch.device("cpu"))
    try:
        assert data_parallel_mesh(torch.device("cpu"), 1) is None  # FSDP2 over the default group, as before
        with pytest.raises(ConfigError, match=world_1):
            build_parallel_model(CFG, torch.device("cpu"), "fp32", seed=0, replicate_degree=2)
    finally:
        dist.destroy_process_group()


def test_bf16_blocks_rotate_with_fp32_rope_tables():
    """FSDP2 casts a module's floating inputs to param_dtype by default; the blocks' inputs
    include the RoPE tables, which must reach `apply_rope` in fp32 (bf16 tables put up to
    2^-9 of error on every rotation). The residual stream still arrives in bf16."""
    init_local_process_group(torch.device("cpu"))
    try:
        model = build_parallel_model(CFG, torch.device("cpu"), "bf16", seed=0)
        seen = []
        for block in model.layers:
            block.attention.register_forward_pre_hook(
                lambda m, args: seen.append((args[0].dtype, args[1].dtype, args[2].dtype)))
        with torch.no_grad():
            model(torch.randint(0, CFG.vocab_size, (2, 8)))
    finally:
        dist.destroy_process_group()
    assert seen == [(torch.bfloat16, torch.float32, torch.float32)] * CFG.n_layers


def test_float8_is_refused_by_name_below_compute_capability_8_9():
    """torchao's float8 training does not check the GPU: on an A100 (8.0) every worker failed at
    its first forward (torch._scaled_mm needs 8.9 or later). The refusal names device and fix;
    8.9 and later pass. (Wired into build_parallel_model for CUDA devices: tests/gpu.)"""
    from raylm.parallel import float8_refusal

    why = float8_refusal("NVIDIA A100-SXM4-80GB", (8, 0))
    assert "NVIDIA A100-SXM4-80GB has 8.0" in why and "train.float8=false" in why and "\n" not in why
    assert float8_refusal("NVIDIA L4", (8, 9)) is None
    assert float8_refusal("NVIDIA H100 80GB HBM3", (9, 0)) is None
    assert float8_refusal("NVIDIA B200", (10, 0)) is None
