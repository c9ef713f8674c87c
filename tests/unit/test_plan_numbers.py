"""`raylm plan`'s figures against what raylm builds and writes: the presets' parameter counts,
the checkpoint DCP writes, the corpus `data.mode=prepare` tokenizes, the memory of the layout
it plans (one plain CPU worker, `train.reshard_after_forward`), and its one-line errors."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from raylm.cli import main
from raylm.config import MODEL_PRESETS, ConfigError, ModelConfig, load_config
from raylm.model import Transformer, count_params
from raylm.plan import (GiB, TOKENIZE_BYTES_PER_S_PER_CPU, format_table, make_plan, memory_for_config,
                        memory_per_device, parse_hardware, resolve_size)


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_plan_counts_the_parameters_raylm_builds(preset):
    """Tied or untied head, padded vocabulary (gpt2-124m: 50,257 ids, 50,304 rows), GQA's kv
    heads and qk_norm's per-head norms: the model on the meta device has the plan's count."""
    _, cfg = resolve_size(preset)
    for c in (cfg, replace(cfg, qk_norm=True)):
        with torch.device("meta"):
            built = sum(p.numel() for p in Transformer(c).parameters())
        assert built == count_params(c)
    assert make_plan(preset, "64xH100").params == count_params(cfg)


def test_checkpoint_size_is_what_dcp_writes(tiny_run):
    """12 bytes a parameter: DCP saves the fp32 weights and AdamW's two fp32 moments; the rest
    (step counters, param groups, torch.save's per-tensor headers) is a few KB an entry."""
    from torch.distributed.checkpoint import FileSystemReader

    from raylm.checkpoint import latest_complete, read_meta

    ckpt = latest_complete(tiny_run)
    n = count_params(ModelConfig(**read_meta(ckpt)["config"]["model"]))
    meta = FileSystemReader(ckpt).read_metadata()
    tensors = {k: v for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}
    model = sum(v.size.numel() * v.properties.dtype.itemsize for k, v in tensors.items() if k.startswith("model."))
    moments = sum(v.size.numel() * v.properties.dtype.itemsize for k, v in tensors.items()
                  if k.endswith((".exp_avg", ".exp_avg_sq")))
    assert (model, moments) == (4 * n, 8 * n)
    written = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".distcp"))
    assert 12 * n <= written <= 12 * n + 4096 * len(meta.state_dict_metadata)

    plan = make_plan("7b", "8xH100", 8, "134B")
    assert plan.checkpoint_bytes == 12 * plan.params
    row = next(line for line in format_table(plan).splitlines() if line.startswith("checkpoints"))
    assert f"{12 * plan.params / GiB:.2f} GiB each" in row and "2 kept" in row
    assert f"3 while the next is written: {3 * 12 * plan.params / GiB:.2f} GiB" in row


def test_prepare_hours_cover_the_whole_corpus():
    """data.mode=prepare tokenizes everything at data.path: a budget of 22B tokens from a 50B
    corpus still prepares 50B (it once counted the 22B, 2.3x too few CPU-hours)."""
    def hours(tokens, bpt):
        return tokens * bpt / TOKENIZE_BYTES_PER_S_PER_CPU / 3600

    share = make_plan("1b", "8xH100", tokens="50B")
    assert share.epochs < 1
    assert share.prepare_cpu_hours == pytest.approx(hours(50e9, share.bytes_per_token))
    assert "to prepare its 50B tokens ahead" in format_table(share)
    repeated = make_plan("1b", "8xH100", tokens="2B")  # 4 epochs of it: prepared once
    assert repeated.prepare_cpu_hours == pytest.approx(hours(2e9, repeated.bytes_per_token))
    unknown = make_plan("1b", "8xH100")  # no --tokens: as much as the budget
    assert unknown.prepare_cpu_hours == pytest.approx(hours(unknown.train_tokens, unknown.bytes_per_token))


def test_does_not_fit_on_one_cpu_names_the_plain_model():
    """One fp32 CPU worker trains the model plain (raylm.parallel.sharding_pays), and that is
    what the plan tried; the error once quoted FSDP2's figures instead (6.3 GiB for 350m, with
    gathered copies and unsharded fp32 accumulated gradients it never has, against 4.7)."""
    _, cfg = resolve_size("350m")
    with pytest.raises(ConfigError) as e:
        make_plan("350m", "1xCPU")
    plain = memory_per_device(cfg, 128, 1, 1, "fp32", True, 2, sharded=False)
    assert f": {plain.total / GiB:.1f} GiB per device" in str(e.value)
    assert f"params {4 * count_params(cfg) / GiB:.1f}, grads {4 * count_params(cfg) / GiB:.1f}," in str(e.value)


def test_reshard_after_forward_false_keeps_every_block_gathered():
    """train.reshard_after_forward=false keeps each block's compute copy from its forward to
    its backward: at the start of backward all of them, not three, are gathered."""
    common = ["model.preset=1b", "tokenizer.vocab_size=32000", "data.seq_len=2048", "train.num_workers=8",
              "train.use_gpu=true", "train.micro_batch_size=2", "train.global_batch_size=16"]
    cfg = MODEL_PRESETS["1b"].with_vocab(32000)
    n = count_params(cfg)
    kept = memory_for_config(load_config(overrides=[*common, "train.reshard_after_forward=false"]))
    assert kept.params == pytest.approx(4 * n / 8 + 2 * n)  # every block and the root, in bf16
    default = memory_for_config(load_config(overrides=common))
    assert (kept.grads, kept.optimizer, kept.activations) == (default.grads, default.optimizer, default.activations)


def test_a_two_layer_model_gathers_at_most_its_two_blocks():
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    n = count_params(cfg)
    assert memory_per_device(cfg, 64, 1, 2, "bf16").params == pytest.approx(4 * n / 2 + 2 * n)


@pytest.mark.parametrize("gpus", ["0", "8", "8x", "8 x"])
def test_a_count_without_a_device_is_named_as_such(gpus, capsys):
    with pytest.raises(ConfigError, match=r"no device named; expected COUNTxNAME such as 8xH100 or 2xCPU"):
        parse_hardware(gpus)
    assert main(["plan", "--size", "7b", "--gpus", gpus]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"raylm: error: --gpus={gpus!r}: no device named; expected COUNTxNAME such as 8xH100 or 2xCPU"


@pytest.mark.parametrize("preset,seq_len", [("tiny", 256), ("gpt2-124m", 1024)])
def test_flops_and_recompute_are_what_a_step_computes(preset, seq_len):
    """torch's FLOP counter on a step of the preset (meta device: shapes only): 6N + 12LdT a
    token is what raylm's MFU divides by, and raylm's activation checkpointing adds one
    forward of the blocks less w2's matmul, which torch's checkpoint never recomputes (its
    output is saved by nothing; the plan once counted it: x 1.243 at gpt2-124m, not 1.199)."""
    from torch.utils.flop_counter import FlopCounterMode

    from raylm.metrics import flops_per_token
    from raylm.parallel import apply_activation_checkpointing
    from raylm.plan import recompute_factor

    _, cfg = resolve_size(preset)
    counted = []
    for checkpointing in (False, True):
        with torch.device("meta"):
            model = Transformer(cfg)
            tokens = torch.zeros(1, seq_len + 1, dtype=torch.long)
        if checkpointing:
            apply_activation_checkpointing(model)
        with FlopCounterMode(display=False) as flops:
            model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        counted.append(flops.get_total_flops())
    assert counted[0] / seq_len == pytest.approx(flops_per_token(cfg, seq_len), rel=1e-3)
    assert counted[1] / counted[0] == pytest.approx(recompute_factor(cfg, seq_len), rel=1e-3)


def test_readme_checkpoint_and_data_rows_are_what_plan_prints():
    """README's planning table ("Planning a run"): the checkpoint and data-preparation rows."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("### Planning a run"):readme.index("## Performance")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and line.count("|") == 6}
    for i, command in enumerate(rows["`raylm plan`"]):
        size, gpus, nodes, tokens = re.fullmatch(r"`--size (\S+) --gpus (\S+)(?: --nodes (\d+))? --tokens (\S+)`",
                                                 command).groups()
        plan = make_plan(size, gpus, int(nodes or 1), tokens)
        each = plan.checkpoint_bytes
        assert rows["checkpoint, each"][i] == (f"{each / GiB:.3g} GiB" if each >= GiB else f"{each / 2**20:.3g} MiB")
        hours = float(rows["data CPUs streaming / preparing"][i].split(" / ")[1].split()[0])
        assert hours == pytest.approx(plan.prepare_cpu_hours, rel=0.05), (size, plan.prepare_cpu_hours)


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("preset,vocab,tied,published", [
    ("7b", 32000, False, 7_241_732_096),  # Mistral 7B
    ("7b", 128256, False, 8_030_261_248),  # Llama 3 8B
    ("3b", 128256, True, 3_212_749_824),  # Llama 3.2 3B
    ("1b", 128256, True, 1_235_814_400),  # Llama 3.2 1B
])
def test_presets_count_what_the_published_models_have(preset, vocab, tied, published):
    """The larger presets are published shapes: with those models' vocabulary and tying, raylm
    builds (meta device) and the plan counts their parameters exactly."""
    cfg = replace(MODEL_PRESETS[preset], vocab_size=vocab, tie_embeddings=tied)
    with torch.device("meta"):
        built = sum(p.numel() for p in Transformer(cfg).parameters())
    assert built == count_params(cfg) == published


@pytest.mark.parametrize("size,gpus,nodes,tokens", [("tiny", "2xCPU", 1, "5M"), ("125m", "1xH100", 1, "10B"),
                                                    ("1b", "8xH100", 1, "50B"), ("7b", "8xH100", 8, "134B")])
def test_time_and_memory_by_hand(size, gpus, nodes, tokens):
    """The README's four plans, each figure from its rule: 6 FLOPs a matmul parameter (the
    head's V d included, an untied embedding's lookup not) + 12 L d T; devices x bf16 dense
    peak x MFU; whole steps of whole batches; FSDP2's 16 bytes a parameter over the shards."""
    from raylm.plan import _block_params

    plan = make_plan(size, gpus, nodes, tokens)
    cfg, hw, T = plan.model, plan.hardware, plan.seq_len
    n = count_params(cfg)
    matmul = n - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    per_token = 6 * matmul + 12 * cfg.n_layers * cfg.dim * T
    peak = {"CPU": 96e9, "H100": 989e12}[hw.name]
    assert plan.tokens_per_s == pytest.approx(hw.devices * peak * plan.mfu / (per_token * plan.recompute))
    assert plan.global_batch == plan.micro_batch * plan.accumulation * hw.devices
    assert plan.train_tokens == plan.steps * plan.global_batch * T
    assert plan.hours == pytest.approx(plan.train_tokens / plan.tokens_per_s / 3600)
    m, S = plan.memory, hw.devices
    if hw.sharded:
        block = _block_params(cfg)
        root = n - cfg.n_layers * block
        accumulated = 4 * n if plan.accumulation > 1 else 0
        p = 2 if hw.kind == "gpu" else 4
        assert m.params == pytest.approx(4 * n / S + p * (root + min(3, cfg.n_layers) * block))
        assert m.grads == pytest.approx(4 * n / S + accumulated + p * (root + block))
        assert m.optimizer == pytest.approx(8 * n / S)


# --------------------------------------------------------------------------- devices


@pytest.mark.parametrize("gpus", ["8xA100", "8x a100", "A100"])
def test_a_bare_a100_is_planned_as_the_smaller_card(gpus):
    """A100s come with 40 and 80 GB; "A100" once planned as the 80 GB card, so a plan for it
    could ask twice the memory of a 40 GB one. It is the 40 GB card now, said in one note."""
    hw = parse_hardware(gpus)
    assert (hw.name, hw.memory, hw.peak) == ("A100-40GB", 40960 * 2**20, 312e12)
    per_node = hw.per_node
    note = (f"A100 taken as the A100-40GB, the smaller of the two, as what fits it fits the other; "
            f"--gpus {per_node}xA100-80GB plans for the A100-80GB")
    assert hw.note == note
    plan = make_plan("1b", gpus)
    assert plan.memory.total <= hw.usable
    assert [line for line in format_table(plan).splitlines() if "A100-80GB" in line] == [f"note             {note}"]
    assert plan.config.name == f"1b-{per_node}a100-40gb"
    # Named, either card plans without the note; --memory-gb says the memory itself.
    for name, mib in (("A100-80GB", 81920), ("A100 40GB", 40960)):
        named = parse_hardware(f"8x{name}")
        assert (named.memory, named.note) == (mib * 2**20, "")
    assert parse_hardware("8xA100", memory_gb=80).note == ""
    with pytest.raises(ConfigError) as e:  # where it does not fit, the error says which A100 it tried
        make_plan("7b", gpus)
    assert str(e.value).startswith(f"--size 7b does not fit on {per_node} x A100-40GB")
    assert str(e.value).endswith(f"use a larger one; {note}") and "\n" not in str(e.value)


# --------------------------------------------------------------------------- float8


def test_float8_saves_what_the_plain_blocks_save():
    """train.float8 (torchao's Float8Linear in the blocks) saves for backward the same tensors
    as nn.Linear, its float8 casts being redone in backward, so the estimate does not change
    with it (memory_for_config's docstring)."""
    pytest.importorskip("torchao")
    from raylm.parallel import apply_float8

    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))

    def saved(float8: bool) -> tuple[int, list]:
        torch.manual_seed(0)
        model = Transformer(cfg)
        model.init_weights()
        if float8:
            apply_float8(model)
            assert "Float8Linear" in {type(m).__name__ for m in model.layers[0].modules()}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, tuple] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
        return sum(b for b, _ in storages.values()), sorted(str(d) for _, d in storages.values())

    assert saved(True) == saved(False)
    common = ["model.preset=1b", "tokenizer.vocab_size=32000", "data.seq_len=2048", "train.num_workers=8",
              "train.use_gpu=true", "train.micro_batch_size=2", "train.global_batch_size=16"]
    assert (memory_for_config(load_config(overrides=[*common, "train.float8=true"]))
            == memory_for_config(load_config(overrides=common)))
