"""`raylm plan`'s batch: the global batch it prints is the one the config trains with, it stays
within a third of its target unless the MIN_STEPS cap or one sequence a device forces it, and
the table says so when it is off the target by more than a tenth."""

from __future__ import annotations

import pytest

from raylm.config import ConfigError
from raylm.plan import (MIN_STEPS, Hardware, _batch_tokens, _fit, format_table, make_plan, memory_per_device,
                        parse_count, resolve_size)

# raylm.plan's BATCH_TOLERANCE and BATCH_NOTE_FRACTION, as its docstrings state them.
BATCH_TOLERANCE = 1 / 3
BATCH_NOTE_FRACTION = 0.10


def _target(plan) -> float:
    return min(_batch_tokens(plan.params), plan.train_tokens / MIN_STEPS)


def test_the_min_steps_cap_no_longer_halves_the_batch():
    """tiny on 3 H100s: 14.5 sequences a device a step, at most 14 for 2,000 steps. The
    largest power-of-two micro-batch, 8, could take only 1 accumulation step under the cap:
    8 sequences, 55% of the target, without a word. Micro-batch 4 x 3 makes 12."""
    plan = make_plan("tiny", "3xH100")
    per_rank = plan.micro_batch * plan.accumulation
    assert (plan.micro_batch, plan.accumulation) == (4, 3)
    assert plan.global_batch == per_rank * plan.hardware.devices == plan.config.train.global_batch_size
    assert plan.steps >= MIN_STEPS
    step_tokens = plan.global_batch * plan.seq_len
    assert abs(step_tokens - _target(plan)) <= BATCH_TOLERANCE * _target(plan)


@pytest.mark.parametrize("size,gpus,nodes", [("tiny", "3xH100", 1), ("tiny", "6xA100", 1), ("124m", "3xH100", 1),
                                             ("350m", "6xA100", 1), ("1b", "8xH100", 3), ("tiny", "2xCPU", 1)])
def test_batch_is_within_a_third_of_its_target_where_whole_sequences_allow(size, gpus, nodes):
    """Unless the cap leaves room for no more than one sequence a device (or memory for no
    accumulation), the sequences a device takes a step round to the target by a third at most."""
    plan = make_plan(size, gpus, nodes)
    per_rank_target = _target(plan) / plan.seq_len / plan.hardware.devices
    per_rank = plan.micro_batch * plan.accumulation
    assert per_rank_target >= 2
    assert abs(per_rank - per_rank_target) <= BATCH_TOLERANCE * per_rank_target + 1e-9, (plan.micro_batch,
                                                                                        plan.accumulation)


def test_a_batch_off_its_target_is_noted():
    """128 devices of one sequence each for a budget of 22M tokens: 3x the target batch and
    681 steps; once printed as if it were the rule's batch."""
    plan = make_plan("tiny", "8xH100", 16)
    table = format_table(plan)
    step_tokens = plan.global_batch * plan.seq_len
    assert step_tokens > 2 * _target(plan) and plan.steps < MIN_STEPS
    assert f"the global batch, {step_tokens:,} tokens a step, is {step_tokens / _target(plan):.0%} of the target" \
        in table
    assert f"{plan.steps:,} steps, fewer than {MIN_STEPS:,}" in table
    short = make_plan("tiny", "3xH100")  # 83% of its target: noted
    assert "of the target" in format_table(short)


@pytest.mark.parametrize("size,gpus,nodes,tokens", [("125m", "1xH100", 1, "10B"), ("1b", "8xH100", 1, "50B"),
                                                    ("7b", "8xH100", 8, "134B")])
def test_a_batch_near_its_target_is_not_noted(size, gpus, nodes, tokens):
    plan = make_plan(size, gpus, nodes, tokens)
    step_tokens = plan.global_batch * plan.seq_len
    assert abs(step_tokens - _target(plan)) <= BATCH_NOTE_FRACTION * _target(plan)
    assert "of the target" not in format_table(plan) and plan.steps >= MIN_STEPS


def test_a_closer_batch_that_does_not_fit_keeps_the_larger_micro_batch():
    """The closer split needs accumulation, whose unsharded fp32 gradients (4 bytes a
    parameter) do not fit: the larger micro-batch without accumulation is kept rather than
    turning on activation checkpointing or refusing the plan."""
    _, cfg = resolve_size("1b")
    seq_len, per_rank, cap = 2048, 3.9, 3  # micro-batch 2 x 1 is 2 (49% short); 1 x 3 is 3
    two = memory_per_device(cfg, seq_len, 2, 8, "bf16", False, 1, True, 2048)
    one_by_three = memory_per_device(cfg, seq_len, 1, 8, "bf16", False, 3, True, 2048)
    assert one_by_three.total > two.total
    usable = (two.total + one_by_three.total) / 2
    hw = Hardware("H100", 8, 1, (usable + 1.5 * 2**30) / 0.9, 989e12, "gpu")
    mb, accumulation, checkpointing, mem = _fit(cfg, hw, seq_len, per_rank, cap, "bf16")
    assert (mb, accumulation, checkpointing) == (2, 1, False) and mem == two
    roomy = Hardware("H100", 8, 1, 80 * 2**30, 989e12, "gpu")
    assert _fit(cfg, roomy, seq_len, per_rank, cap, "bf16")[:3] == (1, 3, False)


@pytest.mark.parametrize("text", ["1e400", "2e308", "1e400T"])
def test_a_count_too_large_for_a_float_is_named(text):
    """float('1e400') is infinity, and int(infinity) was a bare OverflowError traceback."""
    with pytest.raises(ConfigError, match=rf"--tokens='{text}': too large"):
        parse_count(text)
    with pytest.raises(ConfigError, match="--train-tokens="):
        make_plan("tiny", "2xCPU", train_tokens=text)


def test_cli_plan_document_mask_counts_the_bias_and_sets_the_config(tmp_path, capsys):
    """`raylm plan --document-mask` plans with the mask's per-layer attention bias and writes
    data.document_mask=true into the config; without it, neither."""
    from raylm.cli import main
    from raylm.config import load_config

    plain, masked = tmp_path / "plain.yaml", tmp_path / "masked.yaml"
    assert main(["plan", "--size", "tiny", "--gpus", "2xCPU", "--tokens", "5M", "--out", str(plain)]) == 0
    assert main(["plan", "--size", "tiny", "--gpus", "2xCPU", "--tokens", "5M", "--document-mask",
                 "--out", str(masked)]) == 0
    capsys.readouterr()
    assert load_config(str(masked)).data.document_mask and not load_config(str(plain)).data.document_mask
    with_mask = make_plan("tiny", "2xCPU", tokens="5M", document_mask=True).memory.activations
    assert with_mask > make_plan("tiny", "2xCPU", tokens="5M").memory.activations
