"""model.max_seq_len whose RoPE tables (fp32 cos and sin for every position, built whole by
every process holding the model) outgrow this machine's memory is refused in one line naming
the key and its value, before any cluster work: typed (`raylm pretrain
model.max_seq_len=10**15`), or claimed by the meta.json of a parent (sft, dpo) or of a served
checkpoint. Each passed every check and failed in the workers' (or Serve replicas')
allocator, as a traceback. A config.json's max_position_embeddings is refused by
raylm.hf (tests/unit/test_untrusted_inputs.py), a checkpoint's by the loaders of generate and
eval (tests/unit/test_load_shapes_before_allocating.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket

import pytest

from raylm import cli
from raylm.config import ConfigError, load_config

HUGE = 10**15
MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _refusal(value: int) -> str:
    return rf"model\.max_seq_len={value} needs [\d.]+ GiB of RoPE tables \(raylm builds them for every position\), " \
           rf"more than the [\d.]+ GiB of memory on this machine$"


def test_a_typed_max_seq_len_past_memory_is_refused_before_cluster_work(tmp_path):
    args = cli.build_parser().parse_args(["pretrain", f"model.max_seq_len={HUGE}", f"storage={tmp_path}"])
    with pytest.raises(ConfigError, match="^" + _refusal(HUGE)):
        cli._pretrain_config(args)
    args = cli.build_parser().parse_args(["quickstart", f"model.max_seq_len={HUGE}", f"storage={tmp_path}"])
    with pytest.raises(ConfigError, match="^" + _refusal(HUGE)):
        cli._config(args, stage="pretrain")
    # Recipes, tune's trials and its space's extremes are built by load_config too.
    with pytest.raises(ConfigError, match="^" + _refusal(HUGE)):
        load_config(overrides=[f"model.max_seq_len={HUGE}"])


def test_the_bound_is_this_machines_memory(tmp_path):
    """Head dim 128: 512 bytes a position. The largest length whose tables fit passes, one
    more is refused; Llama 4's 10M-position context (5 GiB) fits any machine that trains it."""
    shape = ["model.dim=1024", "model.n_heads=8"]
    fits = MEMORY // 512
    load_config(overrides=[*shape, f"model.max_seq_len={fits}"])
    with pytest.raises(ConfigError, match="^" + _refusal(fits + 1)):
        load_config(overrides=[*shape, f"model.max_seq_len={fits + 1}"])
    load_config(overrides=[*shape, f"model.max_seq_len={min(10_485_760, fits)}"])


def test_data_prepare_builds_no_model_and_is_not_refused(tmp_path):
    """Its config takes model.max_seq_len=sys.maxsize (data.seq_len is checked by the run that
    trains on the data): no RoPE tables are built from it."""
    args = cli.build_parser().parse_args(["data", "prepare", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    args.overrides = [*args.overrides, ("model.max_seq_len", 2**63 - 1)]
    assert cli._config(args, check_memory=False).model.max_seq_len == 2**63 - 1


def test_sft_refuses_a_typed_max_seq_len_past_memory_by_its_size(tiny_run, tmp_path, capsys):
    rc = cli.main(["sft", "--from", str(tiny_run), "--data", str(tmp_path / "chat.jsonl"), f"storage={tmp_path}",
                   f"model.max_seq_len={HUGE}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"model.max_seq_len={HUGE} needs " in err, err


@pytest.fixture
def claims_huge(tiny_run, tmp_path):
    """A copy of the tiny run whose checkpoint's meta.json (its commit marker rewritten to
    match, as a writer would have) claims model.max_seq_len=10^15."""
    run = shutil.copytree(tiny_run, tmp_path / "huge")
    ckpt = run / "ckpt-00000200"
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["config"]["model"]["max_seq_len"] = HUGE
    data = json.dumps(meta).encode()
    (ckpt / "meta.json").write_bytes(data)
    marker = json.loads((ckpt / "COMMITTED").read_text())
    marker["files"]["meta.json"] = [len(data), hashlib.sha256(data).hexdigest()]
    (ckpt / "COMMITTED").write_text(json.dumps(marker))
    return run


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_parent_claiming_max_seq_len_past_memory_is_refused_before_cluster_work(claims_huge, stage):
    from raylm.posttrain import parent_of

    cfg = load_config(overrides=[f"stage={stage}", f"init_from={claims_huge}"])
    with pytest.raises(ConfigError, match=f"^{claims_huge}/ckpt-00000200: " + _refusal(HUGE)):
        parent_of(cfg)


def test_serving_a_checkpoint_claiming_max_seq_len_past_memory_is_refused_before_ray_starts(claims_huge, capsys):
    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = ray.is_initialized()  # by another test of this session, perhaps
    rc = cli.main(["serve", str(claims_huge), "--port", str(port)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{claims_huge}/ckpt-00000200/meta.json: model.max_seq_len={HUGE} needs " in err, err
    assert ray.is_initialized() == started
