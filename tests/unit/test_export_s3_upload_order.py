"""An s3:// HF export cut off midway leaves no `config.json` (SeaweedFS, the tests' tiny run).

Object storage has no rename, so the export's files appear one by one. Every Hugging Face
reader starts from `config.json` (transformers, vLLM through `raylm serve --engine vllm`,
`--init-from-hf`), and none of them reads raylm's marker: `config.json` was uploaded first
(the files went in name order), so an upload cut after it left a prefix those readers took
for a model, without `tokenizer_config.json` (transformers then loads `tokenizer.model` with
no chat template, and reads the text "<|eos|>" as the EOS id) or without `tokenizer.model`.
`config.json` now goes up last of the export's files, just before the marker.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("safetensors")

from raylm import storage  # noqa: E402
from raylm.errors import ConfigError  # noqa: E402
from raylm.export.hf import EXPORT_MARKER, PENDING_MARKER, export_run  # noqa: E402
from raylm.hf import HF_CONFIG, is_hf_dir, read_hf_config  # noqa: E402


def _names(prefix: str) -> list[str]:
    return sorted(storage.relative(f.uri, prefix) for f in storage.list_files(prefix))


@pytest.fixture
def cut_before(s3_server):
    """Fail the upload of the object whose key ends with the name given, as a dropped
    connection would: boto3's own event hook on the client raylm uses."""
    client = storage.boto3_client()
    cut = set()

    def hook(params, **_):
        if any(params["Key"].endswith("/" + name) for name in cut):
            raise ConnectionError(f"connection dropped uploading {params['Key']}")

    client.meta.events.register("before-parameter-build.s3.PutObject", hook)
    yield cut
    client.meta.events.unregister("before-parameter-build.s3.PutObject", hook)


@pytest.mark.parametrize("last_file", ["tokenizer_config.json", "tokenizer.model"])
def test_an_upload_cut_midway_is_no_hf_model_and_a_retry_completes_it(tiny_run, s3_prefix, cut_before, last_file):
    out = f"{s3_prefix}/hf"
    cut_before.add(last_file)
    with pytest.raises(Exception, match="connection dropped"):
        export_run(tiny_run, out)
    left = _names(out)
    assert PENDING_MARKER in left and EXPORT_MARKER not in left  # something was uploaded
    assert HF_CONFIG not in left, f"a cut upload left {left}: readers take config.json for a model"
    assert not is_hf_dir(out)
    with pytest.raises(ConfigError, match=f"{HF_CONFIG}: not found"):
        read_hf_config(out)

    cut_before.clear()  # the network is back
    export_run(tiny_run, out)
    files = json.loads(storage.read_bytes(f"{out}/{EXPORT_MARKER}"))["files"]
    assert HF_CONFIG in files and "tokenizer_config.json" in files
    assert _names(out) == sorted(files + [EXPORT_MARKER])
    assert read_hf_config(out)["architectures"] == ["LlamaForCausalLM"]
