"""The spine end to end on a real local Ray cluster: built-in corpus -> tokenizer -> prepared
blocks -> 2 FSDP2 workers over gloo -> checkpoints -> resume -> samples."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.config import load_config
from raylm.pipeline import pretrain

pytestmark = pytest.mark.integration

# Small enough for 2 CPU cores, big enough that the loss has something to learn.
SMALL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
    "data.seq_len=64", "tokenizer.vocab_size=512", "tokenizer.sample_bytes=400000",
    "train.micro_batch_size=8", "train.global_batch_size=16", "train.warmup_steps=5", "train.lr=3e-3",
    "train.log_every=5", "train.eval_every=15", "train.ckpt_every=15", "train.eval_batches=2",
    "sample.max_new_tokens=16", "train.timeout_s=600",
]


def rows(run_dir: str, kind: str) -> list[dict]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def quickstart_run(ray_local, tmp_path_factory):
    """`raylm quickstart --no-sft` as a newcomer runs it, at test size, in a directory of its
    own: a relative storage path (the default `./runs`) that workers do not share, and a
    local Ray cluster of its own beside this session's. Returns (cfg, summary, output)."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", "quickstart", "--no-sft", "storage=runs", "name=qs",
                           "train.max_steps=30", *SMALL], capture_output=True, text=True, timeout=900, cwd=home,
                          env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    cfg = load_config(overrides=[f"storage={home / 'runs'}", "name=qs", "train.max_steps=30", *SMALL])
    return cfg, json.loads(Path(cfg.run_dir, "summary.json").read_text()), output


def test_quickstart_trains_checkpoints_and_samples(quickstart_run):
    cfg, summary, _ = quickstart_run
    run = Path(cfg.run_dir)
    train = rows(cfg.run_dir, "train")
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, "loss did not fall"
    assert summary["val_loss"] < train[0]["loss"]
    assert summary["val_ppl"] > 1
    for name in ("record.json", "samples.txt", "loss.png", "summary.json", "tokenizer/tokenizer.model",
                 "data/manifest.json"):
        assert (run / name).is_file(), name
    assert (run / "ckpt-00000030" / "COMMITTED").is_file()
    assert (run / "ckpt-00000015" / "COMMITTED").is_file()
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((run / "record.json").read_text())
    assert record["tokenizer"]["sha256"] and record["data"]["sources"]
    assert record["config"]["train"]["max_steps"] == 30 and record["git_commit"] is not None
    assert len(summary["samples"]) == len(cfg.sample.prompts)


def test_quickstart_output_reads_cleanly(quickstart_run):
    """What a newcomer sees: raylm's progress lines and a closing summary, never Ray's
    internals (C++ log lines at level E or W, warnings, tracebacks) that they cannot act on."""
    _, _, output = quickstart_run
    noise = [line for line in output.splitlines()
             if re.search(r"\[[\d\- :,]+ [EW] \d+ \d+\]", line)  # Ray's C++ log format
             or re.search(r"\d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|ERROR) \S+\.py:\d+ --", line)  # Ray's Python logs
             or re.search(r"Warning\b|WARNING|Traceback|Progress bars|core_worker", line)
             # any line of Ray's own actors or tasks (the training worker's lines are raylm's progress)
             or re.search(r"\((?!RayTrainWorker\b)(\w+ )?pid=\d+\)|\(raylet\)", line)]
    assert not noise, "\n".join(noise[:20])
    assert "quickstart done" in output and "pre-trained  runs/qs" in output and "raylm report runs/qs" in output


def test_resume_continues_from_latest_checkpoint(quickstart_run, capfd):
    cfg, _, _ = quickstart_run
    before = rows(cfg.run_dir, "train")
    more = load_config(overrides=[f"storage={cfg.storage}", "name=qs", "train.max_steps=40", *SMALL])
    pretrain(more, resume="must", samples=False)
    out = capfd.readouterr().out
    assert "resumed from" in out and "ckpt-00000030" in out
    after = rows(cfg.run_dir, "train")
    assert [r["step"] for r in after] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert after[:6] == before, "history before the resume point must be kept as it was"
    assert after[-1]["consumed_blocks"] == 40 * 16  # the data position carried over
    assert Path(cfg.run_dir, "ckpt-00000040", "COMMITTED").is_file()
    # retention keeps the newest train.keep_checkpoints=2 complete checkpoints
    assert sorted(p.name for p in Path(cfg.run_dir).glob("ckpt-*")) == ["ckpt-00000030", "ckpt-00000040"]


@pytest.mark.parametrize("spelling", ["absolute", "relative", "dot-relative"])
def test_generate_from_the_run_directory(quickstart_run, spelling):
    cfg, _, _ = quickstart_run
    home = Path(cfg.storage).parent  # runs live in home/runs: the README's `raylm generate runs/quickstart`
    run = {"absolute": cfg.run_dir, "relative": "runs/qs", "dot-relative": "./runs/qs"}[spelling]
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", "generate", run, "--prompt", "The ",
                           "--max-new-tokens", "12"], capture_output=True, text=True, timeout=300, cwd=home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("The ") and len(proc.stdout.split("---")[0].strip()) > len("The")


def test_a_copied_run_loads_anywhere(quickstart_run, tmp_path):
    """Runs are self-contained: the tokenizer lives in the run, and checkpoints name it
    relative to the run, so a copy in another place (bucket, laptop) loads as it is."""
    import shutil

    from raylm.generate import load_for_inference

    cfg, _, _ = quickstart_run
    meta = json.loads(next(Path(cfg.run_dir).glob("ckpt-*/meta.json")).read_text())
    assert meta["tokenizer"] == "tokenizer"
    moved = tmp_path / "elsewhere" / "qs"
    shutil.copytree(cfg.run_dir, moved, ignore=shutil.ignore_patterns("data", "corpus"))
    model, tok, _ = load_for_inference(str(moved))
    assert tok.path == str(moved / "tokenizer")


def test_from_record_reproduces_the_recorded_config(quickstart_run):
    from raylm.cli import build_parser, _config
    from raylm.record import load_record

    cfg, _, _ = quickstart_run
    record = str(Path(cfg.run_dir, "record.json"))
    stage, recorded = load_record(record)
    assert stage == "pretrain"
    args, _ = build_parser().parse_known_args(["pretrain", "--from-record", record])
    assert _config(args) == recorded
    args, _ = build_parser().parse_known_args(["pretrain", "--from-record", record, "train.max_steps=99"])
    assert _config(args).train.max_steps == 99 and _config(args).model == recorded.model


def test_resume_from_a_hostile_checkpoint_is_refused_on_the_worker(quickstart_run, tmp_path):
    """A copy of the run whose newest checkpoint carries a crafted index (and a marker that
    agrees with it): the Ray Train workers refuse it in one line naming the file, and the
    payload never runs."""
    import shutil

    from raylm import checkpoint
    from raylm.cli import _root_cause
    from tests.unit.test_checkpoint_security import stack_global

    cfg, _, _ = quickstart_run
    marker = tmp_path / "pwned"
    run = tmp_path / "runs" / "hostile"
    newest = Path(checkpoint.latest_complete(cfg.run_dir))
    shutil.copytree(newest, run / newest.name)
    index = run / newest.name / ".metadata"
    index.write_bytes(stack_global("torch.distributed.checkpoint.filesystem", "os.system", f"touch {marker}"))
    checkpoint.commit(str(run / newest.name), {"step": 1}, files=checkpoint.file_digests(str(run / newest.name)))
    hostile = load_config(overrides=[f"storage={tmp_path / 'runs'}", "name=hostile", "train.max_steps=50",
                                     f"data.path={cfg.run_dir}/data", f"tokenizer.path={cfg.run_dir}/tokenizer",
                                     *SMALL])
    with pytest.raises(BaseException) as info:
        pretrain(hostile, resume="must", samples=False)
    cause = _root_cause(info.value)
    assert isinstance(cause, checkpoint.UnsafeCheckpointError), repr(cause)
    assert f"{index}: refuses to unpickle torch.distributed.checkpoint.filesystem.os.system" in str(cause)
    assert "\n" not in str(cause)
    assert not marker.exists()
