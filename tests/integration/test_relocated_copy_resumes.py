"""A run's storage copied to another directory (as `cp -a`, `shutil.copytree` or a move leave
it: the files with their dates) goes on there, as `raylm quickstart` rerun in the copy goes:
the pre-training run resumes from its checkpoint, its corpus inside the run, and the SFT run
started from it (`quickstart_sft`) resumes too, its parent checkpoint found under --from in
the copy and its records beside it. All were refused: the data key names the files by path
(and date: quickstart wrote its SFT records again at each run, so even a rerun in place was
refused), and the SFT run's record names its parent checkpoint by path. The workers check
the checkpoint again (raylm.train.check_resumable): the real stages, on the test session's
Ray cluster."""

from __future__ import annotations

import json
import shutil

import pytest

from raylm import checkpoint
from raylm.config import load_config
from raylm.pipeline import pretrain
from raylm.posttrain import quickstart_sft
from tests.unit.test_relocated_run_resume import write_corpus

pytestmark = pytest.mark.integration

TINY = ["data.seq_len=128", "data.dedup=none", "data.val_fraction=0.1", "data.min_chars=1", "tokenizer.vocab_size=300",
        "tokenizer.sample_bytes=100000", "model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=128",
        "train.micro_batch_size=4", "train.global_batch_size=4", "train.num_workers=1", "train.cpus_per_worker=1",
        "train.warmup_steps=0", "train.ckpt_every=1", "train.eval_every=1", "train.eval_batches=1",
        "train.async_checkpoint=false"]


def _config(root, steps: int):
    return load_config(overrides=[f"storage={root}/runs", "name=r", f"data.path={root}/runs/r/corpus", *TINY,
                                  f"train.max_steps={steps}"])


def test_a_copied_run_and_its_sft_run_resume_in_the_copy(ray_local, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_corpus(a / "runs" / "r" / "corpus")  # inside the run, as the built-in corpus is
    assert pretrain(_config(a, 1), samples=False)["steps"] == 1
    assert quickstart_sft(_config(a, 1), steps=1, log_chat=lambda _: None)["steps"] == 1
    shutil.copytree(a, b)

    assert pretrain(_config(b, 2), samples=False)["steps"] == 2  # refused: data_key=... (data.path=<a>/runs/r/corpus)
    run = b / "runs" / "r"
    first, second = (checkpoint.read_meta(str(run / f"ckpt-0000000{n}")) for n in (1, 2))
    assert second["consumed_blocks"] == 2 * first["consumed_blocks"]  # resumed, not started over
    assert second["config"]["data"]["path"] == str(b / "runs" / "r" / "corpus")

    # Refused: --from <b>/runs/r: run ... started from <a>/runs/r/ckpt-00000001
    summary = quickstart_sft(_config(b, 2), steps=2, log_chat=lambda _: None)
    assert summary["steps"] == 2 and summary["parent"] == str(run / "ckpt-00000001")
    record = json.loads((b / "runs" / "r-sft" / "record.json").read_text())
    assert record["parent"]["checkpoint"] == str(run / "ckpt-00000001")
