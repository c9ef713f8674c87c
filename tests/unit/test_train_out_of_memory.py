"""A training step that runs out of device memory ends the run at once, in one line naming
what to lower: it was retried like a crash, and every restart of the same config (the model
and data loaded again, --max-failures times) failed the same way before the run ended with a
traceback."""

import numpy as np
import pytest
import torch

import raylm.train as train
from raylm.config import load_config
from raylm.errors import DeviceOutOfMemory, UserError
from raylm.train_controller import user_error

OVERRIDES = ["model.vocab_size=64", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=16",
             "data.seq_len=16", "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_steps=1",
             "train.max_steps=4", "train.log_every=1", "train.eval_every=4", "train.ckpt_every=4",
             "train.eval_batches=1", "train.async_checkpoint=false"]


def blocks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.arange(17)[None, :] * rng.integers(1, 4, (n, 1)) % 64).astype(np.int32)


def test_a_step_out_of_device_memory_ends_the_run_in_one_line(tmp_path, monkeypatch, one_thread):
    real, calls = train.train_step, []

    def step_that_runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # what CUDA's allocator raises
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step_that_runs_out)
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=oom", *OVERRIDES])
    with pytest.raises(DeviceOutOfMemory) as e:
        train.train_local(cfg, blocks(40, 0), blocks(8, 1), log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("step 2: out of memory on "), msg
    assert "train.micro_batch_size (now 4" in msg and "train.activation_checkpointing=true" in msg, msg
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)  # the allocator's own words stay with it
    # A UserError: Ray Train's failure policy ends the run at once rather than restarting it.
    assert isinstance(e.value, UserError) and user_error(e.value) is e.value
