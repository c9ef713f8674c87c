"""train.use_gpu=true on a machine without a GPU, where raylm starts the cluster: Ray Train
waited for GPU workers that never came (a start-up timeout retried each minute, for good)
after the tokenizer and data stages. Each training command refuses it first, in one line,
writing nothing. A joined cluster (RAY_ADDRESS) is not checked: it may scale GPU machines in."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from raylm import pipeline
from raylm.config import load_config
from raylm.errors import ConfigError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")

GPU = "train.use_gpu=true"


@pytest.fixture
def here(monkeypatch):
    """As if this process started the cluster it is connected to, if any (other test modules
    may have left one running in this process)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(pipeline, "started_env", lambda: {})


def test_pretrain_refuses_use_gpu_without_a_gpu_in_one_line_writing_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "raylm.cli", "pretrain", f"storage={tmp_path}", "name=run", GPU],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("raylm: error: train.use_gpu=true but this machine has no GPU (torch sees none): "
                                  "set train.use_gpu=false, or join a GPU cluster with RAY_ADDRESS")
    assert not (tmp_path / "run").exists()


def test_posttrain_refuses_use_gpu_without_a_gpu(tmp_path, tiny_run, here):
    from raylm.posttrain import posttrain

    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=run", "stage=sft", f"init_from={tiny_run}",
                                 f"data.path={tmp_path / 'chat.jsonl'}", GPU])
    with pytest.raises(ConfigError, match="train.use_gpu=true but this machine has no GPU"):
        posttrain(cfg)
    assert not (tmp_path / "run").exists()


def test_a_joined_cluster_is_not_checked(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    pipeline.check_gpus_here(load_config(overrides=[GPU]))  # the cluster may add GPU machines


def test_cpu_training_is_not_checked(here):
    pipeline.check_gpus_here(load_config(overrides=["train.use_gpu=false"]))
