"""Files raylm reads from an s3:// prefix others can write: a crafted one ends in one line
naming it, before any cluster work (see tests/unit/test_untrusted_inputs.py for local ones)."""

from __future__ import annotations

import json
import shutil

import pytest

from raylm import cli, storage
from raylm.errors import ConfigError, OutputExistsError

pytestmark = pytest.mark.integration

BOMB = "[" * 100_000 + "]" * 100_000  # past the JSON parser's recursion limit


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory):
    from raylm.export.hf import export_run

    return export_run(tiny_run, str(tmp_path_factory.mktemp("hf") / "single"))


@pytest.mark.timeout(120)  # the old check let it through; a worker then built 10^9 layers
@pytest.mark.parametrize("values", [{"num_hidden_layers": 10**9}, {"hidden_size": 2**40, "num_attention_heads": 2**10,
                                                                     "head_dim": None}])
def test_a_model_larger_than_its_weights_in_s3_is_refused_before_cluster_work(export, tiny_run, tmp_path, s3_prefix,
                                                                              values):
    local = shutil.copytree(export, tmp_path / "hf")
    config = json.loads((local / "config.json").read_text())
    (local / "config.json").write_text(json.dumps({**config, **values}))
    uri = f"{s3_prefix}/hf"
    storage.upload_dir(str(local), uri)
    args = cli.build_parser().parse_args(["pretrain", "--init-from-hf", uri, f"tokenizer.path={tiny_run}/tokenizer",
                                          f"storage={tmp_path}/runs", "name=from-hf", "data.seq_len=64"])
    with pytest.raises(ConfigError) as e:
        cli._pretrain_config(args)  # the checks before any cluster work
    assert str(e.value).startswith(f"{uri}/config.json: describes a model of"), e.value
    assert "weight files'" in str(e.value) and "\n" not in str(e.value)


def test_a_deeply_nested_pending_upload_list_is_one_line(tiny_run, s3_prefix):
    """The file list of a failed upload, read to clear the prefix for a retry: '[[[[...' there
    was a RecursionError traceback."""
    from raylm.export.hf import PENDING_MARKER, export_run

    out = f"{s3_prefix}/export"
    storage.write_text(storage.join(out, PENDING_MARKER), BOMB)
    with pytest.raises(OutputExistsError) as e:
        export_run(tiny_run, out)
    assert str(e.value).startswith(f"{out}/{PENDING_MARKER}: not a raylm export's file list"), e.value
