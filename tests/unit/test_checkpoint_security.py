"""Loading a checkpoint never runs code and never reads outside it, whatever its files hold.

Every hostile file here is built in the test, written into a real checkpoint, and then the
commit marker is rewritten to match it (an attacker who can write one file can write the
marker too), so the unpickler itself is what must refuse. Each payload would create a
marker file; each test checks that it does not exist afterwards.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shlex
import subprocess
import sys

import pytest
import torch

from raylm import checkpoint
from raylm.checkpoint import CheckpointError, UnsafeCheckpointError
from tests.unit.test_checkpoint import CFG, saved
from raylm.model import build_model
from raylm.config import TrainConfig
from raylm.train import make_optimizer

# The modules whose names the metadata allowlist holds: a dotted name under any of them
# (pickle protocol 4 resolves `os.system` through the module's own `import os`) must fail.
ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem", "torch",
                   "torch.serialization", "pathlib")


def _touch(marker) -> str:
    return f"touch {shlex.quote(str(marker))}"


class Exploit:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _unicode(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def stack_global(module: str, name: str, cmd: str) -> bytes:
    """PROTO 4, STACK_GLOBAL module name, (cmd,), REDUCE."""
    return b"\x80\x04" + _unicode(module) + _unicode(name) + b"\x93" + _unicode(cmd) + b"\x85R."


def text_global(module: str, name: str, cmd: str, proto: int = 4) -> bytes:
    """GLOBAL 'module\\nname' under PROTO `proto` (dotted names resolve from protocol 4)."""
    return (b"\x80" + bytes([proto]) + b"c" + f"{module}\n{name}\n".encode() + _unicode(cmd) + b"\x85R.")


def reduce_on_allowed(cmd: str) -> bytes:
    """An allowed callable (torch.Size) REDUCEd over an argument that is itself a payload."""
    inner = pickle.dumps(Exploit(cmd), protocol=4)[2:-1]  # drop PROTO and STOP
    return b"\x80\x04" + _unicode("torch") + _unicode("Size") + b"\x93" + inner + b"\x85\x85R."


def build_with_payload(cmd: str) -> bytes:
    """A Metadata object (NEWOBJ on an allowed class) whose BUILD state hides a payload."""
    from torch.distributed.checkpoint.metadata import Metadata

    md = Metadata(state_dict_metadata={"x": [1, {"y": (Exploit(cmd),)}]})
    return pickle.dumps(md, protocol=4)


def hostile_pickles(marker) -> dict[str, bytes]:
    cmd = _touch(marker)
    cases = {f"reduce-protocol-{p}": pickle.dumps(Exploit(cmd), protocol=p) for p in range(6)}
    for module in ALLOWED_MODULES:
        cases[f"stack-global-dotted-{module}"] = stack_global(module, "os.system", cmd)
        cases[f"global-dotted-{module}"] = text_global(module, "os.system", cmd)
    cases["global-proto2-posix"] = text_global("posix", "system", cmd, proto=2)
    cases["global-builtins-eval"] = text_global("builtins", "eval", f"__import__('os').system({cmd!r})")
    cases["global-torch-load"] = text_global("torch", "load", str(marker))
    cases["allowed-module-other-name"] = stack_global("torch.distributed.checkpoint.filesystem", "FileSystemReader",
                                                      cmd)
    cases["reduce-on-allowed-class"] = reduce_on_allowed(cmd)
    cases["build-with-nested-payload"] = build_with_payload(cmd)
    cases["nested-in-containers"] = pickle.dumps({"a": [(1, {"b": Exploit(cmd)})]}, protocol=4)
    return cases


def recommit(uri: str) -> None:
    checkpoint.commit(uri, {"step": 1}, files=checkpoint.file_digests(uri))


def fresh():
    model = build_model(CFG, seed=7)
    return model, make_optimizer(model, TrainConfig(), torch.device("cpu"))


def assert_refused(uri: str, error=CheckpointError, match: str = "", weights_only_too: bool = True):
    """Both loaders (model + optimizer, weights only) refuse `uri` with one line containing
    `match` (a regular expression)."""
    loads = [lambda m, o: checkpoint.load(m, o, uri)]
    if weights_only_too:
        loads.append(lambda m, o: checkpoint.load_model_weights(m, uri))
    for load in loads:
        model, opt = fresh()
        with pytest.raises(error) as info:
            load(model, opt)
        msg = str(info.value)
        assert "\n" not in msg, msg
        assert re.search(match, msg), msg
    return msg


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One real checkpoint whose files the tests copy and damage."""
    _, _, uri = saved(tmp_path_factory.mktemp("good"))
    return uri


@pytest.fixture
def ckpt(good, tmp_path):
    import shutil

    uri = str(tmp_path / "ckpt-00000001")
    shutil.copytree(good, uri)
    return uri


def test_every_hostile_metadata_pickle_is_refused_without_effect(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    cases = hostile_pickles(marker)
    assert len(cases) >= 20
    for name, payload in cases.items():
        with open(os.path.join(ckpt, ".metadata"), "wb") as f:
            f.write(payload)
        recommit(ckpt)
        msg = assert_refused(ckpt, match=re.escape(os.path.join(ckpt, ".metadata")))
        assert not marker.exists(), f"{name} ran its payload"
        if "dotted" in name or "protocol" in name or name.startswith("global"):
            assert "refuses to unpickle" in msg, (name, msg)


def test_the_payloads_do_run_under_plain_pickle(tmp_path):
    """The hostile set is real: each payload class that resolves under pickle.loads runs."""
    marker = tmp_path / "pwned"
    cases = hostile_pickles(marker)
    for name in ("reduce-protocol-0", "reduce-protocol-5", "stack-global-dotted-torch.distributed.checkpoint.filesystem",
                 "global-dotted-pathlib", "nested-in-containers"):
        pickle.loads(cases[name])
        assert marker.exists(), name
        marker.unlink()


def _metadata(uri: str):
    return checkpoint._load_metadata(os.path.join(uri, ".metadata"), {n: os.path.getsize(os.path.join(uri, n))
                                                                       for n in os.listdir(uri)})


def _rewrite_metadata(uri: str, md) -> None:
    with open(os.path.join(uri, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def _retarget(uri: str, md, kind: str, relative_path: str, offset: int, length: int):
    """Point the first entry of `kind` (bytes or tensor) at another file range."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    for index, info in md.storage_data.items():
        is_bytes = isinstance(md.state_dict_metadata[index.fqn], BytesStorageMetadata)
        if is_bytes == (kind == "bytes"):
            md.storage_data[index] = _StorageInfo(relative_path, offset, length)
            return index.fqn
    raise AssertionError(f"no {kind} entry")


def test_an_index_pointing_outside_the_checkpoint_is_refused(ckpt, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"x" * 4096)
    original = open(os.path.join(ckpt, ".metadata"), "rb").read()
    for target in (str(secret), "../secret.txt", "../../etc/passwd", "meta.json/../__0_0.distcp"):
        open(os.path.join(ckpt, ".metadata"), "wb").write(original)
        md = _metadata(ckpt)
        _retarget(ckpt, md, "tensor", target, 0, 10)
        _rewrite_metadata(ckpt, md)
        recommit(ckpt)
        assert_refused(ckpt, match="not a file of this checkpoint")
        # (also when the target exists: an absolute path or ../ never names a checkpoint file)


def test_stream_transforms_are_refused(ckpt):
    md = _metadata(ckpt)
    next(iter(md.storage_data.values())).transform_descriptors = ["zstandard"]
    _rewrite_metadata(ckpt, md)
    recommit(ckpt)
    assert_refused(ckpt, match="stream transforms")


@pytest.mark.parametrize("kind", ["bytes", "tensor"])
def test_a_hostile_entry_inside_a_shard_is_refused(ckpt, tmp_path, kind):
    """Optimizer hyper-parameters (bytes entries) and tensors are pickles inside the .distcp
    file; one replaced by a payload is refused, naming the shard."""
    marker = tmp_path / "pwned"
    shard = os.path.join(ckpt, "__0_0.distcp")
    if kind == "bytes":
        payload = pickle.dumps(Exploit(_touch(marker)))
    else:
        buf = io.BytesIO()
        torch.save(Exploit(_touch(marker)), buf)
        payload = buf.getvalue()
    offset = os.path.getsize(shard)
    with open(shard, "ab") as f:
        f.write(payload)
    md = _metadata(ckpt)
    _retarget(ckpt, md, kind, "__0_0.distcp", offset, len(payload))
    _rewrite_metadata(ckpt, md)
    recommit(ckpt)
    # A weights-only load never reads the optimizer's bytes entries; a full load must refuse.
    msg = assert_refused(ckpt, UnsafeCheckpointError, match=re.escape(shard), weights_only_too=kind == "tensor")
    assert "refuses to unpickle" in msg and "weights_only" not in msg, msg
    assert not marker.exists()


def test_a_truncated_shard_names_the_file(ckpt):
    shard = os.path.join(ckpt, "__0_0.distcp")
    data = open(shard, "rb").read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) // 2])
    expected = re.escape(f"{shard}: truncated ({len(data) // 2} bytes; the index needs")
    assert_refused(ckpt, match=expected)
    recommit(ckpt)  # a marker that agrees (a bug, or an old checkpoint): the index still catches it
    assert_refused(ckpt, match=expected)
    os.remove(os.path.join(ckpt, ".metadata"))
    assert_refused(ckpt, match=re.escape(os.path.join(ckpt, ".metadata")) + ": missing")


@pytest.mark.parametrize("where", [0.1, 0.5, 0.97])
def test_flipped_bytes_in_a_shard_name_the_file(ckpt, where):
    shard = os.path.join(ckpt, "__0_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[int(len(data) * where)] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    assert_refused(ckpt, match=re.escape(f"{shard}: content differs from the sha256 recorded at commit"))


def test_damaged_metadata_and_meta_json_are_one_line_errors(ckpt):
    path = os.path.join(ckpt, ".metadata")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 3])
    assert_refused(ckpt, match=re.escape(path) + ": .* were committed")
    recommit(ckpt)
    assert_refused(ckpt, match=re.escape(f"{path}: not readable checkpoint metadata"))


def test_meta_json_is_checked(ckpt):
    path = os.path.join(ckpt, "meta.json")
    open(path, "w").write('{"step": 1, "config": ')
    assert_refused(ckpt, match=re.escape(path) + ": .* were committed")
    recommit(ckpt)
    assert_refused(ckpt, match=re.escape(f"{path}: not valid JSON"))


def test_a_checkpoint_without_its_marker_is_not_loaded(ckpt):
    os.remove(os.path.join(ckpt, checkpoint.COMMIT_MARKER))
    assert_refused(ckpt, match="no COMMITTED marker")


def test_every_committed_checkpoint_reads_back(good):
    """What raylm writes loads through the hardened reader (the multi-rank FSDP2 case is
    loaded in the recovery and resharding integration tests, through the same reader)."""
    model, opt = fresh()
    assert checkpoint.load(model, opt, good)["step"] == 1


def test_generate_on_a_hostile_checkpoint_prints_one_line(ckpt, tmp_path):
    """Through the real command line: exit 2, one line naming the file, no payload run."""
    import json

    from raylm.config import Config, DataConfig, to_dict

    marker = tmp_path / "pwned"
    meta = {"step": 1, "config": to_dict(Config(model=CFG, data=DataConfig(seq_len=16))), "tokenizer": "",
            "tokenizer_sha256": ""}
    with open(os.path.join(ckpt, "meta.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        f.write(stack_global("torch.distributed.checkpoint.filesystem", "os.system", _touch(marker)))
    recommit(ckpt)
    proc = subprocess.run([sys.executable, "-m", "raylm.cli", "generate", ckpt], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("raylm: error:")]
    assert len(errors) == 1 and ".metadata: refuses to unpickle" in errors[0], proc.stderr[-2000:]
    assert not marker.exists()


def test_struct_helpers_build_valid_pickles():
    """The hand-assembled opcodes are well-formed: with a harmless global they load."""
    assert pickle.loads(stack_global("builtins", "len", "abc")) == 3
    assert pickle.loads(text_global("builtins", "len", "abcd", proto=2)) == 4
