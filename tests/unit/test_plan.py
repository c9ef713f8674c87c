"""`raylm plan`: the rules, the config it writes, its errors, and its memory estimate against
the peak memory of real training steps on this CPU."""

from __future__ import annotations

import ctypes
import gc

import pytest
import torch

from raylm.cli import main
from raylm.config import MODEL_PRESETS, ConfigError, TrainConfig, load_config
from raylm.model import build_model, count_params
from raylm.objectives import NextTokenObjective
from raylm.plan import GiB, format_table, make_plan, memory_per_device, parse_count, parse_hardware, write_recipe
from raylm.train import make_optimizer, train_step

# The four runs the recipes use: (size, devices, nodes, tokens available).
RECIPES = [("tiny", "2xCPU", 1, "5M"), ("125m", "1xH100", 1, "10B"), ("1b", "8xH100", 1, "50B"),
           ("7b", "8xH100", 8, "1T")]


# --------------------------------------------------------------------------- memory, measured


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.fixture
def peak_rss():
    """Measures the peak resident memory a callable adds, from the kernel's high-water mark
    (VmHWM, reset through /proc/self/clear_refs). glibc's malloc is set to serve every block
    over 64 KiB with its own mmap, returned at free, so resident memory follows live tensors
    rather than what malloc keeps cached from earlier tests."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        pytest.skip(f"peak RSS needs Linux's /proc/self/clear_refs and glibc: {e}")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixed: also stops its dynamic growth)

    def measure(fn) -> int:
        gc.collect()
        libc.malloc_trim(0)
        base = _proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return _proc_status("VmHWM") - base

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # no per-thread scratch buffers in the measure, and a steady step time
    yield measure
    torch.set_num_threads(n)
    libc.mallopt(-3, 128 * 1024)  # glibc's default size back (its dynamic growth stays off)


def _train_steps(cfg, micro_batch: int, seq_len: int, checkpointing: bool, steps: int = 2) -> None:
    model = build_model(cfg, "cpu", seed=0)
    if checkpointing:
        from raylm.parallel import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):  # from the second step on AdamW's moments exist too
        tokens = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len + 1), generator=g)
        train_step(model, opt, [{"tokens": tokens}], NextTokenObjective(), 1e-3, 1.0)


def _measured_in_a_fresh_process(checkpointing: bool) -> int:
    """The peak measured in a child process: in this one, hundreds of earlier tests leave
    allocator and library state that moves resident memory by more than the tolerance."""
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['x']; import pytest; from tests.unit import test_plan as t\n"
            "gen = t.peak_rss.__wrapped__(); measure = next(gen)\n"
            "cfg = t.MODEL_PRESETS['tiny'].with_vocab(2048)\n"
            f"measure(lambda: t._train_steps(cfg, 2, 8, {checkpointing}, steps=1))\n"
            f"print(measure(lambda: t._train_steps(cfg, 16, 128, {checkpointing})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_memory_estimate_matches_peak_rss_of_real_steps(checkpointing):
    """The tiny preset, fp32 on CPU as raylm trains it here, two steps of train_step.

    Tolerance 15%: the estimate counts tensors, and the measured RSS also holds what no
    tensor accounts for (AdamW's foreach temporaries, autograd bookkeeping, page rounding,
    oneDNN scratch): measured 158 MiB against 151 estimated, and 69 against 71 with
    checkpointing, when this was written. 15% still fails when a term
    is missing or counted twice: the logits alone are a third of this estimate, the
    difference between checkpointing and not more than half."""
    cfg = MODEL_PRESETS["tiny"].with_vocab(2048)
    micro_batch, seq_len = 16, 128
    measured = _measured_in_a_fresh_process(checkpointing)  # after a warm-up step: lazy library set-up
    est = memory_per_device(cfg, seq_len, micro_batch, 1, "fp32", checkpointing, sharded=False)
    assert measured == pytest.approx(est.total, rel=0.15), (measured / 2**20, est)


# --------------------------------------------------------------------------- the plans


@pytest.mark.parametrize("size,gpus,nodes,tokens", RECIPES)
def test_plan_config_loads_and_agrees_with_the_table(tmp_path, size, gpus, nodes, tokens):
    plan = make_plan(size, gpus, nodes, tokens)
    out = tmp_path / "recipe.yaml"
    write_recipe(plan, str(out))
    cfg = load_config(str(out))
    hw = plan.hardware
    assert cfg.train.num_workers == hw.devices == plan.config.train.num_workers
    assert cfg.train.use_gpu == (hw.kind == "gpu")
    assert cfg.train.global_batch_size == plan.global_batch == plan.micro_batch * plan.accumulation * hw.devices
    assert (cfg.train.micro_batch_size, cfg.train.max_steps, cfg.train.lr) == (plan.micro_batch, plan.steps, plan.lr)
    assert cfg.train.activation_checkpointing == plan.checkpointing
    assert cfg.data.seq_len == plan.seq_len <= cfg.model.max_seq_len
    assert (cfg.model.dim, cfg.model.n_layers) == (plan.model.dim, plan.model.n_layers)
    assert plan.memory.total <= hw.usable < hw.memory
    assert plan.train_tokens == plan.steps * plan.global_batch * plan.seq_len
    # Time follows from the FLOPs: 6N+12LdT per token over devices x peak x MFU.
    from raylm.metrics import flops_per_token

    flops = flops_per_token(plan.model, plan.seq_len) * plan.train_tokens * (4 / 3 if plan.checkpointing else 1)
    assert plan.hours * 3600 == pytest.approx(flops / (hw.devices * hw.peak * plan.mfu))
    assert plan.data_cpus >= 1


def test_token_budget_rules():
    n = count_params(MODEL_PRESETS["1b"].with_vocab(32000))
    plenty = make_plan("1b", "8xH100", tokens="1T")
    assert plenty.train_tokens == pytest.approx(20 * n, rel=0.01)  # compute-optimal, a share of the data
    assert plenty.epochs == pytest.approx(20 * n / 1e12, rel=0.01)
    scarce = make_plan("1b", "8xH100", tokens="2B")
    assert scarce.train_tokens == pytest.approx(4 * 2e9, rel=0.01) and scarce.epochs == pytest.approx(4, rel=0.01)
    some = make_plan("1b", "8xH100", tokens="10B")
    assert some.train_tokens == pytest.approx(20 * n, rel=0.01) and 2 < some.epochs < 2.3
    asked = make_plan("1b", "8xH100", tokens="50B", train_tokens="5B")
    assert asked.train_tokens == pytest.approx(5e9, rel=0.01)


def test_layout_turns_on_checkpointing_only_when_needed():
    roomy = make_plan("3b", "8xH100", tokens="50B")
    tight = make_plan("3b", "8xL4", tokens="50B")
    assert not roomy.checkpointing and tight.checkpointing
    hw, per_rank = tight.hardware, tight.micro_batch * tight.accumulation
    for mb in (1, 2, 4, 8, 16, 32):  # no micro-batch fits without it
        if mb <= per_rank:
            without = memory_per_device(tight.model, tight.seq_len, mb, hw.devices, "bf16", False,
                                        max(1, round(per_rank / mb)), loss_chunk=2048)
            assert without.total > hw.usable
    assert tight.hours / tight.train_tokens > roomy.hours / roomy.train_tokens  # recompute and a slower GPU


def test_memory_terms_by_hand():
    cfg = MODEL_PRESETS["7b"].with_vocab(32000)
    n = count_params(cfg)
    one, eight = (memory_per_device(cfg, 4096, 1, s, "bf16") for s in (1, 8))
    assert one.optimizer == 8 * n and eight.optimizer == n  # AdamW moments, sharded
    assert one.params - eight.params == pytest.approx(4 * n * (1 - 1 / 8))  # fp32 master weights, sharded
    assert one.activations == eight.activations  # FSDP does not split activations
    acc = memory_per_device(cfg, 4096, 1, 8, "bf16", accumulation=2)
    assert acc.grads - eight.grads > 4 * n * 0.95  # unsharded fp32 gradients between micro-batches
    ckpt = memory_per_device(cfg, 4096, 1, 8, "bf16", checkpointing=True)
    assert ckpt.activations < eight.activations / 4


def test_hsdp_plan_shards_over_one_replica(tmp_path):
    """train.replicate_degree=8 on 8 nodes: the state is sharded 8 ways (a node), not 64, and
    the table, the memory and the written config all say so."""
    fsdp = make_plan("7b", "8xH100", 8, "1T")
    hsdp = make_plan("7b", "8xH100", 8, "1T", replicate_degree=8)
    n = count_params(hsdp.model)
    assert fsdp.memory.optimizer == pytest.approx(8 * n / 64) and hsdp.memory.optimizer == pytest.approx(8 * n / 8)
    by_hand = memory_per_device(hsdp.model, hsdp.seq_len, hsdp.micro_batch, 8, "bf16", hsdp.checkpointing,
                                hsdp.accumulation, loss_chunk=2048)
    assert hsdp.memory == by_hand and hsdp.memory.total <= hsdp.hardware.usable
    assert "HSDP (train.replicate_degree=8): 8 replicas" in format_table(hsdp)
    assert "over the 8 devices of each" in format_table(hsdp)
    assert "FSDP2, parameters sharded over all 64 devices" in format_table(fsdp)
    # The FSDP plan suggests the key, with the HSDP memory it would take.
    note = next(x for x in fsdp.notes if x.startswith("HSDP"))
    assert "train.replicate_degree=8" in note and f"fits ({hsdp.memory.total / GiB:.1f} GiB/device)" in note
    assert not any(x.startswith("HSDP") for x in hsdp.notes)
    out = tmp_path / "hsdp.yaml"
    write_recipe(hsdp, str(out))
    assert load_config(str(out)).train.replicate_degree == 8
    write_recipe(fsdp, str(out))
    assert load_config(str(out)).train.replicate_degree == 1


def test_parsing():
    assert parse_count("50B") == 50_000_000_000 and parse_count("1.5m") == 1_500_000 and parse_count("2e9") == 2e9
    hw = parse_hardware("8xH100", 4)
    assert (hw.devices, hw.memory / GiB, hw.kind) == (32, 80, "gpu")
    assert parse_hardware("H200").devices == 1 and parse_hardware("2xCPU", memory_gb=2).memory == 2 * GiB


@pytest.mark.parametrize("gpus,name,gib,tflops", [
    ("1xGH200", "GH200", 96, 989), ("1xH200", "H200", 141, 989), ("8xH100", "H100", 80, 989),
    ("8xH100 PCIe", "H100 PCIe", 80, 756), ("8xh100-pcie", "H100 PCIe", 80, 756), ("1xA100", "A100", 80, 312),
    ("1xA100-40GB", "A100-40GB", 40, 312), ("1xA100 40GB", "A100-40GB", 40, 312), ("1xL4", "L4", 24, 121),
    ("1xL40S", "L40S", 48, 362), ("2x rtx  4090", "RTX 4090", 24, 165),
])
def test_devices_are_matched_by_their_whole_name(gpus, name, gib, tflops):
    """Not by substring: "GH200" once got the H200's memory, "H100 PCIe" the SXM's peak."""
    hw = parse_hardware(gpus)
    assert (hw.name, hw.memory / GiB, hw.peak / 1e12) == (name, gib, tflops)


@pytest.mark.parametrize("gpus", ["1xL40", "1xA100 40G", "8xH100X", "1xNVIDIA H100"])
def test_a_near_miss_device_is_refused_naming_the_known_ones(gpus):
    """These once planned silently as an L4, an 80 GB A100 and an H100."""
    with pytest.raises(ConfigError, match=r"unknown device .*; known: H200, GH200, H100, .*A100-40GB.*, CPU") as e:
        parse_hardware(gpus)
    assert "\n" not in str(e.value)


def test_planned_run_name_has_no_spaces():
    assert make_plan("1b", "8xH100 PCIe").config.name == "1b-8h100-pcie"


@pytest.mark.parametrize("args,message", [
    (dict(size="7b", gpus="1xL4"), "--size 7b does not fit on 1 x L4"),
    (dict(size="1b", gpus="8xH100", tokens="10K"), "--tokens=10,000 is fewer tokens than one step"),
    (dict(size="1b", gpus="8xX100"), "unknown device 'X100'"),
    (dict(size="70b", gpus="8xH100"), "--size='70b': unknown"),
    (dict(size="1b", gpus="8xH100", tokens="lots"), "--tokens='lots'"),
    (dict(size="7b", gpus="8xH100", nodes=8, replicate_degree=3),
     "train.replicate_degree=3 must be a positive divisor of the 64 devices"),
    (dict(size="7b", gpus="8xH100", nodes=8, replicate_degree=0), "train.replicate_degree=0 must be a positive"),
    # These once divided by zero, or went on silently as the datasheet's memory and as web text.
    (dict(size="tiny", gpus="8xH100", seq_len=0), "--seq-len=0: expected an integer >= 1"),
    (dict(size="tiny", gpus="8xH100", memory_gb=0), "--memory-gb=0: expected a positive number of GiB"),
    (dict(size="tiny", gpus="2xCPU", memory_gb=-4), "--memory-gb=-4: expected a positive number of GiB"),
    (dict(size="tiny", gpus="8xH100", domain="poetry"),
     "--domain='poetry': unknown; choose from web, books, wiki, code, math, chat"),
])
def test_bad_inputs_are_named(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        make_plan(**args)
    assert "\n" not in str(e.value)


def test_cli_plan_prints_table_and_writes_config(tmp_path, capsys):
    out = tmp_path / "tiny.yaml"
    assert main(["plan", "--size", "tiny", "--gpus", "2xCPU", "--tokens", "5M", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("token budget", "global batch", "learning rate", "layout", "micro-batch", "memory/device",
                "headroom", "time", "data workers"):
        assert row in table
    assert load_config(str(out)).train.num_workers == 2
    assert main(["plan", "--size", "7b", "--gpus", "1xL4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raylm: error: --size 7b does not fit") and "\n" not in err
    written = out.read_bytes()  # an existing --out is kept, not written over
    assert main(["plan", "--size", "tiny", "--gpus", "4xCPU", "--tokens", "5M", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"raylm: error: --out {out}: already exists; write the config to a new file"
    assert out.read_bytes() == written
