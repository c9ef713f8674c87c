"""A run's summary.json and a checkpoint's meta.json are strict JSON, as metrics.jsonl is: a
NaN loss (a step the non-finite guard skipped, a NaN validation loss) is null, named under
"non_finite". Before, Python's bare NaN made the whole file unreadable to jq, JavaScript or Go.
raylm's own readers take both these and older files holding NaN."""

from __future__ import annotations

import json
import math

from raylm import checkpoint
from raylm.config import load_config
from raylm.metrics import MetricsLog
from raylm.train import train_local
from tests.unit.test_train_local import OVERRIDES, blocks


def strict(text: str):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_a_checkpoint_after_a_skipped_step_writes_strict_meta_json(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLM_INJECT_FAILURE", "step=2,rank=0,kind=nan")  # step 2's loss is NaN, and skipped
    common = [f"storage={tmp_path}", "name=r", "train.ckpt_every=2", "train.async_checkpoint=false",
              *[o for o in OVERRIDES if not o.startswith("train.ckpt_every")]]
    train, val = blocks(40, 0), blocks(8, 1)
    train_local(load_config(overrides=[*common, "train.max_steps=2"]), train, val, log=lambda *_: None)
    ckpt = tmp_path / "r" / checkpoint.checkpoint_name(2)
    meta = strict((ckpt / checkpoint.META).read_text())
    assert meta["metrics"]["loss"] is None and meta["metrics"]["non_finite"]["loss"] == "NaN"
    assert meta["step"] == 2 and meta["guards"]["skipped_steps"] == 1
    said = []  # and the run resumes from it
    train_local(load_config(overrides=[*common, "train.max_steps=3"]), train, val, resume="must", log=said.append)
    assert any("resumed from" in s and ckpt.name in s for s in said), said


def test_an_older_meta_json_holding_nan_still_reads(tmp_path):
    (tmp_path / checkpoint.META).write_text('{"step": 4, "metrics": {"loss": NaN, "grad_norm": Infinity}}')
    meta = checkpoint.read_meta(str(tmp_path))
    assert meta["step"] == 4 and math.isnan(meta["metrics"]["loss"]) and meta["metrics"]["grad_norm"] == math.inf


def test_a_nan_validation_loss_writes_a_strict_summary(tmp_path):
    from raylm.pipeline import finish_report, write_summary

    cfg = load_config(overrides=[f"storage={tmp_path}", "name=r", *OVERRIDES])
    log = MetricsLog(cfg.run_dir)
    log.log({"kind": "train", "step": 2, "loss": 4.1})
    log.log({"kind": "val", "step": 2, "val_loss": math.nan, "val_tokens": 128, "val_ppl": math.nan})
    summary = finish_report(cfg, samples=False)
    assert math.isnan(summary["val_loss"])  # what the caller gets back is as it was
    write_summary(cfg, {**summary, "seconds": 1.0})
    written = strict((tmp_path / "r" / "summary.json").read_text())
    assert written["val_loss"] is None and written["val_ppl"] is None
    assert written["non_finite"] == {"val_loss": "NaN", "val_ppl": "NaN"}
    assert written["steps"] == 2 and written["seconds"] == 1.0
