"""SFT and DPO hold out data.val_fraction of their records and read no separate validation
file: a data.val_path given to them was silently ignored (the held-out file never read, the
run validating on a share of data.path). It is refused in one line; in a recipe, the shared
data.val_path (the pre-training corpus's held-out part) does not reach those stages."""

from __future__ import annotations

import pytest

from raylm.config import ConfigError, load_config
from raylm.recipe import load_recipe, stage_config


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_validation_file_for_post_training_is_refused(tmp_path, stage):
    overrides = [f"stage={stage}", "data.path=chat.jsonl", "data.val_path=heldout.jsonl", f"storage={tmp_path}"]
    if stage == "dpo":
        overrides.append("init_from=runs/sft")
    with pytest.raises(ConfigError, match=r"^data.val_path='heldout.jsonl': stage=\w+ holds out data.val_fraction"):
        load_config(overrides=overrides)


def test_a_recipes_shared_validation_file_stays_with_pre_training(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\ndata: {{path: corpus.txt, val_path: heldout.txt}}\n"
                    "stages:\n  pretrain: {}\n  sft: {data.path: chat.jsonl}\n")
    recipe = load_recipe(str(path))
    pre, sft = (next(s for s in recipe.stages if s.name == n) for n in ("pretrain", "sft"))
    placeholder = {"pretrain": {"path": "p", "checkpoint": "p/ckpt", "corpus": ""}}
    assert stage_config(recipe, pre, {}).data.val_path == "heldout.txt"
    assert stage_config(recipe, sft, placeholder).data.val_path == ""
    path.write_text(path.read_text().replace("sft: {data.path: chat.jsonl}",
                                             "sft: {data: {path: chat.jsonl, val_path: v.jsonl}}"))
    with pytest.raises(ConfigError, match="data.val_path='v.jsonl': stage=sft"):
        load_recipe(str(path))
