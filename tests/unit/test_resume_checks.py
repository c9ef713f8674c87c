"""Resuming refuses, in one line, a run whose model, seed, tokenizer or data differ from the
checkpoint's (a smaller model resumed silently, a larger one failed inside DCP with a
traceback, other data or seed went on from the old data position); settings that may change
on resume still do."""

import json

import pytest

from raylm import checkpoint
from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.train import lr_at, train_local
from tests.unit.test_train_local import OVERRIDES, blocks

QUIET = {"log": lambda *_: None}


def manifest(key="a" * 64, tokenizer="t" * 64) -> dict:
    return {"key": key, "tokenizer_sha256": tokenizer, "eos_id": 0, "columns": ["tokens"]}


def run(tmp_path, *extra, rows=0, **kw):
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=r", *OVERRIDES, *extra])
    return train_local(cfg, blocks(40, rows), blocks(8, 1), **QUIET, **kw)


@pytest.fixture
def first(tmp_path):
    """A run of 3 steps, checkpointed at step 3, on dataset key a... with tokenizer t..."""
    run(tmp_path, "train.max_steps=3", manifest=manifest())
    return str(tmp_path / "r" / "ckpt-00000003")


def untouched(tmp_path):
    """Nothing of the run changed: no new checkpoint, the metrics as they were."""
    assert [s for s, _, _ in checkpoint.list_checkpoints(str(tmp_path / "r"))] == [3]
    assert max(json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("change,was,now", [
    ("model.dim=64", "model.dim=32", "64"),  # was: ValueError (size mismatch) from DCP
    ("model.n_layers=3", "model.n_layers=2", "3"),  # was: RuntimeError (missing key) from DCP
    ("model.n_layers=1", "model.n_layers=2", "1"),  # was: resumed silently, a layer dropped
    ("model.vocab_size=128", "model.vocab_size=64", "128"),
])
def test_a_changed_model_is_refused_before_loading(tmp_path, first, change, was, now):
    with pytest.raises(ConfigError) as e:
        run(tmp_path, "train.max_steps=6", change, manifest=manifest())
    msg = str(e.value)
    assert msg.startswith(f"{first}: written with {was}, now {now}; resuming needs the same model"), msg
    assert "another name=" in msg and "\n" not in msg
    untouched(tmp_path)


def test_another_seed_is_refused(tmp_path, first):
    with pytest.raises(ConfigError, match=r"written with seed=1337, now 7; .* another name= "
                                          rf"\(with init_from={tmp_path}/r to start from its weights\)"):
        run(tmp_path, "train.max_steps=6", "seed=7", manifest=manifest())
    untouched(tmp_path)


def test_other_data_is_refused_naming_both_keys(tmp_path, first):
    with pytest.raises(ConfigError) as e:
        run(tmp_path, "train.max_steps=6", rows=5, manifest=manifest(key="b" * 64))
    msg = str(e.value)
    assert f"{first}: written with data_key={'a' * 16} (data.path=" in msg, msg
    assert f", now {'b' * 16} (data.path=" in msg and "init_from=" in msg, msg
    # The same data.path on both sides: the message says what else the key covers (an upgrade's
    # data.CLEANING, say), where it read as a refusal of nothing that changed.
    assert "data.CLEANING" in msg, msg
    untouched(tmp_path)


def test_another_tokenizer_is_refused(tmp_path, first):
    with pytest.raises(ConfigError, match=f"written with tokenizer_sha256={'t' * 16} .*, now {'u' * 16} "):
        run(tmp_path, "train.max_steps=6", manifest=manifest(tokenizer="u" * 64))
    untouched(tmp_path)


def test_settings_that_may_change_on_resume_do(tmp_path, first):
    """The schedule, the optimizer's settings and the intervals take effect from the next step;
    a checkpoint that recorded no data key (older, or written without a manifest) resumes on
    any data."""
    changes = ["train.max_steps=5", "train.lr=0.05", "train.weight_decay=0.0", "train.beta2=0.99",
               "train.grad_clip=0.5", "train.log_every=2", "train.ckpt_every=5"]
    assert run(tmp_path, *changes, manifest=manifest())["step"] == 5
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    tc = load_config(overrides=[*OVERRIDES, *changes]).train
    assert train[-1]["lr"] == lr_at(4, tc)  # the new schedule
    run(tmp_path, "train.max_steps=6", "name=plain")  # no manifest: no data key recorded
    run(tmp_path, "train.max_steps=7", "name=plain", manifest=manifest(key="c" * 64))
