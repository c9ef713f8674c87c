"""Corpus input that once crashed or was lost without a word, checked without a cluster: files
raylm cannot read in a corpus directory, JSON beyond the parser's limits, parquet strings
that are not UTF-8, a manifest.json raylm did not write, page breaks and byte order marks."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.config import DataConfig, load_config
from raylm.data import DataError, list_corpus, prepare, read_manifest
from raylm.documents import clean_text, json_lines, parse_and_clean, parse_documents


def _names(folder, files) -> list[str]:
    return [f.uri[len(str(folder)) + 1:] for f in files]


# --------------------------------------------------------------------------- listing


def test_files_raylm_cannot_read_are_named_not_skipped(tmp_path):
    for name in ("a.jsonl", "b.json", "c.json.gz", "D.TXT", "e.txt.gz"):
        (tmp_path / name).write_text("x")
    with pytest.raises(DataError) as info:
        list_corpus(str(tmp_path))
    assert str(info.value) == (f"{tmp_path}: 3 files raylm cannot read as a corpus (b.json, c.json.gz, e.txt.gz; "
                               f"it reads .jsonl.gz, .jsonl, .txt, .parquet); select the corpus files with a glob "
                               f"in data.path, e.g. {tmp_path}/**/*.jsonl")
    assert _names(tmp_path, list_corpus(f"{tmp_path}/*.jsonl")) == ["a.jsonl"]  # the way out it names


def test_suffixes_in_any_case_are_read(tmp_path):
    (tmp_path / "A.JSONL").write_text('{"text": "one"}\n')
    (tmp_path / "b.Txt").write_bytes(b"two")
    files = list_corpus(str(tmp_path))
    assert _names(tmp_path, files) == ["A.JSONL", "b.Txt"]
    assert [d for f in files for _, d in parse_documents(f.uri, open(f.uri, "rb").read(), "text")] == ["one", "two"]


def test_hidden_files_markers_and_raylms_own_files_are_no_corpus_and_no_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    for name in ("_SUCCESS", ".DS_Store", "._a.jsonl", ".a.jsonl.crc", "part-0.crc", "_metadata",
                 "manifest.json", "DATACARD.md", ".git/config", ".cache/x.bin"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("not text")
    assert _names(tmp_path, list_corpus(str(tmp_path))) == ["a.jsonl"]
    assert _names(tmp_path, list_corpus(f"{tmp_path}/**")) == ["a.jsonl"]


def test_a_named_file_is_read_whatever_its_name(tmp_path):
    (tmp_path / "_part.jsonl").write_text('{"text": "one"}\n')
    assert _names(tmp_path, list_corpus(str(tmp_path / "_part.jsonl"))) == ["_part.jsonl"]
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(DataError, match="notes.json: no corpus files found"):
        list_corpus(str(tmp_path / "notes.json"))


# --------------------------------------------------------------------------- records


@pytest.mark.parametrize("line, error", [
    (b"[" * 100_000, "d/a.jsonl:1: JSON nested too deeply to read"),
    (b'{"text": ' + b"1" * 5000 + b"}", "d/a.jsonl:1: unreadable JSON (Exceeds the limit (4300 digits) for integer "
                                      "string conversion: value has 5000 digits)"),
])
def test_json_beyond_the_parsers_limits_is_a_bad_record(line, error):
    raw = line + b"\n" + b'{"text": "fine"}\n'
    (l1, e1), (l2, ok) = json_lines("d/a.jsonl", raw)
    assert (l1, str(e1)) == (1, error) and (l2, ok) == (2, {"text": "fine"})
    out = parse_and_clean({"path": ["d/a.jsonl"], "bytes": [raw]}, DataConfig())
    assert list(out["text"]) == ["", "fine"] and list(out["error"]) == [error, ""]  # counted against the budget


def test_parquet_strings_that_are_not_utf8_name_the_row():
    text = pa.array([b"good", b"ba\xffd"], pa.binary()).view(pa.string())  # parquet does not check
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": text}), buf)
    (l1, ok), (l2, err) = parse_documents("d/b.parquet", buf.getvalue(), "text")
    assert (l1, ok) == (1, "good")
    assert (l2, str(err)) == (2, "d/b.parquet: row 2: 'text' is not valid UTF-8 (byte 0xff at offset 2)")


def test_page_breaks_and_separators_keep_words_apart():
    assert clean_text("end of page.\x0cNext page") == "end of page.\nNext page"
    assert clean_text("a\x0bb\x1cc\x1dd\x1ee\x1ff") == "a\nb\nc\nd\ne\nf"
    assert clean_text("a\x00b\x07c\x7f") == "abc"  # other control characters still go
    assert clean_text("page one \x0c\n\nTwo") == "page one\n\nTwo"


def test_a_byte_order_mark_is_dropped_once_per_file():
    bom = b"\xef\xbb\xbf"
    jsonl = bom + b'{"text": "one"}\n{"text": "two"}\n'
    assert list(parse_documents("d/a.jsonl", jsonl, "text")) == [(1, "one"), (2, "two")]
    assert list(json_lines("d/a.jsonl", jsonl)) == [(1, {"text": "one"}), (2, {"text": "two"})]  # SFT and DPO too
    assert list(parse_documents("d/a.txt", bom + b"words", "text")) == [(1, "words")]
    assert list(parse_documents("d/a.txt", bom + bom + b"w", "text")) == [(1, "\ufeffw")]  # once, not every one


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("content, why", [
    ("", "not valid JSON: Expecting value"),
    ("\xff garbage", "not valid JSON"),
    ("[1, 2]", "a JSON list, not an object"),
])
def test_a_manifest_that_is_not_a_json_object_is_named(tmp_path, content, why):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(DataError, match=rf"^{tmp_path}/manifest\.json: not a manifest raylm wrote \({why}"):
        read_manifest(str(tmp_path))


def test_a_manifest_raylm_did_not_write_is_refused_where_it_would_be_written_over(tmp_path):
    assert read_manifest(str(tmp_path)) is None
    (tmp_path / "manifest.json").write_text('{"files": ["a.jsonl"]}')
    assert read_manifest(str(tmp_path)) == {"files": ["a.jsonl"]}
    with pytest.raises(DataError, match=r"manifest\.json: not a manifest raylm wrote \(no format_version, key, "
                                        r"seq_len\)"):
        read_manifest(str(tmp_path), strict=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "one"}\n')
    cfg = load_config(overrides=[f"data.path={corpus}"]).data
    with pytest.raises(DataError, match=rf"^{tmp_path}/manifest\.json: not a manifest raylm wrote"):
        prepare(cfg, SimpleNamespace(sha256="0" * 64), str(tmp_path), seed=0, log=lambda *_: None)
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"files": ["a.jsonl"]}  # left as it was


def test_a_corpus_gathered_by_links_is_read_whole(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "b.jsonl").write_text('{"text": "two"}\n')
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "one"}\n')
    (corpus / "more").symlink_to(shared)
    (shared / "loop").symlink_to(corpus)
    assert _names(corpus, list_corpus(str(corpus))) == ["a.jsonl", "more/b.jsonl"]


def test_a_reused_dataset_is_held_to_this_runs_bad_record_budget(tmp_path):
    """The dataset key leaves data.max_bad_records out: a dataset prepared with a bad record
    skipped was reused without a word by a run that allows none."""
    from raylm.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": f"document {i}: " + "some words here " * 12}) for i in range(40)]
    (corpus / "a.jsonl").write_text("\n".join([*lines[:20], "{broken", *lines[20:]]) + "\n")
    tok = train_tokenizer([(corpus / "a.jsonl").read_text()], str(tmp_path / "tok"), vocab_size=300)
    base = [f"data.path={corpus}", "data.seq_len=32", "data.dedup=none", "data.val_fraction=0.1"]
    out = str(tmp_path / "out")
    loose = load_config(overrides=[*base, "data.max_bad_records=1"]).data
    assert prepare(loose, tok, out, seed=0, log=lambda *_: None)["stats"]["bad_records"]
    strict = load_config(overrides=[*base, "data.max_bad_records=0"]).data
    with pytest.raises(DataError, match=r"a\.jsonl:21: malformed JSON"):
        prepare(strict, tok, out, seed=0, log=lambda *_: None)
