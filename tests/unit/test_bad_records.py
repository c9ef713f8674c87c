"""Bad input, checked without a cluster: each bad record names its file, line and what is
wrong; a folder that is not a corpus says what it is; a document too long for the filters
is dropped and said; Ray's reports of a user's error are kept off the console, a bug's are not."""

from __future__ import annotations

import gzip
import io
import json
import logging
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm import storage
from raylm.config import Config, DataConfig, load_config
from raylm.data import DataError, list_corpus
from raylm.documents import parse_and_clean, parse_documents

BIG = 20_000_000  # characters: twice the default data.max_chars, on one line


def _parse(path: str, raw: bytes):
    return list(parse_documents(path, raw, "text"))


@pytest.mark.parametrize("value, kind", [(None, "NoneType"), (3, "int"), (2.5, "float"), (["a"], "list"),
                                         ({"a": 1}, "dict"), (True, "bool")])
def test_text_field_of_another_type_names_file_line_and_type(value, kind):
    raw = (json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n").encode()
    ok, (line, err) = _parse("dir/a.jsonl", raw)
    assert ok == (1, "fine") and line == 2 and isinstance(err, DataError)
    assert str(err) == f"dir/a.jsonl:2: field 'text' is {kind}, not a string"


def test_missing_text_field_and_non_object_records():
    raw = b'{"body": "x"}\n{}\n[1, 2]\n"just a string"\n'
    errors = [str(e) for _, e in _parse("a.jsonl", raw)]
    assert errors == ["a.jsonl:1: no field 'text' (found: body); set data.text_field",
                      "a.jsonl:2: no field 'text' (found: no fields); set data.text_field",
                      "a.jsonl:3: a JSON list, not an object with a 'text' field",
                      "a.jsonl:4: a JSON str, not an object with a 'text' field"]


def test_gzip_cut_in_the_middle():
    whole = gzip.compress("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(300)).encode())
    (line, err), = _parse("c/x.jsonl.gz", whole[: len(whole) // 2])
    assert line == 0 and isinstance(err, DataError)
    assert str(err).startswith("c/x.jsonl.gz: truncated or corrupt gzip")


def test_parquet_without_the_text_column():
    sink = io.BytesIO()
    pq.write_table(pa.table({"body": ["a"], "id": [1]}), sink)
    (line, err), = _parse("p/x.parquet", sink.getvalue())
    assert line == 0 and str(err) == "p/x.parquet: no column 'text' (columns: body, id); set data.text_field"


@pytest.mark.parametrize("name", ["huge.txt", "huge.jsonl"])
def test_a_20mb_single_line_document_is_dropped_as_too_long(name):
    text = "word " * (BIG // 5)
    raw = text.encode() if name.endswith(".txt") else (json.dumps({"text": text}) + "\n").encode()
    out = parse_and_clean({"path": np.array([name], dtype=object), "bytes": np.array([raw], dtype=object)},
                          DataConfig())
    assert list(out["dropped"]) == ["too_long"] and list(out["error"]) == [""]
    assert out["chars"][0] > DataConfig().max_chars and out["text"][0] == ""  # the text is not carried on


def test_tokenizer_sample_says_why_nothing_is_left(tmp_path):
    from raylm.pipeline import sample_documents

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x" * 200}) + "\n")
    (tmp_path / "b.txt").write_text("y" * 300)
    cfg = load_config(overrides=[f"data.path={tmp_path}", "data.max_chars=100"])
    with pytest.raises(DataError, match=r"every document is filtered out \(2 longer than data\.max_chars=100, "
                                        r"0 shorter than data\.min_chars=1\)"):
        list(sample_documents(cfg, 10**6))
    kept = load_config(overrides=[f"data.path={tmp_path}", "data.max_chars=250"])
    assert list(sample_documents(kept, 10**6)) == ["x" * 200]


def test_tokenizer_sample_skips_bad_records_within_the_budget(tmp_path):
    # The same corpus and data.max_bad_records that `raylm data prepare` accepts.
    from raylm.pipeline import sample_documents

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"txt": "bad"}\nnot json\n{"text": "two"}\n')
    cfg = load_config(overrides=[f"data.path={tmp_path}", "data.max_bad_records=2"])
    assert list(sample_documents(cfg, 10**6)) == ["one", "two"]
    tight = load_config(overrides=[f"data.path={tmp_path}", "data.max_bad_records=1"])
    with pytest.raises(DataError, match=r"a\.jsonl:3: .*\(2 bad records > data\.max_bad_records=1\)"):
        list(sample_documents(tight, 10**6))
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "b.jsonl").write_text('{"txt": "bad"}\n')
    cfg = load_config(overrides=[f"data.path={only_bad}", "data.max_bad_records=1"])
    with pytest.raises(DataError, match=r"every document is filtered out \(.*, 1 bad records\)"):
        list(sample_documents(cfg, 10**6))


def test_paths_with_spaces(tmp_path):
    folder = tmp_path / "my corpus"
    folder.mkdir()
    (folder / "part one.jsonl").write_text('{"text": "hello"}\n')
    assert [f.uri for f in list_corpus(str(folder))] == [str(folder / "part one.jsonl")]
    assert [f.uri for f in list_corpus(str(folder / "part *.jsonl"))] == [str(folder / "part one.jsonl")]


def test_an_interrupted_prepare_is_not_a_corpus(tmp_path):
    out = tmp_path / "prepared"
    shard = out / "attempt-20250101-000000-abcd1234" / "train" / "shard-00000.parquet"
    shard.parent.mkdir(parents=True)
    pq.write_table(pa.table({"tokens": [[1, 2, 3]]}), shard)
    with pytest.raises(DataError) as info:
        list_corpus(str(out))
    assert str(info.value) == (f"{out}: an unfinished prepared dataset (shards but no manifest.json: `raylm data "
                               f"prepare` stopped before the end); re-run `raylm data prepare --data <corpus> "
                               f"--out {out}`")
    (out / "manifest.json").write_text("{}")  # a finished one is no corpus either
    with pytest.raises(DataError, match=r"a prepared dataset \(token shards\), not a corpus"):
        list_corpus(str(out))


# --------------------------------------------------------------------------- preflight


def _cfg(tmp_path, *overrides: str) -> Config:
    return load_config(overrides=[f"storage={tmp_path}/runs", *overrides])


def test_preflight_lists_the_corpus_once_for_the_stages_after(tmp_path):
    from raylm.pipeline import preflight

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "v.txt").write_text("held out")
    cfg, corpus = preflight(_cfg(tmp_path, f"data.path={tmp_path}/c", f"data.val_path={tmp_path}/v.txt"))
    files, val_files = corpus
    assert [f.uri for f in files] == [str(tmp_path / "c" / "a.jsonl")] and [f.uri for f in val_files] == [
        str(tmp_path / "v.txt")]
    assert preflight(_cfg(tmp_path))[1] is None  # the built-in corpus: nothing to list yet


def test_preflight_refuses_what_would_fail_later(tmp_path):
    from raylm.pipeline import preflight

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(FileNotFoundError, match=rf"^tokenizer {tmp_path}/tok: not found \(no tokenizer\.json"):
        preflight(_cfg(tmp_path, f"data.path={tmp_path}/c", f"tokenizer.path={tmp_path}/tok"))
    with pytest.raises(DataError, match=rf"^{tmp_path}/nothing/\*\.jsonl: no corpus files found"):
        preflight(_cfg(tmp_path, f"data.path={tmp_path}/nothing/*.jsonl"))
    with pytest.raises(DataError, match=rf"^{tmp_path}/missing\.txt: no corpus files found"):
        preflight(_cfg(tmp_path, f"data.path={tmp_path}/c", f"data.val_path={tmp_path}/missing.txt"))


# --------------------------------------------------------------------------- a prepared dataset's seq_len


def _manifest(seq_len: int) -> dict:
    return {"seq_len": seq_len}


def test_seq_len_left_at_its_default_is_taken_from_the_dataset():
    from raylm.pipeline import adopt_seq_len

    cfg = load_config(overrides=["model.max_seq_len=256"])
    assert cfg.data.seq_len == DataConfig().seq_len
    assert adopt_seq_len(cfg, "prep", _manifest(64)).data.seq_len == 64
    assert adopt_seq_len(cfg, "prep", _manifest(256)).data.seq_len == 256


def test_seq_len_set_to_another_value_is_an_error_naming_both():
    from raylm.pipeline import adopt_seq_len

    cfg = load_config(overrides=["data.seq_len=256"])
    with pytest.raises(DataError) as info:
        adopt_seq_len(cfg, "s3://b/prep", _manifest(128))
    assert str(info.value) == ("data.seq_len=256 but s3://b/prep was prepared with seq_len 128; "
                               "drop data.seq_len or re-prepare")
    assert adopt_seq_len(cfg, "s3://b/prep", _manifest(256)) is cfg


def test_dataset_seq_len_beyond_the_model_is_an_error_naming_both():
    from raylm.pipeline import adopt_seq_len

    cfg = load_config(overrides=["model.max_seq_len=256"])
    with pytest.raises(DataError, match=r"^prep was prepared with seq_len 512, more than model\.max_seq_len=256"):
        adopt_seq_len(cfg, "prep", _manifest(512))


# --------------------------------------------------------------------------- what the console shows


def _ray_wrapped(cause: BaseException) -> BaseException:
    """A stand-in for a Ray task error: a class from a `ray` module, holding the cause."""
    wrapper = type("RayTaskError(DataError)", (Exception,), {"__module__": "ray.exceptions"})("traceback text")
    wrapper.cause = cause
    return wrapper


def _record(exc: BaseException | None, attach: bool) -> logging.LogRecord:
    info = (type(exc), exc, None) if exc is not None and attach else None
    return logging.LogRecord("ray.data", logging.ERROR, __file__, 1, "task failed", None, info)


@pytest.mark.parametrize("attach", [True, False])  # Ray logs some from its except block, without exc_info
def test_ray_reports_of_user_errors_are_dropped_and_of_bugs_kept(attach):
    from raylm.pipeline import _QuietUserErrors

    quiet = _QuietUserErrors()
    for exc, shown in ((_ray_wrapped(DataError("a.jsonl:3: malformed JSON")), False),
                       (_ray_wrapped(storage.StorageError("s3://b/k", "access denied")), False),
                       (_ray_wrapped(KeyError("bug")), True), (ZeroDivisionError("bug"), True)):
        try:
            raise exc
        except BaseException:
            assert quiet.filter(_record(exc, attach)) is shown, exc
    assert sys.exc_info()[1] is None and quiet.filter(_record(None, attach))


def test_root_cause_unwraps_ray_only():
    from raylm.cli import _root_cause

    inner = DataError("a.jsonl:3: malformed JSON")
    assert _root_cause(_ray_wrapped(inner)) is inner
    try:  # raylm's errors explain the library error they are raised from: they are the root
        try:
            raise ConnectionRefusedError("refused")
        except OSError as e:
            raise storage.StorageError("s3://b/k", "cannot reach the S3 endpoint") from e
    except storage.StorageError as e:
        assert _root_cause(e) is e
        assert _root_cause(_ray_wrapped(e)) is e


def test_a_training_worker_keeps_ray_trains_traceback_of_a_bad_record_off_the_console():
    """What a Ray Train worker does when the training function raises: log the traceback on
    Ray Train's logger, from inside the except block, to the console handler Ray Train's
    worker log set-up gave it. After raylm's set-up in the worker, a bad record's traceback
    is dropped; a bug's is printed."""
    from raylm.train_ray import _quiet_ray_train_logs

    train_log = logging.getLogger("ray.train")
    saved = train_log.handlers[:], train_log.propagate, train_log.level
    console = io.StringIO()
    train_log.handlers, train_log.propagate = [logging.StreamHandler(console)], False
    try:
        _quiet_ray_train_logs()
        for exc in (DataError("a.jsonl:3: malformed JSON"), KeyError("a bug")):
            try:
                raise exc
            except BaseException:
                logging.getLogger("ray.train.v2._internal.util").error("Error in training function: %r", exc)
    finally:
        train_log.handlers, train_log.propagate = saved[0], saved[1]
        train_log.setLevel(saved[2])
    assert console.getvalue() == "Error in training function: KeyError('a bug')\n"


def test_root_cause_prefers_the_rank_that_failed_with_the_users_mistake():
    """Rank 0 crashed in a collective its peer left; rank 1 read the bad record: the one line
    is rank 1's, not rank 0's traceback."""
    from ray.train import TrainingFailedError, WorkerGroupError

    from raylm.cli import _root_cause

    bad = DataError("a.jsonl:3: malformed JSON")
    crash = RuntimeError("Connection closed by peer")
    group = WorkerGroupError("Training failed due to worker errors", {0: crash, 1: _ray_wrapped(bad)})
    assert _root_cause(group) is bad
    failed = TrainingFailedError("training failed")
    failed.__cause__ = group
    assert _root_cause(failed) is bad
    assert _root_cause(WorkerGroupError("x", {0: crash, 1: RuntimeError("also")})) is crash
