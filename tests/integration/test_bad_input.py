"""Bad input met by the Ray pipeline: a folder mixing good files and bad ones (paths with
spaces, bad records of every kind, 20 MB one-line documents), a file that cannot be read
inside a Ray Data task, and a prepared dataset whose seq_len the run takes over.

The `raylm` runs here each start a Ray cluster; the one that prepares the mixed folder is
shared by the tests that need a prepared dataset."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.config import load_config
from raylm.data import DataError

pytestmark = pytest.mark.integration

BIG = 20_000_000  # characters on one line: twice the default data.max_chars


def raylm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "raylm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> list[str]:
    from raylm.corpus import write_builtin_corpus

    root = tmp_path_factory.mktemp("builtin")
    write_builtin_corpus(str(root), min_bytes=300_000)
    return [json.loads(line)["text"] for f in sorted(root.glob("*.jsonl")) for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, docs):
    from raylm.pipeline import train_tokenizer_from

    corpus = tmp_path_factory.mktemp("tokcorpus")
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = load_config(overrides=[f"data.path={corpus}", "tokenizer.vocab_size=512", "tokenizer.sample_bytes=300000"])
    return train_tokenizer_from(cfg, str(tmp_path_factory.mktemp("tok") / "tokenizer"))


def mixed_folder(root: Path, docs: list[str], huge: bool) -> Path:
    """Good text beside one of each kind of bad input; in corpus (name) order the bad records are
    'bad fields.jsonl' lines 2-5, then 'cut off.jsonl.gz', then 'no text.parquet'."""
    folder = root / "my corpus"
    folder.mkdir()
    (folder / "good part.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / "bad fields.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"text": "a good record before the bad ones"}, {"body": "no text field"}, {"text": 42}, {"text": ["a"]},
        {"text": None})))
    gz = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[:50]).encode())
    (folder / "cut off.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    pq.write_table(pa.table({"body": docs[:3]}), folder / "no text.parquet")
    if huge:
        (folder / "huge doc.txt").write_text("word " * (BIG // 5))
        (folder / "huge record.jsonl").write_text(json.dumps({"text": "word " * (BIG // 5)}) + "\n")
    return folder


BAD = ["bad fields.jsonl:2: no field 'text'", "bad fields.jsonl:3: field 'text' is int",
       "bad fields.jsonl:4: field 'text' is list", "bad fields.jsonl:5: field 'text' is NoneType",
       "cut off.jsonl.gz: truncated or corrupt gzip", "no text.parquet: no column 'text' (columns: body)"]


@pytest.fixture(scope="module")
def prepared_mixed(tmp_path_factory, docs, tokenizer):
    """`raylm data prepare` on the mixed folder, with a budget for its bad records."""
    root = tmp_path_factory.mktemp("mixed")
    folder = mixed_folder(root, docs, huge=True)
    out = root / "prepared out"
    proc = raylm("data", "prepare", "--data", str(folder), "--out", str(out), "--tokenizer", tokenizer.path,
                 "data.max_bad_records=6", "data.seq_len=64", "data.val_fraction=0.1", cwd=root)
    return folder, out, proc


def test_cli_prepare_of_a_mixed_folder_counts_what_it_skipped(prepared_mixed):
    folder, out, proc = prepared_mixed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    assert summary["bad_records"] == len(BAD) and summary["dropped"].get("too_long") == 2, summary
    assert summary["train_blocks"] > 0 and summary["val_blocks"] > 0
    # The 20 MB documents are dropped, and the log says so (they count as read, not as kept).
    assert "data: dropped 2 longer than data.max_chars=10000000" in proc.stdout
    assert f"{len(BAD)} bad records" in proc.stdout
    skipped = [line for line in proc.stdout.splitlines() if "skipped bad record" in line]
    assert len(skipped) == len(BAD) and all(f"{folder}/{b}" in s for b, s in zip(BAD, skipped)), skipped
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"{folder}/good part.jsonl" in manifest["files"] and manifest["seq_len"] == 64
    card = (out / "DATACARD.md").read_text()
    assert "| too long | 2 (" in card and f"{folder}/cut off.jsonl.gz" in card


def test_first_bad_record_stops_the_run_before_tokenizing(ray_local, tmp_path, docs, tokenizer, monkeypatch):
    from raylm import data

    folder = mixed_folder(tmp_path, docs, huge=False)
    cfg = load_config(overrides=[f"data.path={folder}", "data.seq_len=64", "data.val_fraction=0.1"]).data

    def tokenizing(*args, **kwargs):
        raise AssertionError("tokenizing started")

    with monkeypatch.context() as m:
        m.setattr(data, "_document_stream", tokenizing)
        with pytest.raises(DataError) as info:
            data.prepare(cfg, tokenizer, str(tmp_path / "out"), seed=0, log=lambda *_: None)
    assert str(info.value).startswith(f"{folder}/{BAD[0]}")
    # Within budget but nothing left after the filters: the error says where the documents went.
    everything_long = dataclasses.replace(cfg, max_bad_records=len(BAD), max_chars=10)
    with pytest.raises(DataError) as info:
        data.prepare(everything_long, tokenizer, str(tmp_path / "out"), seed=0, log=lambda *_: None)
    assert "corpus yields no training blocks" in str(info.value)
    assert f"{len(docs) + 1} longer than data.max_chars=10, {len(BAD)} bad records; 0 kept" in str(info.value)


def test_seq_len_is_taken_from_the_prepared_dataset(ray_local, prepared_mixed, tokenizer, tmp_path, monkeypatch):
    """data.seq_len left at its default becomes the dataset's (64), and that is what the
    training workers are given; set to another value it is an error naming both."""
    import raylm.train_ray
    from raylm.pipeline import preflight, pretrain

    _, out, proc = prepared_mixed
    assert proc.returncode == 0, proc.stderr[-3000:]
    common = [f"storage={tmp_path}", f"tokenizer.path={tokenizer.path}", f"data.path={out}", "model.dim=64",
              "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=128"]
    cfg = load_config(overrides=common)
    assert cfg.data.seq_len != 64 and preflight(cfg)[0].data.seq_len == 64
    given = {}

    def run_ray_training(cfg, datasets, manifest, **kwargs):
        given.update(cfg=cfg, manifest=manifest)
        raise KeyboardInterrupt  # stands in for the training run: what matters is what it was given

    monkeypatch.setattr(raylm.train_ray, "run_ray_training", run_ray_training)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, samples=False)
    assert given["cfg"].data.seq_len == given["manifest"]["seq_len"] == 64
    with pytest.raises(DataError, match=rf"^data\.seq_len=32 but {out} was prepared with seq_len 64; "
                                        r"drop data\.seq_len or re-prepare$"):
        preflight(load_config(overrides=[*common, "data.seq_len=32"]))


@pytest.mark.skipif(not os.path.isfile("/proc/self/mem"), reason="needs Linux /proc")
def test_a_file_that_fails_to_read_inside_a_ray_task_is_one_line(tmp_path, docs, tokenizer):
    """The corpus listing sees a regular file that no read succeeds on (the process's own
    memory, whose first page is unmapped: EIO, also for root, who reads past chmod 000). The
    read fails inside a Ray Data task; Ray's own report of it, traceback and all, stays off
    the console, and raylm's line names the file."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / "zz.jsonl").symlink_to("/proc/self/mem")
    # data.in_process_mb=0: a corpus this small would be read in the driver, not in a Ray task.
    proc = raylm("data", "prepare", "--data", str(folder), "--out", str(tmp_path / "out"), "--tokenizer",
                 tokenizer.path, "data.in_process_mb=0", cwd=tmp_path)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in both, both[-5000:]
    errors = [line for line in both.splitlines() if "raylm: error:" in line]
    assert errors == [f"raylm: error: {folder}/zz.jsonl: Input/output error"], both[-5000:]
    assert not (tmp_path / "out" / "manifest.json").exists()
