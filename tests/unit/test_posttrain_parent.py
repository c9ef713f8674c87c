"""Post-training takes its parent's model (raylm.posttrain.parent_of): a model.* setting that
differs from the parent's is refused by name rather than dropped, a setting equal to it is
fine, and data.seq_len is checked against the parent's context, not the default model's."""

from __future__ import annotations

import pytest

from raylm.config import ConfigError, load_config
from raylm.posttrain import parent_of


def sft_config(tiny_run, *overrides):
    return load_config(overrides=["stage=sft", f"init_from={tiny_run}", *overrides])


def test_a_model_setting_that_differs_from_the_parent_is_named(tiny_run):
    with pytest.raises(ConfigError, match=r"^model\.dim=32: sft keeps the parent's model shape \(model\.dim=64 in "):
        parent_of(sft_config(tiny_run, "model.dim=32"))
    cfg, _ = parent_of(sft_config(tiny_run, "model.dim=64", "model.n_layers=2"))  # the parent's own: fine
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_kv_heads) == (64, 2, 2)


def test_data_seq_len_is_checked_against_the_parents_context(tiny_run):
    cfg = sft_config(tiny_run, "data.seq_len=500")  # over the default model's 256: not this run's model
    with pytest.raises(ConfigError, match=r"data\.seq_len=500 exceeds the parent's model\.max_seq_len=128"):
        parent_of(cfg)
    cfg, _ = parent_of(sft_config(tiny_run, "data.seq_len=100"))
    assert cfg.data.seq_len == 100 and cfg.model.max_seq_len == 128


def _copy_run(tiny_run, dest):
    import shutil

    return shutil.copytree(tiny_run, dest / "parent")


def test_init_from_is_pinned_to_the_resolved_checkpoint(tiny_run, tmp_path):
    """Workers load cfg.init_from at each (re)start: a parent that gains a checkpoint meanwhile
    must change neither the policy's start nor DPO's live reference."""
    import shutil

    from raylm.model import build_model
    from raylm.train import load_parent_weights

    parent = _copy_run(tiny_run, tmp_path)
    cfg, facts = parent_of(load_config(overrides=["stage=dpo", f"init_from={parent}", "data.seq_len=64",
                                                  f"storage={tmp_path}/runs"]))
    assert facts["checkpoint"] == str(parent / "ckpt-00000200") and cfg.init_from == facts["checkpoint"]
    shutil.copytree(parent / "ckpt-00000200", parent / "ckpt-00000300")  # the parent trains on
    assert load_parent_weights(build_model(cfg.model, seed=0), cfg) == facts["checkpoint"]


def test_a_resumed_run_keeps_the_parent_its_record_names(tiny_run, tmp_path):
    import json
    import shutil

    from raylm.posttrain import recorded_parent

    parent = _copy_run(tiny_run, tmp_path)
    cfg = load_config(overrides=["stage=sft", f"init_from={parent}", "data.seq_len=64", f"storage={tmp_path}/runs",
                                 "name=sft"])
    assert recorded_parent(cfg, "auto") is None  # a fresh run resolves its parent
    first = str(parent / "ckpt-00000200")
    run = tmp_path / "runs" / "sft"
    shutil.copytree(first, run / "ckpt-00000010")  # a checkpoint of the run's own to resume from
    (run / "record.json").write_text(json.dumps({"stage": "sft", "parent": {"checkpoint": first}}))
    shutil.copytree(first, parent / "ckpt-00000300")  # the parent trained on since
    assert recorded_parent(cfg, "never") is None
    pinned = recorded_parent(cfg, "auto")
    resumed, facts = parent_of(cfg, pinned)
    assert facts["checkpoint"] == resumed.init_from == first
    assert parent_of(cfg)[1]["checkpoint"] == str(parent / "ckpt-00000300")  # what a fresh start would take
    other = load_config(overrides=["stage=sft", f"init_from={tmp_path}/other", f"storage={tmp_path}/runs", "name=sft"])
    with pytest.raises(ConfigError, match=rf"^--from {tmp_path}/other: run .*/sft started from {first} and resumes"):
        parent_of(other, pinned)
    (run / "record.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"record\.json: not valid JSON"):
        recorded_parent(cfg, "auto")


def test_a_parent_trained_with_settings_a_later_raylm_refuses_is_still_a_parent(tiny_run, tmp_path):
    """A checkpoint's recorded config is read, not validated again (config.recorded_config):
    a training setting refused since it trained (a warmup past max_steps) must not make the
    run unusable as a parent, for inference or for evaluation; its model is still checked."""
    import json

    from raylm.eval.pool import make_runner
    from raylm.generate import load_for_inference

    parent = _copy_run(tiny_run, tmp_path)
    meta_path, marker = parent / "ckpt-00000200" / "meta.json", parent / "ckpt-00000200" / "COMMITTED"

    def write(meta):  # as a run that trained so would have committed it (COMMITTED: each file's size and sha256)
        import hashlib

        data = json.dumps(meta).encode()
        meta_path.write_bytes(data)
        commit = json.loads(marker.read_text())
        commit["files"]["meta.json"] = [len(data), hashlib.sha256(data).hexdigest()]
        marker.write_text(json.dumps(commit))

    meta = json.loads(meta_path.read_text())
    meta["config"]["train"].update(max_steps=40, warmup_steps=100)  # refused at load today
    write(meta)
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(base=meta["config"])
    cfg, facts = parent_of(sft_config(str(parent), "data.seq_len=64"))
    assert facts["stage"] == "pretrain" and cfg.model.dim == 64
    assert load_for_inference(str(parent))[0].cfg.dim == 64
    assert make_runner(str(parent)).max_seq_len == 128
    meta["config"]["model"]["dim"] = -1  # the model itself is still checked
    write(meta)
    with pytest.raises(ConfigError, match=r"model\.dim"):
        parent_of(sft_config(str(parent), "data.seq_len=64"))


def test_a_model_setting_at_its_default_is_refused_where_the_parent_differs(tiny_run, tmp_path, capsys):
    """`raylm sft --from RUN model.dim=128` on a dim-64 parent: 128 is the default, so the value
    alone could not tell it from no setting, and it was dropped without a word. The command
    line's keys (and its --config's) say it was set."""
    from raylm.cli import main

    (tmp_path / "c.yaml").write_text("model:\n  n_layers: 4\n")
    for argv in (["model.dim=128"], ["--config", str(tmp_path / "c.yaml")]):
        assert main(["sft", "--from", str(tiny_run), "--data", str(tmp_path / "chat.jsonl"),
                     f"storage={tmp_path}", *argv]) == 2
        err = capsys.readouterr().err
        assert "sft keeps the parent's model shape" in err and ("model.dim=128" in err or "model.n_layers=4" in err), err
    with pytest.raises(ConfigError, match=r"^model\.dim=128: sft keeps"):
        parent_of(sft_config(tiny_run, "model.dim=128"), given=frozenset({"model.dim"}))
    parent_of(sft_config(tiny_run), given=frozenset())  # nothing set: the parent's shape, no word
