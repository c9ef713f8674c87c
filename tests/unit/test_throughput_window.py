"""tokens_per_s and MFU cover training time only: the seconds a logging window spends on
validation, task evals and checkpoints are taken out of its denominator (and logged as the
row's window_paused_s), so the window holding an evaluation reports the speed the others do.

The loop's clock is a fake that only the injected work moves (1 s a step, 50 s a validation,
30 s a task eval, 20 s a checkpoint), so the figures are exact and nothing depends on this
machine's speed."""

import json

import numpy as np
import pytest

import raylm.eval.in_training as in_training
import raylm.train as train
from raylm.config import load_config

OVERRIDES = ["model.vocab_size=64", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=16",
             "data.seq_len=16", "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_steps=2",
             "train.max_steps=12", "train.log_every=3", "train.eval_every=4", "train.ckpt_every=6",
             "train.eval_batches=1", "train.async_checkpoint=false", "eval.every=6"]
TOKENS_PER_STEP = 8 * 16  # global batch x seq_len, no padding
STEP_S, VAL_S, TASK_S, CKPT_S = 1.0, 50.0, 30.0, 20.0


class FakeTime:
    """What raylm.train reads of the `time` module, on a clock only the test advances."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now


@pytest.fixture
def slow_evals(monkeypatch, one_thread):
    clock = FakeTime()
    monkeypatch.setattr(train, "time", clock)

    def advancing(fn, seconds):
        def wrapped(*args, **kwargs):
            clock.now += seconds
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(train, "train_step", advancing(train.train_step, STEP_S))
    monkeypatch.setattr(train, "evaluate", advancing(train.evaluate, VAL_S))
    monkeypatch.setattr(train.CheckpointSaver, "save", advancing(train.CheckpointSaver.save, CKPT_S))
    # eval.every's suite, without task files: a scorer that takes TASK_S
    monkeypatch.setattr(in_training, "make_training_eval", lambda cfg, log=print: advancing(
        lambda model, step: {"kind": "eval", "step": step, "eval_fake_acc": 0.5}, TASK_S))
    return clock


def blocks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.arange(17)[None, :] * rng.integers(1, 4, (n, 1)) % 64).astype(np.int32)


def test_a_window_with_evaluations_and_checkpoints_reports_the_training_speed(tmp_path, slow_evals):
    # (the task file is never read: make_training_eval is the test's)
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=w", *OVERRIDES, f"eval.mc_tasks=[{tmp_path}/mc.jsonl]"])
    last = train.train_local(cfg, blocks(40, 0), blocks(8, 1), log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if r["kind"] == "train"}
    assert sorted(logged) == [3, 6, 9, 12]
    # Each window's pauses: (3, 6] the validation at 4; (6, 9] the checkpoint and task eval at
    # 6 and the validation at 8. Step 12 logs before its own evaluations and save.
    paused = {3: 0.0, 6: VAL_S, 9: CKPT_S + TASK_S + VAL_S, 12: 0.0}
    # The denominator is the window less its pauses: every window, evaluations or not,
    # reports the training speed.
    assert {step: row["tokens_per_s"] for step, row in logged.items()} == \
        {step: pytest.approx(TOKENS_PER_STEP / STEP_S) for step in paused}
    for step, row in logged.items():
        assert row["window_paused_s"] == pytest.approx(paused[step]), step
        assert row["window_s"] == pytest.approx(3 * STEP_S + paused[step]), step  # wall time, pauses in
        assert row["tokens_per_s"] * (row["window_s"] - row["window_paused_s"]) == pytest.approx(3 * TOKENS_PER_STEP)
    assert last["tokens_per_s"] == pytest.approx(TOKENS_PER_STEP / STEP_S)
    assert any(r["kind"] == "val" and r["step"] == 8 for r in rows)  # the evaluations did run
    assert any(r["kind"] == "eval" and r["step"] == 6 for r in rows)
