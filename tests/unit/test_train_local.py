"""The training loop without Ray (`train_local`): checkpoints and a bit-exact resume."""

import json
from pathlib import Path

import numpy as np
import pytest

from raylm.config import load_config
from raylm.train import train_local

OVERRIDES = ["model.vocab_size=64", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=16",
             "data.seq_len=16", "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_steps=2",
             "train.log_every=1", "train.eval_every=100", "train.ckpt_every=3", "train.eval_batches=1"]


def blocks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.arange(17)[None, :] * rng.integers(1, 4, (n, 1)) % 64).astype(np.int32)


def losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["consumed_blocks"]) for r in rows if r["kind"] == "train"]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    train, val = blocks(40, 0), blocks(8, 1)
    # Synchronous saves: step 3's checkpoint is committed before step 5 fails, whatever the
    # upload's speed. An async one is committed at the first step after its upload ends,
    # which on a busy machine came after step 5 (and left nothing to resume from).
    cfg = {name: load_config(overrides=[f"storage={tmp_path}", f"name={name}", "train.max_steps=8", *OVERRIDES,
                                        "train.async_checkpoint=false"])
           for name in ("whole", "part")}
    train_local(cfg["whole"], train, val, log=lambda *_: None)
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=5,rank=0,kind=raise")
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        train_local(cfg["part"], train, val, log=lambda *_: None)
    monkeypatch.delenv("RAYLM_INJECT_FAILURE")
    train_local(cfg["part"], train, val, resume="must", log=lambda *_: None)  # from ckpt-3
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")  # ==, not isclose
    assert [s for s, _, _ in losses(tmp_path / "part")] == list(range(1, 9))


def checkpoint_tensors(uri: str) -> dict:
    """Every tensor of a DCP checkpoint (model and optimizer), flattened by key."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(uri) / "flat.pt"
    dcp_to_torch_save(uri, out)
    state = torch.load(out, weights_only=True)
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif hasattr(x, "dtype"):
            flat[prefix] = x

    walk("", state)
    return flat


def test_async_and_sync_checkpoints_hold_the_same_state(tmp_path):
    """The async path (host copy now, write and upload in the background, marker last) saves
    exactly what the synchronous one saves, and training is unaffected by it."""
    import torch

    from raylm import checkpoint

    train, val = blocks(40, 0), blocks(8, 1)
    runs = {}
    for mode in ("true", "false"):
        cfg = load_config(overrides=[f"storage={tmp_path}", f"name=async-{mode}", "train.max_steps=6",
                                     f"train.async_checkpoint={mode}", *OVERRIDES])
        train_local(cfg, train, val, log=lambda *_: None)
        done = [s for s, _, ok in checkpoint.list_checkpoints(cfg.run_dir) if ok]
        assert done == [3, 6], (mode, done)
        runs[mode] = (losses(tmp_path / f"async-{mode}"),
                      checkpoint_tensors(str(tmp_path / f"async-{mode}" / "ckpt-00000003")))
    assert runs["true"][0] == runs["false"][0]
    a, b = runs["true"][1], runs["false"][1]
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_spike_rolls_back_to_the_last_checkpoint_and_skips_the_data(tmp_path, monkeypatch):
    train, val = blocks(80, 0), blocks(8, 1)
    common = [f"storage={tmp_path}", "train.max_steps=8", "train.spike_window=4", "train.ckpt_every=4",
              *[o for o in OVERRIDES if not o.startswith("train.ckpt_every")]]
    clean = load_config(overrides=["name=clean", *common])
    train_local(clean, train, val, log=lambda *_: None)
    cfg = load_config(overrides=["name=spiky", "train.on_spike=rollback", *common])
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=6,rank=0,kind=spike")
    said = []
    train_local(cfg, train, val, log=said.append)
    rows = [json.loads(x) for x in (tmp_path / "spiky" / "metrics.jsonl").read_text().splitlines()]
    back = [r for r in rows if r["kind"] == "rollback"]
    assert back and back[0]["step"] == 4 and back[0]["spike_step"] == 6, rows
    assert any("rolled back to" in m and "ckpt-00000004" in m for m in said), said
    got, want = losses(tmp_path / "spiky"), losses(tmp_path / "clean")
    assert got[:4] == want[:4]  # the same run up to the checkpoint
    assert [s for s, _, _ in got] == list(range(1, 9))  # steps 5.. redone after the rollback
    # Steps 5 and 6 (the spike) are not replayed: the stream goes on after them.
    assert got[4][2] == want[4][2] + 2 * 8
    assert got[-1][2] == want[-1][2] + 2 * 8
    assert got[-1][1] < 10  # the spike did not survive into the weights


def test_rollback_without_a_checkpoint_stops_naming_the_step(tmp_path, monkeypatch):
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=early", "train.max_steps=8", "train.spike_window=4",
                                 "train.on_spike=rollback", *OVERRIDES])
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=3,rank=0,kind=spike")
    with pytest.raises(FloatingPointError, match="step 3: loss spike .* no complete checkpoint"):
        train_local(cfg, blocks(40, 0), blocks(8, 1), log=lambda *_: None)


def test_time_budget_ends_the_run_and_completes_the_decay(tmp_path, monkeypatch):
    """Each step spends 0.1 s of the training clock, whatever this machine's load: the run's
    steps, and so its learning rates, do not depend on how fast the steps really were."""
    from raylm import checkpoint
    from raylm.train import TrainClock

    def tick(self):
        self.spent += 0.1
        return self.spent

    monkeypatch.setattr(TrainClock, "tick", tick)
    train, val = blocks(40, 0), blocks(8, 1)
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=timed", "train.max_steps=1000000",
                                 "train.time_budget_s=1.5", "train.min_lr_ratio=0.1", *OVERRIDES])
    last = train_local(cfg, train, val, log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    step = train_rows[-1]["step"]
    assert step == 15  # 15 x 0.1 s of the 1.5 s budget
    assert last["step"] == step and "val_loss" in last  # the final evaluation ran
    lrs = [r["lr"] for r in train_rows]
    floor = cfg.train.lr * cfg.train.min_lr_ratio
    assert lrs[-1] < floor + 0.2 * (cfg.train.lr - floor)  # decayed most of the way by the time it ended
    assert all(b <= a for a, b in zip(lrs[2:], lrs[3:]))  # and only downward after warmup
    final = checkpoint.latest_complete(str(tmp_path / "timed"))
    meta = checkpoint.read_meta(final)
    assert meta["step"] == step and meta["train_seconds"] >= 1.5
    # A resumed run has no budget left: it stops at once, where it was.
    again = train_local(cfg, train, val, resume="must", log=lambda *_: None)
    assert checkpoint.read_meta(checkpoint.latest_complete(str(tmp_path / "timed")))["step"] == step
    assert again == {}


def test_restart_before_the_first_checkpoint_starts_a_clean_metrics_log(tmp_path, monkeypatch):
    train, val = blocks(40, 0), blocks(8, 1)
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=early", "train.max_steps=5", *OVERRIDES])
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=2,rank=0,kind=raise")
    with pytest.raises(RuntimeError, match="injected failure at step 2"):
        train_local(cfg, train, val, log=lambda *_: None)
    monkeypatch.delenv("RAYLM_INJECT_FAILURE")
    assert [s for s, _, _ in losses(tmp_path / "early")] == [1, 2]
    train_local(cfg, train, val, log=lambda *_: None)  # no checkpoint yet: from step 0
    assert [s for s, _, _ in losses(tmp_path / "early")] == [1, 2, 3, 4, 5]


def test_rollback_as_the_time_budget_runs_out_still_ends_with_a_final_step(tmp_path, monkeypatch):
    """The budget is spent at the step that spikes: the rollback must not end the run on
    discarded weights; one more step follows, evaluated and checkpointed."""
    from raylm import checkpoint
    from raylm.train import TrainClock

    ticks = []

    def tick(self):  # the clock says the budget is spent at the 6th step, whatever the machine
        ticks.append(1)
        self.spent = self.budget if len(ticks) >= 6 else 0.0
        return self.spent

    monkeypatch.setattr(TrainClock, "tick", tick)
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=6,rank=0,kind=spike")
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=budget", "train.max_steps=100", "train.time_budget_s=60",
                                 "train.spike_window=4", "train.on_spike=rollback", "train.ckpt_every=4",
                                 *[o for o in OVERRIDES if not o.startswith("train.ckpt_every")]])
    last = train_local(cfg, blocks(80, 0), blocks(8, 1), log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "rollback"] == [4]
    assert last["step"] == 5 and "val_loss" in last  # one step after the rollback, then the end
    assert checkpoint.read_meta(checkpoint.latest_complete(str(tmp_path / "budget")))["step"] == 5


def test_a_step_that_saves_reports_once_with_its_checkpoint(tmp_path, monkeypatch):
    """What the loop sends to Ray (Hooks.report, Hooks.publish_checkpoint): a step that saves
    sends its row, evaluation included, with the checkpoint and never in a report of its own
    just before (Ray Train takes one report per controller poll: the second held the step)."""
    import raylm.train as T

    sent, hooks = [], T.Hooks

    def recording(report, publish_checkpoint, **kw):
        def rep(metrics):
            sent.append(("report", metrics["step"], "val_loss" in metrics))

        def pub(local, name, metrics, written, on_uploaded):
            sent.append(("checkpoint", metrics["step"], "val_loss" in metrics))
            publish_checkpoint(local, name, metrics, written, on_uploaded)

        return hooks(report=rep, publish_checkpoint=pub, **kw)

    monkeypatch.setattr(T, "Hooks", recording)
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=reports", "train.max_steps=6", *OVERRIDES,
                                 "train.eval_every=2", "train.ckpt_every=4"])
    train_local(cfg, blocks(40, 0), blocks(8, 1), log=lambda *_: None)
    assert sent == [("report", 1, False), ("report", 2, True), ("report", 3, False), ("checkpoint", 4, True),
                    ("report", 5, False), ("checkpoint", 6, True)]


def _objective_of(tmp_path, monkeypatch, extra, manifest=None, train=None):
    """The objective train_local hands to fit, for a config with `extra` overrides."""
    import raylm.train as T

    got = []
    monkeypatch.setattr(T, "fit", lambda cfg, model, opt, objective, *a, **k: got.append(objective) or {})
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=objective", *OVERRIDES, *extra])
    train = blocks(16, 0) if train is None else train
    T.train_local(cfg, train, blocks(8, 1) if not isinstance(train, dict) else train, log=lambda *_: None,
                  manifest=manifest)
    return got[0]


def test_document_mask_takes_the_manifests_eos_id(tmp_path, monkeypatch):
    objective = _objective_of(tmp_path, monkeypatch, ["data.document_mask=true"], manifest={"eos_id": 1})
    assert objective.doc_sep == 1
    assert _objective_of(tmp_path, monkeypatch, [], manifest={"eos_id": 1}).doc_sep is None
    assert _objective_of(tmp_path, monkeypatch, []).doc_sep is None  # plain pre-training needs no manifest


@pytest.mark.parametrize("extra,setting", [(["data.document_mask=true"], "data.document_mask"),
                                           (["stage=sft"], "stage=sft")])
def test_settings_that_need_a_manifest_are_not_silently_dropped(tmp_path, monkeypatch, extra, setting):
    """Without the data's eos_id, document masks (and SFT's conversation masks) cannot be
    built: train_local used to train plain next-token on every token instead."""
    from raylm.errors import ConfigError

    with pytest.raises(ConfigError, match=setting):
        _objective_of(tmp_path, monkeypatch, extra)


def test_sft_trains_with_its_loss_mask(tmp_path, monkeypatch):
    from raylm.objectives import SFTObjective

    rows = blocks(16, 0)
    train = {"tokens": rows, "loss_mask": rows % 2 == 0}
    objective = _objective_of(tmp_path, monkeypatch, ["stage=sft"], train=train,
                              manifest={"eos_id": 1, "pad_id": 0, "columns": ["tokens", "loss_mask"]})
    assert isinstance(objective, SFTObjective) and objective.doc_sep == 1 and objective.pad_id == 0


def test_bf16_trains_in_one_process_without_a_process_group(tmp_path):
    """bf16, the default on CUDA, is FSDP2's mixed precision even in one process: train_local
    failed looking for a torchrun environment (RANK) unless a caller had made a group. The
    group it makes is its own."""
    import torch.distributed as dist

    before = dist.is_initialized()  # none, unless another test left one
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=bf16", "model.dim=32", "model.n_layers=1",
                                 "model.n_heads=2", "model.max_seq_len=16", "data.seq_len=16", "model.vocab_size=64",
                                 "train.micro_batch_size=2", "train.global_batch_size=2", "train.max_steps=2",
                                 "train.precision=bf16", "train.warmup_steps=1", "train.eval_batches=1",
                                 "train.eval_every=2"])
    rows = np.random.default_rng(0).integers(0, 64, size=(8, 17))
    last = train_local(cfg, rows, rows[:2], resume="never", log=lambda *_: None)
    assert last["step"] == 2 and np.isfinite(last["val_loss"])
    assert dist.is_initialized() == before


def test_a_resume_already_past_max_steps_says_there_is_nothing_to_train(tmp_path):
    """`raylm quickstart train.max_steps=100` after a 600-step quickstart under the same name
    resumed the 600-step checkpoint and said only that it was done."""
    train, val = blocks(40, 0), blocks(8, 1)
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=past", "train.max_steps=3", *OVERRIDES])
    train_local(cfg, train, val, log=lambda *_: None)
    lines = []
    shorter = load_config(overrides=[f"storage={tmp_path}", "name=past", "train.max_steps=2", *OVERRIDES])
    train_local(shorter, train, val, log=lines.append)
    assert any("at or past train.max_steps=2: nothing to train" in line for line in lines), lines
