"""Files raylm reads from a directory others can write (a downloaded Hugging Face checkpoint, a
shared run or export directory): a crafted one ends in one line naming it, before anything
is built or allocated from what it claims, never in a traceback or an hour of work.

Each case goes through the real entry point (`raylm pretrain --init-from-hf DIR`, checked
before any cluster work) on raylm's own export of the session's tiny run, then altered.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from raylm import cli
from raylm.errors import ConfigError

BOMB = "[" * 100_000 + "]" * 100_000  # past the JSON parser's recursion limit


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory):
    from raylm.export.hf import export_run

    root = tmp_path_factory.mktemp("hf")
    return {"single": export_run(tiny_run, str(root / "single")),
            "sharded": export_run(tiny_run, str(root / "sharded"), max_shard_bytes=40_000)}


def _pretrain(hf_dir, tiny_run, tmp_path, capsys) -> tuple[int, str]:
    rc = cli.main(["pretrain", "--init-from-hf", str(hf_dir), f"tokenizer.path={tiny_run}/tokenizer",
                   f"storage={tmp_path}/runs", "name=from-hf", "data.seq_len=64"])
    return rc, capsys.readouterr().err.strip()


def _copy(src: str, dst):
    shutil.copytree(src, dst)
    return dst


def _patch_config(d, **values):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, **values}))


@pytest.mark.parametrize("layout, name", [
    ("single", "config.json"),
    ("sharded", "model.safetensors.index.json"),
    ("single", "raylm_export.json"),
])
def test_deeply_nested_json_is_one_line(exports, tiny_run, tmp_path, capsys, layout, name):
    """'[[[[...' 100,000 deep was a RecursionError traceback from the JSON parser."""
    d = _copy(exports[layout], tmp_path / "hf")
    (d / name).write_text(BOMB)
    rc, err = _pretrain(d, tiny_run, tmp_path, capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{d}/{name}: JSON nested too deeply" in err, err


@pytest.mark.timeout(120)  # the old check built the 10^9-layer model on meta: hours, memory growing
@pytest.mark.parametrize("values, named", [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers=1000000000"),
    # Built on meta, this overflowed torch's size computation: a RuntimeError traceback.
    ({"hidden_size": 2**40, "num_attention_heads": 2**10, "head_dim": None}, "hidden_size=1099511627776"),
    ({"vocab_size": 10**12}, "vocab_size=1000000000000"),
    ({"intermediate_size": 10**12}, "intermediate_size=1000000000000"),
])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_model_larger_than_its_weights_is_refused_before_it_is_built(exports, tiny_run, tmp_path, capsys,
                                                                        layout, values, named):
    d = _copy(exports[layout], tmp_path / "hf")
    _patch_config(d, **values)
    rc, err = _pretrain(d, tiny_run, tmp_path, capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{d}/config.json: describes a model of" in err and named in err and "weight files'" in err, err


def test_unsigned_integer_weights_are_refused_by_the_header_check(exports, tiny_run, tmp_path, capsys):
    """U16/U32/U64 tensors read as float32 in the header check, so the run started and was
    refused only once a worker read the weights (Ray started, the data prepared)."""
    d = _copy(exports["single"], tmp_path / "hf")
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["model.embed_tokens.weight"]["dtype"] = "U32"  # 4 bytes an element, as F32: the offsets hold
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    args = cli.build_parser().parse_args(["pretrain", "--init-from-hf", str(d), f"tokenizer.path={tiny_run}/tokenizer",
                                          f"storage={tmp_path}/runs", "name=from-hf", "data.seq_len=64"])
    with pytest.raises(ConfigError) as e:
        cli._pretrain_config(args)  # the checks before any cluster work
    assert f"{f}: model.embed_tokens.weight is uint32; raylm reads floating-point weights only" in str(e.value)


@pytest.mark.parametrize("name", ["/etc/passwd.safetensors", "../single/model.safetensors",
                                  "s3://bucket/../model.safetensors", "..\\model.safetensors"])
def test_an_index_naming_files_outside_its_directory_is_refused(exports, tiny_run, tmp_path, capsys, name):
    """Already refused (no defect): kept so that it stays so."""
    d = _copy(exports["sharded"], tmp_path / "hf")
    (d / "raylm_export.json").unlink()  # no marker: the index alone says which files are the weights
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, err = _pretrain(d, tiny_run, tmp_path, capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"weight file {name!r} is not a .safetensors file in the directory" in err, err


def test_rope_tables_past_this_machines_memory_are_refused_before_cluster_work(exports, tiny_run, tmp_path, capsys):
    """max_position_embeddings is backed by no weight file: 10^15 passed every check, and the
    training workers' allocator ended the run with a traceback."""
    d = _copy(exports["single"], tmp_path / "hf")
    _patch_config(d, max_position_embeddings=10**15)
    args = cli.build_parser().parse_args(["pretrain", "--init-from-hf", str(d), f"tokenizer.path={tiny_run}/tokenizer",
                                          f"storage={tmp_path}/runs", "name=from-hf", "data.seq_len=64"])
    with pytest.raises(ConfigError) as e:
        cli._pretrain_config(args)  # the checks before any cluster work
    assert str(e.value).startswith(f"{d}/config.json: max_position_embeddings=1000000000000000 needs "), e.value
    assert "GiB of RoPE tables" in str(e.value) and "memory on this machine" in str(e.value)


@pytest.mark.parametrize("model", [{"dim": 2**40, "n_heads": 2**10}, {"ffn_dim": 2**62}, {"vocab_size": 2**62}])
def test_sizes_past_what_torch_can_count_in_meta_json_are_one_line(tiny_run, tmp_path, capsys, model):
    """`raylm generate` (as serving and exports load) of a checkpoint whose meta.json (its commit
    marker rewritten to match) claims a tensor of more than 2^63 bytes: building the model on
    meta to compare it with the checkpoint raised torch's RuntimeError ('Storage size
    calculation overflowed') as a traceback."""
    import hashlib

    ckpt = shutil.copytree(tiny_run, tmp_path / "run") / "ckpt-00000200"
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"].update(model)
    data = json.dumps(meta).encode()
    (ckpt / "meta.json").write_bytes(data)
    marker = json.loads((ckpt / "COMMITTED").read_text())
    marker["files"]["meta.json"] = [len(data), hashlib.sha256(data).hexdigest()]
    (ckpt / "COMMITTED").write_text(json.dumps(marker))
    rc = cli.main(["generate", str(ckpt.parent), "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{ckpt}/meta.json: its config's model does not match the checkpoint's weights: a tensor of" in err, err


def _rewrite(ckpt, name: str, data: bytes) -> None:
    """A checkpoint file replaced, and its commit marker's entry rewritten to match (what
    whoever can write the checkpoint can do)."""
    import hashlib

    (ckpt / name).write_bytes(data)
    marker = json.loads((ckpt / "COMMITTED").read_text())
    marker["files"][name] = [len(data), hashlib.sha256(data).hexdigest()]
    (ckpt / "COMMITTED").write_text(json.dumps(marker))


@pytest.mark.parametrize("name", ["meta.json", "COMMITTED", "tokenizer/tokenizer.json"])
def test_deeply_nested_json_in_a_run_is_one_line(tiny_run, tmp_path, capsys, name):
    """A run's meta.json, commit marker or tokenizer sidecar nested past the parser's limit:
    `raylm generate` (as serving and exports load) gave a RecursionError traceback."""
    run = shutil.copytree(tiny_run, tmp_path / "run")
    ckpt = run / "ckpt-00000200"
    if name == "meta.json":
        _rewrite(ckpt, name, BOMB.encode())
    else:
        (run / name if name.startswith("tokenizer") else ckpt / name).write_text(BOMB)
    rc = cli.main(["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert name.split("/")[-1] in err, err


def test_deeply_nested_run_record_and_stage_record_are_one_line_or_foreign(tmp_path, capsys):
    import types

    from raylm.config import S3Config
    from raylm.recipe import STAGE_RECORDS, read_stage_record
    from raylm.record import load_record

    bomb = tmp_path / "record.json"
    bomb.write_text(BOMB)
    with pytest.raises(ConfigError, match=r"not a JSON run record \(nested too deeply to read\)"):
        load_record(str(bomb))
    assert cli.main(["pretrain", "--from-record", str(bomb)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    (tmp_path / STAGE_RECORDS).mkdir()
    (tmp_path / STAGE_RECORDS / "pretrain.json").write_text(BOMB)  # a broken stage record is foreign: the stage reruns
    assert read_stage_record(types.SimpleNamespace(root=str(tmp_path)), "pretrain", S3Config()) is None


def test_a_hugging_face_directory_given_as_a_run_says_how_to_start_from_it(exports, tmp_path, capsys):
    """`raylm sft --from HF_DIR` (or generate, export): no raylm checkpoint there; the error
    says how a Hugging Face model becomes a run."""
    assert cli.main(["sft", "--from", exports["single"], "--data", str(tmp_path / "chat.jsonl"),
                     f"storage={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "it is a Hugging Face model directory" in err and "--init-from-hf" in err, err


@pytest.mark.parametrize("body", ['{"key": "k", "outputs": []}', '{"key": "k"}', '["not", "a", "record"]'])
def test_a_stage_record_of_another_shape_is_foreign(tmp_path, body):
    """A stage record whose outputs are not a mapping (altered, or another tool's file) was a
    KeyError or AttributeError traceback in `raylm run`; it is foreign, and the stage reruns."""
    import types

    from raylm.config import S3Config
    from raylm.recipe import STAGE_RECORDS, read_stage_record

    (tmp_path / STAGE_RECORDS).mkdir()
    (tmp_path / STAGE_RECORDS / "pretrain.json").write_text(body)
    assert read_stage_record(types.SimpleNamespace(root=str(tmp_path)), "pretrain", S3Config()) is None
