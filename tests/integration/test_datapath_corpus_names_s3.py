"""Corpus files on a real S3 server (SeaweedFS on loopback, tests/s3server.py), named with spaces
and non-ASCII letters: a prefix reads all of them and none of a sibling prefix that starts
alike, a single object reads that one, and the blocks are those of the same files on local
disk. In this process (data.in_process_mb): no Ray."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm import storage
from raylm.config import load_config
from raylm.data import prepare

pytestmark = pytest.mark.usefixtures("s3_server")

FILES = {
    "notes and more.jsonl": "\n".join(json.dumps({"text": f"note {i}: " + "words in a note " * 10}) for i in range(30)),
    "über café/straße ä.jsonl": "\n".join(json.dumps({"text": f"Straße {i}: " + "Wörter über alles " * 10})
                                         for i in range(30)),
    "plain text ñ.txt": "A plain text file.\n" * 60,
}


def _parquet() -> bytes:
    sink = io.BytesIO()
    texts = [f"row {i}: " + "from a parquet file " * 8 for i in range(20)]
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), sink, row_group_size=7)
    return sink.getvalue()


def _blocks(out: str, manifest: dict) -> dict:
    return {split: [pq.read_table(io.BytesIO(storage.read_bytes(storage.join(out, s["path"])))).column("tokens")
                    .to_pylist() for s in manifest[split]["shards"]] for split in ("train", "val")}


def _prepare(path: str, out: str, tok) -> tuple[dict, dict]:
    cfg = load_config(overrides=[f"data.path={path}", "data.seq_len=16", "data.dedup=none",
                                 "data.val_fraction=0.2", "data.shuffle_window=8"]).data
    manifest = prepare(cfg, tok, out, seed=0, log=lambda *_: None)
    return manifest, _blocks(out, manifest)


def test_names_with_spaces_and_letters_a_prefix_and_one_object(s3_prefix, tmp_path):
    from raylm.tokenizer import train_tokenizer

    local = tmp_path / "corpus"
    for name, text in FILES.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_text(text + "\n", encoding="utf-8")
        storage.write_bytes(storage.join(s3_prefix, "corpus", name), (text + "\n").encode())
    (local / "rows.parquet").write_bytes(_parquet())
    storage.write_bytes(storage.join(s3_prefix, "corpus", "rows.parquet"), _parquet())
    storage.write_text(storage.join(s3_prefix, "corpus2", "other.jsonl"), json.dumps({"text": "not mine " * 20}) + "\n")
    tok = train_tokenizer(["\n".join(FILES.values()) * 3], str(tmp_path / "tok"), vocab_size=340)

    on_s3, s3_blocks = _prepare(f"{s3_prefix}/corpus", f"{s3_prefix}/out", tok)
    on_disk, disk_blocks = _prepare(str(local), str(tmp_path / "out"), tok)
    assert [Path(f).name for f in on_s3["files"]] == ["notes and more.jsonl", "plain text ñ.txt", "rows.parquet",
                                                      "straße ä.jsonl"]
    assert on_s3["stats"]["documents_read"] == 30 + 1 + 20 + 30 and not on_s3["stats"]["bad_records"]
    assert s3_blocks == disk_blocks and s3_blocks["train"] and s3_blocks["val"]
    assert {k: v for k, v in on_s3["stats"].items() if "seconds" not in k} == \
        {k: v for k, v in on_disk["stats"].items() if "seconds" not in k}

    one = storage.join(s3_prefix, "corpus", "über café", "straße ä.jsonl")
    single, _ = _prepare(one, f"{s3_prefix}/out-one", tok)
    assert single["files"] == [one] and single["stats"]["documents_read"] == 30
