"""Recipes (raylm/recipe.py): what a stage reads and when it counts as done. A stage section
cannot give what the pipeline sets itself, a command-line override reaches the stages it names
or is refused, the stage key leaves out how a stage is retried, a stage is skipped only when
its inputs are the ones it ran with, and settings a stage would refuse hours in are refused
as the recipe loads. No Ray: the stages that run are stand-ins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from pathlib import Path

import pytest

import raylm.recipe as R
from raylm.config import ConfigError
from raylm.recipe import STAGE_BY_NAME, load_recipe, run_recipe, stage_config, stage_key

BASE = """
name: t
storage: {storage}
model: {{preset: tiny}}
stages:
  tokenizer: {{tokenizer.vocab_size: 300}}
  data: {{}}
  pretrain: {{train.max_steps: 10}}
  sft: {{synthetic: word_after, train.max_steps: 5}}
  dpo: {{synthetic: word_after}}
  eval: {{}}
  export: {{format: hf}}
  serve: {{serve.port: 8001}}
"""


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def _refused(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_recipe(path, list(overrides))
    assert "r.yaml" in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


def test_the_data_stage_prepares_the_shared_corpus_not_the_tokenizer_sample(tmp_path):
    """A tokenizer section's own data.path (a sample to train it on) is not the corpus."""
    text = f"name: t\nstorage: {tmp_path}\ndata: {{path: /c/big.txt}}\n" \
           "stages:\n  tokenizer: {data.path: /c/sample.txt}\n  data: {}\n"
    recipe = load_recipe(_write(tmp_path, text))
    tok = {"path": "/t/tokenizer", "sha256": "0" * 64, "corpus": "/c/sample.txt"}
    assert stage_config(recipe, STAGE_BY_NAME["data"], {"tokenizer": tok}).data.path == "/c/big.txt"
    # No corpus named anywhere: the built-in one the tokenizer stage wrote is the recipe's.
    recipe = load_recipe(_write(tmp_path, f"name: t\nstorage: {tmp_path}\nstages:\n  tokenizer: {{}}\n  data: {{}}\n"))
    tok["corpus"] = "/t/corpus/tiny.txt"
    assert stage_config(recipe, STAGE_BY_NAME["data"], {"tokenizer": tok}).data.path == "/t/corpus/tiny.txt"


def test_eval_default_corpus_is_the_shared_one(tmp_path, monkeypatch):
    import raylm.eval.run as eval_run
    from raylm.config import Config, DataConfig

    seen = {}

    def fake_evaluate(ckpt, cfg, tasks, corpora, limit, out, log):
        seen["corpora"] = corpora
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "r.json").write_text("{}")
        return {"paths": {"json": str(Path(out) / "r.json")}}

    monkeypatch.setattr(eval_run, "evaluate_run", fake_evaluate)
    inputs = {"pretrain": {"checkpoint": "/ck"}, "tokenizer": {"corpus": "/c/sample.txt"}}
    cfg = Config(data=DataConfig(path="/c/big.txt"))
    R.run_eval(R.StageRun("eval", cfg, {}, inputs, str(tmp_path / "eval"), str(tmp_path), print, None))
    assert seen["corpora"] == ["/c/big.txt"]


@pytest.mark.parametrize("override, message", [
    ("stages.pretrain.name=mine", "stages.pretrain.name: the recipe names each stage's directory"),
    ("stages.data.storage=/elsewhere", "stages.data.storage: every stage writes under the top-level storage"),
    ("stages.pretrain.data.path=/my/prepared", "stages.pretrain.data.path: the recipe sets it to the data stage's"),
    ("stages.data.tokenizer.path=/my/tok", "stages.data.tokenizer.path: the recipe sets it to the tokenizer stage's"),
    ("stages.eval.tokenizer.path=/my/tok", "stages.eval.tokenizer.path: the recipe sets it to the tokenizer stage's"),
    ("stages.sft.init_from=/another/run", "stages.sft.init_from: the recipe sets it to the pretrain stage's run"),
    ("stages.dpo.init_from=/another/run", "stages.dpo.init_from: the recipe sets it to the sft stage's run"),
    ("stages.pretrain.serve.port=9000", "stages.pretrain.serve.port: only the serve stage reads serve.* keys"),
    ("stages.sft.data.path=/chat.jsonl", "stages.sft.data.path: synthetic: writes the records it would name"),
    ("stages.sft.stage=dpo", "stages.sft.stage: the recipe sets it from the stage's name"),
    ("stage=sft", "stage='sft': the recipe sets it for each stage"),
])
def test_keys_the_pipeline_sets_are_refused_in_a_section(tmp_path, override, message):
    assert message in _refused(_write(tmp_path, BASE.format(storage=tmp_path)), [override])


def test_keys_the_pipeline_leaves_alone_are_taken(tmp_path):
    # Without a data stage, pre-training reads the prepared dataset it names; without a model
    # stage before it, dpo starts from the run it names; the tokenizer stage adopts a tokenizer.
    text = f"name: t\nstorage: {tmp_path}\nstages:\n  tokenizer: {{tokenizer.path: /my/tok}}\n" \
           "  pretrain: {data.path: /my/prepared}\n"
    recipe = load_recipe(_write(tmp_path, text))
    pre = stage_config(recipe, STAGE_BY_NAME["pretrain"], {"tokenizer": {"path": "/my/tok"}})
    assert pre.data.path == "/my/prepared"
    text = f"name: t\nstorage: {tmp_path}\nstages:\n  dpo: {{synthetic: word_after, init_from: /sft/run}}\n"
    assert stage_config(load_recipe(_write(tmp_path, text)), STAGE_BY_NAME["dpo"], {}).init_from == "/sft/run"


def test_a_shared_override_a_section_shadows_is_refused(tmp_path):
    path = _write(tmp_path, BASE.format(storage=tmp_path))
    message = _refused(path, ["train.max_steps=4"])
    assert "override train.max_steps=4: stages pretrain, sft set train.max_steps themselves" in message
    assert "give stages.pretrain.train.max_steps=4 stages.sft.train.max_steps=4 instead" in message
    # Where no section sets it, it reaches every stage; given per stage as well, it is consistent.
    recipe = load_recipe(path, ["train.max_steps=4", "stages.pretrain.train.max_steps=4",
                                "stages.sft.train.max_steps=4"])
    for name in ("pretrain", "sft", "dpo"):
        stage = STAGE_BY_NAME[name]
        inputs = {s: {"path": f"/{s}", "checkpoint": f"/{s}/ck", "corpus": ""} for s in recipe.inputs_of(stage)}
        assert stage_config(recipe, stage, inputs).train.max_steps == 4, name
    # sft and dpo read their own records, never the shared data.path (the corpus).
    text = BASE.format(storage=tmp_path).replace("sft: {synthetic: word_after,", "sft: {data.path: /chat.jsonl,")
    load_recipe(_write(tmp_path, text), ["data.path=/corpus.txt"])
    text = BASE.format(storage=tmp_path).replace("tokenizer: {", "tokenizer: {data.path: /sample.txt, ")
    assert "stages tokenizer set data.path themselves" in _refused(_write(tmp_path, text), ["data.path=/corpus.txt"])


def test_retries_and_samples_are_not_part_of_the_key(tmp_path):
    """A run that used up its retries, resubmitted with more, resumes its own directory."""
    path = _write(tmp_path, BASE.format(storage=tmp_path))
    before = load_recipe(path)
    after = load_recipe(path, ["stages.pretrain.max_failures=5", "stages.pretrain.samples=false",
                               "stages.sft.max_failures=2", "s3.max_attempts=3", "s3.region=eu-west-1",
                               "stages.data.s3.endpoint_url=http://127.0.0.1:9000"])
    assert {s.name: stage_key(before, s) for s in before.stages} == {s.name: stage_key(after, s) for s in after.stages}
    # What decides the outputs still does: an eval limit.
    assert stage_key(before, STAGE_BY_NAME["eval"]) != stage_key(load_recipe(path, ["stages.eval.limit=5"]),
                                                                   STAGE_BY_NAME["eval"])


def _stand_ins(monkeypatch):
    """Tokenizer and data stages that write what the real ones commit; a retrained tokenizer
    need not come out byte for byte the same."""
    def run_tok(run):
        p = Path(run.out) / "tokenizer"
        p.mkdir(parents=True, exist_ok=True)
        content = uuid.uuid4().hex
        (p / "tokenizer.json").write_text(content)
        return {"path": str(p), "sha256": hashlib.sha256(content.encode()).hexdigest(), "corpus": ""}

    def run_data(run):
        Path(run.out).mkdir(parents=True, exist_ok=True)
        (Path(run.out) / "manifest.json").write_text(run.inputs["tokenizer"]["sha256"])
        return {"path": run.out, "sha256": hashlib.sha256(run.inputs["tokenizer"]["sha256"].encode()).hexdigest()}

    runs = {"tokenizer": run_tok, "data": run_data}
    stages = tuple(dataclasses.replace(s, run=runs[s.name]) if s.name in runs else s for s in R.STAGES)
    monkeypatch.setattr(R, "STAGES", stages)
    monkeypatch.setattr(R, "STAGE_BY_NAME", {s.name: s for s in stages})


def test_a_stage_whose_input_changed_runs_again(tmp_path, monkeypatch):
    import shutil

    _stand_ins(monkeypatch)
    path = _write(tmp_path, f"name: t\nstorage: {tmp_path / 'runs'}\nstages:\n  tokenizer: {{}}\n  data: {{}}\n")
    first = run_recipe(load_recipe(path), log=lambda m: None)
    again = run_recipe(load_recipe(path), log=lambda m: None)
    assert again["tokenizer"]["skipped"] and again["data"]["skipped"]  # nothing changed
    shutil.rmtree(first["tokenizer"]["outputs"]["path"])  # the tokenizer is lost and trained again
    logs = []
    second = run_recipe(load_recipe(path), log=logs.append)
    tok = second["tokenizer"]["outputs"]["sha256"]
    assert not second["tokenizer"]["skipped"] and tok != first["tokenizer"]["outputs"]["sha256"]
    assert not second["data"]["skipped"] and second["data"]["inputs"]["tokenizer"]["sha256"] == tok
    assert "recipe: data: tokenizer changed since it ran, running it again" in logs


@pytest.mark.parametrize("override, message", [
    ("model.vocab_size=32000", "stages.pretrain: model.vocab_size=32000 does not match the tokenizer's 300 ids"),
    ("stages.pretrain.model.vocab_size=256", "stages.pretrain: model.vocab_size=256 is smaller than the tokenizer's"),
    ("stages.eval.limit=-5", "stages.eval.limit=-5: expected an integer >= 1"),
    ("stages.eval.limit=0", "stages.eval.limit=0: expected an integer >= 1"),
])
def test_settings_a_stage_would_refuse_later_are_refused_at_load(tmp_path, override, message):
    assert message in _refused(_write(tmp_path, BASE.format(storage=tmp_path)), [override])


def test_a_matching_vocab_and_limit_load(tmp_path):
    path = _write(tmp_path, BASE.format(storage=tmp_path))
    recipe = load_recipe(path, ["model.vocab_size=320", "stages.eval.limit=3"])
    assert recipe.sections["eval"][1] == {"limit": 3}
    # An adopted tokenizer's size is known only once it is read: not checked here.
    load_recipe(path, ["model.vocab_size=32000", "stages.tokenizer.tokenizer.path=/my/tok"])
