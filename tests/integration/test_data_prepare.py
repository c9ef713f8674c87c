"""`data prepare` on Ray Data against the S3 server: de-duplication across shards, PII
redaction, provenance, the data card, the error budget, and nothing half-written left behind.

The corpus is built from the offline built-in corpus (distinct paragraphs of CPython's
documentation) plus planted duplicates, near-duplicates, PII and bad records, spread over
several jsonl shards in the bucket."""

from __future__ import annotations

import dataclasses
import io
import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylm import storage
from raylm.config import load_config
from raylm.data import DataError, prepare, read_manifest
from raylm.pipeline import train_tokenizer_from

pytestmark = pytest.mark.integration


def paragraphs(tmp_path_factory, n: int) -> list[str]:
    """n distinct paragraphs of 60+ words from the built-in corpus."""
    from raylm.corpus import write_builtin_corpus

    root = tmp_path_factory.mktemp("builtin")
    write_builtin_corpus(str(root))
    docs = [json.loads(line)["text"] for f in sorted(root.glob("*.jsonl")) for line in f.read_text().splitlines()]
    seen, out = set(), []
    for p in (q for d in docs for q in re.split(r"\n\s*\n", d)):
        p = " ".join(p.split())
        if len(p.split()) >= 60 and p not in seen:
            seen.add(p)
            out.append(p)
    assert len(out) >= n
    return out[:n]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from raylm.corpus import write_builtin_corpus

    root = tmp_path_factory.mktemp("tokcorpus")
    write_builtin_corpus(str(root))
    cfg = load_config(overrides=[f"data.path={root}", "tokenizer.vocab_size=512", "tokenizer.sample_bytes=400000"])
    return train_tokenizer_from(cfg, str(tmp_path_factory.mktemp("tok") / "tokenizer"))


def jsonl(*docs: str) -> bytes:
    return "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()


def data_cfg(path: str, val_path: str, *overrides: str):
    return load_config(overrides=[f"data.path={path}", f"data.val_path={val_path}", "data.seq_len=32",
                                  "data.shuffle_window=1", "data.blocks_per_shard=64", *overrides]).data


def decoded(out: str, manifest: dict, tok, split: str = "train") -> str:
    blocks = [pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, s["path"])))).column("tokens").to_pylist()
              for s in manifest[split]["shards"]]
    ids = np.concatenate([np.asarray(b, dtype=np.int64).ravel() for b in blocks])
    return tok.decode(ids.tolist())


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    p = paragraphs(tmp_path_factory, 43)
    p[1] = " ".join(p[1:2] + p[40:43])  # a long document (240+ words)...
    words = p[1].split()
    words[100] = "zebrafish"  # ... and a copy with one word changed: Jaccard of shingles ~0.96
    near = " ".join(words)
    pii = ("Write to jane.doe@example.com or call (415) 555-0132; the card on file is "
           "4111 1111 1111 1111 and the server sits at 10.20.30.40. " + p[2])
    survivors = "Version 3.11.4 shipped on 2024-01-15 at 12:30:45 with order number 4111 1111 1111 1112. " + p[3]
    shards = {
        "a.jsonl": jsonl(p[0], p[1], pii, *p[4:14]),
        "b.jsonl": jsonl(near, survivors, *p[14:24]),
        "c.jsonl": jsonl(p[0], *p[24:34]),  # p[0] again: an exact duplicate in another shard
    }
    return p, shards


def upload(prefix: str, files: dict) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(prefix, name), data)


def test_dedup_pii_provenance_and_data_card(ray_local, s3_prefix, tokenizer, planted):
    p, shards = planted
    upload(f"{s3_prefix}/corpus", shards)
    upload(f"{s3_prefix}/val", {"v.jsonl": jsonl(*p[34:40])})
    cfg = data_cfg(f"{s3_prefix}/corpus", f"{s3_prefix}/val")
    out = f"{s3_prefix}/prepared"
    said = []
    manifest = prepare(cfg, tokenizer, out, seed=0, log=said.append)
    st = manifest["stats"]
    assert st["dropped"].get("exact_duplicate") == 1 and st["dropped"].get("near_duplicate") == 1, (st["dropped"], said)
    assert st["documents_read"] == 13 + 12 + 11 + 6 and st["documents"] == st["documents_read"] - 2
    assert st["pii"] == {"email": 1, "phone": 1, "ip": 1, "card": 1}

    text = decoded(out, manifest, tokenizer)
    assert text.count(p[0][:80]) == 1  # the exact duplicate (another shard) is gone, the first kept
    assert "zebrafish" not in text and p[1][:80] in text  # the near-duplicate is gone, the original kept
    for raw in ("jane.doe@example.com", "555-0132", "4111 1111 1111 1111", "10.20.30.40"):
        assert raw not in text
    for placeholder in ("<EMAIL>", "<PHONE>", "<CARD_NUMBER>", "<IP_ADDRESS>"):
        assert placeholder in text
    # Near-misses survive: a version, a date, a time, a number failing the Luhn check.
    assert "Version 3.11.4 shipped on 2024-01-15 at 12:30:45 with order number 4111 1111 1111 1112" in text

    # Provenance: shards name their files (training files, then validation files) by index.
    assert manifest["files"] == [f"{s3_prefix}/corpus/{n}" for n in ("a.jsonl", "b.jsonl", "c.jsonl")] + \
        [f"{s3_prefix}/val/v.jsonl"]
    train_sources = set().union(*(s["source_files"] for s in manifest["train"]["shards"]))
    val_sources = set().union(*(s["source_files"] for s in manifest["val"]["shards"]))
    assert train_sources == {0, 1, 2} and val_sources == {3}
    assert manifest["train"]["shards"][0]["source_files"][0] == 0  # order kept: shard a comes first
    assert all(s["etag"] for s in manifest["sources"])

    card = storage.read_text(storage.join(out, "DATACARD.md"))
    for needle in ("# Data card", "a.jsonl", "| exact duplicate | 1 (", "| near duplicate | 1 (", "| email | 1 |",
                   "| card | 1 |", "| tokens |", "| characters |"):
        assert needle in card, needle
    summary = [m for m in said if m.startswith("data: read ")]
    assert summary and "as duplicates" in summary[-1] and "MB/s" in summary[-1], said


def test_in_process_and_ray_data_prepare_write_the_same_dataset(ray_local, s3_prefix, tokenizer, planted):
    """Small corpora are prepared in the driver (threads over files), large ones on a Ray Data
    actor pool: the same stages, so the same manifest, provenance and blocks, including
    de-duplication across shards, PII redaction and a bad record within the budget."""
    p, shards = planted
    # d.jsonl repeats four documents of c.jsonl, then breaks.
    upload(f"{s3_prefix}/corpus", {**shards, "d.jsonl": jsonl(*p[30:34]) + b'{"text": broken\n'})
    upload(f"{s3_prefix}/val", {"v.jsonl": jsonl(*p[34:40])})
    made, said = {}, []
    for mb in (64, 0):
        cfg = data_cfg(f"{s3_prefix}/corpus", f"{s3_prefix}/val", "data.max_bad_records=1", "data.shuffle_window=16",
                       f"data.in_process_mb={mb}")
        out = f"{s3_prefix}/prepared-{mb}"
        manifest = prepare(cfg, tokenizer, out, seed=0, log=said.append)
        blocks = {split: [pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, s["path"])))).to_pydict()
                          for s in manifest[split]["shards"]] for split in ("train", "val")}
        made[mb] = (manifest, blocks)
    assert sum("preparing in this process" in m for m in said) == 1, said
    (local, local_blocks), (ray, ray_blocks) = made[64], made[0]
    assert local_blocks == ray_blocks and local_blocks["train"] and local_blocks["val"]
    timing = ("seconds", "dedup_seconds", "mb_per_s")
    assert {k: v for k, v in local["stats"].items() if k not in timing} == \
        {k: v for k, v in ray["stats"].items() if k not in timing}
    assert local["stats"]["dropped"] == {"exact_duplicate": 5, "near_duplicate": 1} and len(local["stats"]["bad_records"]) == 1
    for split in ("train", "val"):
        assert [dict(s, path=None) for s in local[split]["shards"]] == [dict(s, path=None) for s in ray[split]["shards"]]
    assert local["key"] == ray["key"] and local["files"] == ray["files"]


def test_dedup_off_and_pii_off_keep_everything(ray_local, s3_prefix, tokenizer, planted):
    p, shards = planted
    upload(f"{s3_prefix}/corpus", shards)
    upload(f"{s3_prefix}/val", {"v.jsonl": jsonl(*p[34:40])})
    cfg = data_cfg(f"{s3_prefix}/corpus", f"{s3_prefix}/val", "data.dedup=none", "data.redact_pii=[]")
    manifest = prepare(cfg, tokenizer, f"{s3_prefix}/prepared", seed=0, log=lambda *_: None)
    assert manifest["stats"]["dropped"] == {} and manifest["stats"]["pii"] == {}
    text = decoded(f"{s3_prefix}/prepared", manifest, tokenizer)
    assert text.count(p[0][:80]) == 2 and "zebrafish" in text and "jane.doe@example.com" in text


def test_error_budget_skips_and_lists_bad_records(ray_local, s3_prefix, tokenizer, planted):
    p, _ = planted
    bad = (jsonl(*p[0:10]).decode() + '{"text": broken\n' + json.dumps({"body": "no text field"}) + "\n").encode()
    upload(f"{s3_prefix}/corpus", {"bad.jsonl": bad, "good.jsonl": jsonl(*p[10:30])})
    upload(f"{s3_prefix}/val", {"v.jsonl": jsonl(*p[34:40])})
    within = data_cfg(f"{s3_prefix}/corpus", f"{s3_prefix}/val", "data.max_bad_records=2")
    said = []
    manifest = prepare(within, tokenizer, f"{s3_prefix}/ok", seed=0, log=said.append)
    listed = manifest["stats"]["bad_records"]
    assert len(listed) == 2
    assert listed[0].startswith(f"{s3_prefix}/corpus/bad.jsonl:11: malformed JSON")
    assert listed[1].startswith(f"{s3_prefix}/corpus/bad.jsonl:12: no field 'text'")
    assert any("skipped bad record" in m and "bad.jsonl:11" in m for m in said)
    card = storage.read_text(storage.join(f"{s3_prefix}/ok", "DATACARD.md"))
    assert "## Bad records skipped" in card and "bad.jsonl:12" in card

    over = dataclasses.replace(within, max_bad_records=1)
    with pytest.raises(DataError, match=r"bad\.jsonl:12: no field 'text'.*\(2 bad records > data\.max_bad_records=1\)"):
        prepare(over, tokenizer, f"{s3_prefix}/over", seed=0, log=lambda *_: None)


def test_failed_prepare_leaves_nothing_that_looks_complete(ray_local, s3_prefix, tokenizer, planted):
    """Shards are written before the bad record is reached (64 blocks per shard, small
    blocks), yet no manifest appears; a later good run commits and clears the debris."""
    p, _ = planted
    many = [f"{x} (copy {i})" for i in range(20) for x in p[:30]]  # several tokenizer batches of 256
    upload(f"{s3_prefix}/corpus", {"a.jsonl": jsonl(*many), "z.jsonl": b'{"text": oops\n'})
    upload(f"{s3_prefix}/val", {"v.jsonl": jsonl(*p[34:40])})
    out = f"{s3_prefix}/prepared"
    cfg = data_cfg(f"{s3_prefix}/corpus", f"{s3_prefix}/val", "data.blocks_per_shard=8", "data.dedup=none")
    with pytest.raises(DataError, match=r"z\.jsonl:1: malformed JSON"):
        prepare(cfg, tokenizer, out, seed=0, log=lambda *_: None)
    written = [f.uri for f in storage.list_files(out)] if storage.exists(out) else []
    assert any("/attempt-" in u and u.endswith(".parquet") for u in written), written  # partial shards exist
    assert read_manifest(out) is None  # ... but nothing names them
    storage.delete(f"{s3_prefix}/corpus/z.jsonl")
    manifest = prepare(cfg, tokenizer, out, seed=0, log=lambda *_: None)
    attempts = {u.split("/attempt-")[1].split("/")[0] for u in (f.uri for f in storage.list_files(out)) if "/attempt-" in u}
    assert len(attempts) == 1 and manifest["train"]["shards"][0]["path"].startswith("attempt-" + attempts.pop())


# --------------------------------------------------------------------------- through the CLI


def cli(*args: str, env: dict, cwd) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "raylm.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    return proc.returncode, proc.stderr


def one_error_line(code: int, stderr: str) -> str:
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("raylm: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_cli_nonexistent_bucket_is_named(s3_server, tokenizer, tmp_path):
    code, err = cli("data", "prepare", "--data", "s3://no-such-bucket-raylm/corpus/*.jsonl", "--out",
                    str(tmp_path / "out"), "--tokenizer", tokenizer.path, env={}, cwd=tmp_path)
    line = one_error_line(code, err)
    assert "s3://no-such-bucket-raylm" in line and "bucket does not exist" in line
    assert not (tmp_path / "out").exists()


def test_cli_wrong_credentials_are_named_without_the_secret(s3_server, s3_prefix, tokenizer, planted, tmp_path):
    upload(f"{s3_prefix}/corpus", planted[1])
    code, err = cli("data", "prepare", "--data", f"{s3_prefix}/corpus", "--out", str(tmp_path / "out"),
                    "--tokenizer", tokenizer.path, env={"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, cwd=tmp_path)
    line = one_error_line(code, err)
    assert s3_prefix in line and "access denied" in line and "wrong-secret" not in err
    assert not (tmp_path / "out").exists()


def test_groupby_and_driver_bucketing_find_the_same_duplicates(ray_local, s3_prefix, planted, monkeypatch):
    """Large corpora form buckets with a distributed Ray Data groupby, small ones on the
    driver; both must give the same verdicts."""
    from raylm import data
    from raylm.data import find_duplicates, list_corpus

    upload(f"{s3_prefix}/corpus", planted[1])
    cfg = data_cfg(f"{s3_prefix}/corpus", "")
    bad = jsonl("fine text here") + b'{"text": broken\n'
    upload(f"{s3_prefix}/corpus", {"z.jsonl": bad})
    files = list_corpus(cfg.path)
    on_driver = find_duplicates(files, [], cfg)
    monkeypatch.setattr(data, "SMALL_CORPUS_BYTES", 0)
    distributed = find_duplicates(files, [], cfg)
    # a.jsonl line 2 has a near copy at b.jsonl line 1; a.jsonl line 1 an exact one at c.jsonl line 1.
    assert on_driver[0] == distributed[0] == {(1, 1): "near_duplicate", (2, 1): "exact_duplicate"}
    # The first pass also brings back the bad records it read, in corpus order, either way.
    assert on_driver[1] == distributed[1] and len(on_driver[1]) == 1
    assert on_driver[1][0].startswith(f"{s3_prefix}/corpus/z.jsonl:2: malformed JSON")


def test_stream_mode_stops_on_bad_records_before_training(ray_local, s3_prefix, tokenizer, planted):
    """data.mode=stream: the driver's de-duplication pass reads every record, so a bad one
    past the budget ends the run there, with its file and line, before any worker starts."""
    from raylm.data import stream_datasets

    p, _ = planted
    upload(f"{s3_prefix}/corpus", {"a.jsonl": jsonl(*p[:20]), "b.jsonl": jsonl(*p[20:30]) + b'{"text": oops\n'})
    cfg = data_cfg(f"{s3_prefix}/corpus", "", "data.mode=stream", "data.val_fraction=0.2")
    with pytest.raises(DataError, match=rf"^{s3_prefix}/corpus/b\.jsonl:11: malformed JSON"):
        stream_datasets(cfg, tokenizer, 0, log=lambda *_: None)
    datasets, manifest = stream_datasets(dataclasses.replace(cfg, max_bad_records=1), tokenizer, 0,
                                         log=lambda *_: None)
    assert set(datasets) == {"train", "val"} and manifest["mode"] == "stream"


def test_one_text_file_holds_out_its_tail(ray_local, tmp_path, tokenizer, tmp_path_factory):
    """A newcomer's first corpus is one .txt file: one document, which a split by document
    would send wholly to one side. The tail is held out instead, and only the tail."""
    lines = [f"{i}: " + q for i, q in enumerate(paragraphs(tmp_path_factory, 40))]
    (tmp_path / "book.txt").write_text("\n".join(lines) + "\n")
    cfg = load_config(overrides=[f"data.path={tmp_path}/book.txt", "data.seq_len=32", "data.val_fraction=0.1",
                                 "data.shuffle_window=1", "data.dedup=none"]).data
    said = []
    manifest = prepare(cfg, tokenizer, str(tmp_path / "out"), seed=0, log=said.append)
    assert any("data.val_split=tail" in s for s in said)
    val, train = decoded(str(tmp_path / "out"), manifest, tokenizer, "val"), decoded(str(tmp_path / "out"), manifest, tokenizer)
    assert manifest["val"]["blocks"] > 0
    assert "36: " in val and "39: " in val and "10: " not in val  # the last lines, and only those
    assert "39: " not in train and "10: " in train
    st = manifest["stats"]  # one document, with its tail held out: counted once
    assert (st["documents_read"], st["documents"], st["val_documents"], st["chars"]["count"]) == (1, 1, 1, 1)
    # Asked to split by document, the one file leaves nothing held out: said in one line.
    with pytest.raises(DataError, match="validation split is empty.*data.val_split=tail"):
        prepare(dataclasses.replace(cfg, val_split="document", val_fraction=0.01), tokenizer,
                str(tmp_path / "out2"), seed=0, log=said.append)
