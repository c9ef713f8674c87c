"""Recipes (raylm/recipe.py): what a stage would refuse once the stages before it ran is refused
as the recipe loads (`raylm run --check`), the data stage prepares the corpus and never the
tokenizer's sample, and a tokenizer upload cut short is trained again rather than read.
No Ray."""

from __future__ import annotations

import pytest

from raylm.recipe import STAGE_BY_NAME, load_recipe, run_recipe, stage_config
from tests.unit.test_recipe_stages import _refused, _write


def test_a_serve_engine_the_recipe_cannot_run_is_refused_at_load(tmp_path, capsys):
    """serve.engine=vllm passed --check, then failed in the serve stage after every model stage."""
    from raylm.cli import main

    path = _write(tmp_path, f"name: t\nstorage: {tmp_path}\nstages:\n  pretrain: {{train.max_steps: 2}}\n"
                            "  serve: {serve.port: 8001}\n")
    message = _refused(path, ["stages.serve.serve.engine=vllm"])
    assert "stages.serve: serve.engine=vllm serves an HF export" in message
    assert main(["run", path, "--check", "stages.serve.serve.engine=vllm"]) == 2
    assert "serve.engine=vllm" in capsys.readouterr().err
    load_recipe(path, ["stages.serve.serve.engine=raylm"])


def test_the_data_stage_never_prepares_the_tokenizer_sample(tmp_path):
    """With no corpus named, the data stage took the tokenizer section's data.path (a sample
    to train the tokenizer on) as the corpus to pre-train on."""
    text = f"name: t\nstorage: {tmp_path}\nstages:\n  tokenizer: {{data.path: /c/sample.txt}}\n  data: {{}}\n"
    message = _refused(_write(tmp_path, text))
    assert "stages.data: no corpus to prepare (stages.tokenizer.data.path is the tokenizer's sample" in message
    # The corpus named, shared or in the data section: prepared, the sample only trains the tokenizer.
    tok = {"path": "/t/tokenizer", "sha256": "0" * 64, "corpus": "/c/sample.txt"}
    for override in ("stages.data.data.path=/c/big.txt", "data.path=/c/big.txt"):
        text_ = text if override.startswith("stages") else text.replace("stages:", "data: {path: /c/big.txt}\nstages:")
        recipe = load_recipe(_write(tmp_path, text_), [override] if override.startswith("stages") else [])
        assert stage_config(recipe, STAGE_BY_NAME["data"], {"tokenizer": tok}).data.path == "/c/big.txt"


def test_a_data_stage_without_a_tokenizer_or_corpus_is_refused_at_load(tmp_path):
    path = _write(tmp_path, f"name: t\nstorage: {tmp_path}\nstages:\n  data: {{data.path: /c/big.txt}}\n")
    assert "stages.data: needs a tokenizer stage before it, or tokenizer.path" in _refused(path)
    load_recipe(path, ["tokenizer.path=/my/tok"])
    assert "stages.data: no corpus to prepare (give data.path" in _refused(
        _write(tmp_path, f"name: t\nstorage: {tmp_path}\nstages:\n  data: {{tokenizer.path: /t}}\n"))


def test_an_eval_stage_with_nothing_to_evaluate_is_refused_at_load(tmp_path):
    """No tasks, no corpora, no tokenizer stage and no shared corpus: the eval stage failed
    with 'nothing to evaluate' only after pre-training."""
    path = _write(tmp_path, f"name: t\nstorage: {tmp_path}\nstages:\n"
                            "  pretrain: {data.path: /c/big.txt, train.max_steps: 2}\n  eval: {}\n")
    assert "stages.eval: nothing to evaluate" in _refused(path)
    for fix in ("stages.eval.corpora=[/c/val.txt]", "stages.eval.tasks=[hellaswag]", "data.path=/c/big.txt",
                "stages.eval.eval.mc_tasks=[/t/arc.jsonl]"):
        load_recipe(path, [fix])


def test_a_tokenizer_upload_cut_short_is_trained_again(tmp_path):
    """An s3:// tokenizer upload writes tokenizer.json before tokenizer.model; a job stopped
    between them left tokenizer.json alone, which the stage took for a finished tokenizer and
    failed to read on every resubmission. (The state is made here in a local directory.)"""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about ray, tokens and tests" for i in range(400)))
    path = _write(tmp_path, f"name: t\nstorage: {tmp_path / 'runs'}\ndata: {{path: {corpus}}}\n"
                            "tokenizer: {vocab_size: 300, sample_bytes: 20000}\nstages:\n  tokenizer: {}\n")
    recipe = load_recipe(path)
    target = tmp_path / "runs" / "t" / stage_config(recipe, STAGE_BY_NAME["tokenizer"], {}).name / "tokenizer"
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_text('{"vocab_size": 300}\n')
    done = run_recipe(recipe, log=lambda m: None)["tokenizer"]
    assert done["outputs"]["path"] == str(target) and (target / "tokenizer.model").is_file()


def test_an_sft_stage_with_nothing_to_start_from_is_refused_at_load(tmp_path):
    """raylm.posttrain refuses an SFT run without init_from; the recipe passed --check and the
    stage failed after the stages before it (here the data stage) had run."""
    path = _write(tmp_path, f"name: t\nstorage: {tmp_path}\nstages:\n  tokenizer: {{}}\n  data: {{}}\n"
                            "  sft: {synthetic: word_after}\n")
    assert "stages.sft: needs a pretrain stage, or init_from" in _refused(path)
    load_recipe(path, ["stages.sft.init_from=/runs/base"])


@pytest.mark.parametrize("override, message", [
    ("stages.eval.tasks=[1]", "stages.eval.tasks: 1 is not a name; expected a list of lm-eval task names"),
    ("stages.eval.tasks=[{a: 1}]", "stages.eval.tasks: {'a': 1} is not a name"),
    ("stages.eval.corpora=[7]", "stages.eval.corpora: 7 is not a name; expected a list of corpus paths"),
    ("stages.serve.serve=5", "stages.serve.serve: expected a mapping of serve.* keys, got 5"),
])
def test_eval_and_serve_values_of_the_wrong_shape_name_the_key(tmp_path, override, message):
    """eval's tasks and corpora were checked only as lists (their items failed in the stage);
    `serve: 5` in the serve section ended in an AttributeError traceback."""
    path = _write(tmp_path, f"name: t\nstorage: {tmp_path}\ndata: {{path: /c/big.txt}}\nstages:\n"
                            "  pretrain: {train.max_steps: 2}\n  eval: {}\n  serve: {}\n")
    assert message in _refused(path, [override])
    load_recipe(path, ["stages.eval.tasks=[hellaswag]", "stages.eval.corpora=[/c/val.txt]"])


@pytest.mark.parametrize("shared, data, pretrain, message", [
    ("data: {seq_len: 200}", "{data.seq_len: 100}", "{}",
     "stages.pretrain: data.seq_len=200, but the data stage prepares blocks of data.seq_len=100"),
    ("", "{data.seq_len: 100}", "{data.seq_len: 64}",
     "stages.pretrain: data.seq_len=64, but the data stage prepares blocks of data.seq_len=100"),
    ("", "{data.seq_len: 200}", "{model.max_seq_len: 128}",
     "stages.pretrain: the data stage prepares data.seq_len=200, more than model.max_seq_len=128"),
])
def test_a_block_length_pretraining_would_refuse_is_refused_at_load(tmp_path, shared, data, pretrain, message):
    """Pre-training adopts the prepared dataset's seq_len only when its own is the default;
    another value, or blocks longer than its model, failed once the data stage had run."""
    path = _write(tmp_path, f"name: t\nstorage: {tmp_path}\nmodel: {{preset: tiny}}\n{shared}\nstages:\n"
                            f"  tokenizer: {{tokenizer.vocab_size: 300}}\n  data: {data}\n  pretrain: {pretrain}\n")
    assert message in _refused(path)


def test_a_block_length_pretraining_takes_loads(tmp_path):
    for data, pretrain in (("{data.seq_len: 100}", "{}"), ("{data.seq_len: 100}", "{data.seq_len: 100}"),
                           ("{}", "{}")):
        load_recipe(_write(tmp_path, f"name: t\nstorage: {tmp_path}\nmodel: {{preset: tiny}}\nstages:\n"
                                     f"  tokenizer: {{tokenizer.vocab_size: 300}}\n  data: {data}\n"
                                     f"  pretrain: {pretrain}\n"))


def test_lm_eval_tasks_are_checked_at_load(tmp_path, monkeypatch):
    """An unknown task name, or lm-eval not installed, failed in the eval stage after every
    model stage had trained."""
    import sys

    import raylm.recipe as R
    from raylm.recipe import StageUnavailable

    path = _write(tmp_path, f"name: t\nstorage: {tmp_path}\ndata: {{path: /c/big.txt}}\nstages:\n"
                            "  pretrain: {train.max_steps: 2}\n  eval: {tasks: [hellaswag]}\n")
    load_recipe(path)
    assert "stages.eval.tasks: unknown lm-eval task(s) hellaswg" in _refused(path, ["stages.eval.tasks=[hellaswg]"])
    R._lm_eval_tasks.cache_clear()
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # import fails: lm-eval not installed
    try:
        with pytest.raises(StageUnavailable, match=r"r.yaml: stages.eval.tasks: lm-eval tasks need lm-eval"):
            load_recipe(path)
    finally:
        R._lm_eval_tasks.cache_clear()


def test_eval_task_files_of_one_name_are_refused_at_load(tmp_path):
    path = _write(tmp_path, f"name: t\nstorage: {tmp_path}\ndata: {{path: /c/big.txt}}\nstages:\n"
                            "  pretrain: {train.max_steps: 2}\n  eval: {}\n")
    message = _refused(path, ["stages.eval.eval.mc_tasks=[/a/test.jsonl,/b/test.jsonl]"])
    assert "stages.eval: eval.mc_tasks /a/test.jsonl and eval.mc_tasks /b/test.jsonl are both task 'test'" in message
    load_recipe(path, ["stages.eval.eval.mc_tasks=[/a/arc.jsonl,/b/piqa.jsonl]"])
