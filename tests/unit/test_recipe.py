"""Recipes (raylm/recipe.py, jobs/recipes/): every shipped recipe loads and each of its stages'
configs validates; mistakes name the key; stage keys chain, so a change reruns the stage and
everything downstream; a finished stage is skipped until its config or its outputs change.

No Ray here: the stage that runs for real is the tokenizer, which trains without a cluster.
The whole chain on a Ray cluster is tests/integration/test_cluster_job.py.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from raylm import storage
from raylm.config import ConfigError
from raylm.plan import memory_for_config, parse_hardware
from raylm.recipe import STAGES, load_recipe, read_stage_record, run_recipe, stage_config, stage_key

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "jobs" / "recipes").glob("*.yaml"))
EXPECTED = {"tiny-cpu.yaml", "gpt2-124m-1gpu.yaml", "llama-1b-8gpu.yaml", "llama-7b-64gpu.yaml"}


def _placeholders(recipe, stage):
    return {s: {"path": f"{recipe.root}/{s}", "checkpoint": f"{recipe.root}/{s}/ckpt-00000001", "corpus": ""}
            for s in recipe.inputs_of(stage)}


def test_the_four_recipes_are_there():
    assert EXPECTED <= {p.name for p in RECIPES}


def filled_in(path: Path, tmp_path: Path) -> Path:
    """A copy of a shipped recipe with its `<bucket>` placeholders filled in, as a user does."""
    out = tmp_path / path.name
    out.write_text(path.read_text().replace("<bucket>", "my-bucket"))
    return out


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_a_shipped_recipe_with_a_placeholder_left_is_refused_at_load(path):
    """Its stages' configs would each fail only when the stage starts: days into a recipe, for
    the SFT data path of a 1B one."""
    if "<bucket>" not in path.read_text().split("stages:")[1]:
        pytest.skip(f"{path.name} has no placeholder outside its comments")
    with pytest.raises(ConfigError, match=r"<bucket> is a placeholder"):
        load_recipe(str(path), ["storage=s3://my-bucket/recipes", "data.path=s3://my-bucket/corpus/*.txt"])


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_stages_validate_and_fit(path, tmp_path):
    recipe = load_recipe(str(filled_in(path, tmp_path)))
    names = [s.name for s in recipe.stages]
    assert names[:3] == ["tokenizer", "data", "pretrain"] and "export" in names, names
    gpus = int(re.search(r"(\d+)gpu", path.name).group(1)) if "gpu" in path.name else 0
    for stage in recipe.stages:
        cfg = stage_config(recipe, stage, _placeholders(recipe, stage))
        assert cfg.run_dir.startswith(recipe.root + "/" + stage.name + "-")
        if stage.name not in ("pretrain", "sft", "dpo"):
            continue
        tc = cfg.train
        where = f"{path.name} stages.{stage.name}"
        assert tc.global_batch_size % (tc.micro_batch_size * tc.num_workers) == 0, where
        assert tc.use_gpu == bool(gpus), where
        if gpus:
            assert tc.num_workers == gpus, f"{where}: {tc.num_workers} workers for {gpus} GPUs"
            assert cfg.storage.startswith("s3://"), f"{where}: every node writes checkpoint shards"
            assert cfg.data.seq_len <= cfg.model.max_seq_len
            # The GPU recipes are sized for 80 GB H100s (their headers): each training stage's
            # step fits one by the estimator `raylm plan` sizes runs with (DPO's 8 pairs did not).
            sized = dataclasses.replace(cfg, model=cfg.model.with_vocab(recipe_vocab(recipe)))
            need, usable = memory_for_config(sized, "cuda").total, parse_hardware("1xH100").usable
            assert need <= usable, f"{where}: {need / 2**30:.1f} GiB a GPU, over an H100's {usable / 2**30:.1f}"
        if stage.name == "pretrain":
            cfg.model.with_vocab(recipe_vocab(recipe))
    if gpus >= 64:  # multi-node: the memory that makes it fit
        pre = stage_config(recipe, recipe.stages[2], _placeholders(recipe, recipe.stages[2]))
        assert pre.train.activation_checkpointing
        assert "HSDP" in path.read_text()


def recipe_vocab(recipe) -> int:
    return stage_config(recipe, recipe.stages[0], {}).tokenizer.vocab_size


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


BASE = """
name: t
storage: {storage}
model: {{preset: tiny}}
stages:
  tokenizer: {{tokenizer.vocab_size: 300}}
  data: {{}}
  pretrain: {{train.max_steps: 10}}
  sft: {{synthetic: word_after}}
  dpo: {{synthetic: word_after}}
  export: {{format: hf}}
"""


@pytest.mark.parametrize("override, message", [
    ("stages.pretrain.train.lrr=1", "stages.pretrain: unknown config key 'train.lrr'"),
    ("stages.sft.train.lr=fast", "stages.sft: train.lr='fast'"),
    ("stages.bake.x=1", "stages.bake: unknown stage"),
    ("stages.export.format=7", "stages.export.format=7: expected str"),
    ("trian.lr=1", "unknown config key 'trian'"),
    ("stages.sft.synthetic=null", "stages.sft.synthetic=None"),
    # Options a stage would refuse only when it runs, hours in: refused as the recipe loads.
    ("stages.sft.synthetic=nope", "stages.sft.synthetic='nope': choose from ['reverse', 'add', 'word_after']"),
    ("stages.dpo.synthetic=nope", "stages.dpo.synthetic='nope': choose from"),
    ("stages.export.format=onnx", "stages.export.format='onnx': choose from ['hf', 'gguf']"),
    ("stages.export.dtype=q4", "stages.export.dtype='q4': format hf takes one of ['float32', 'bfloat16', 'float16']"),
    ("stages.export.format=gguf stages.export.dtype=bfloat16",
     "stages.export.dtype='bfloat16': format gguf takes one of ['f32', 'f16', 'q8_0']"),
    # Overrides that replace the stages mapping, or a stage's section, with something else.
    ("stages=5", "stages: expected a mapping of stage names to their settings"),
    ("stages.sft=5", "stages.sft: expected a mapping of config keys, got 5"),
])
def test_mistakes_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(_write(tmp_path, BASE.format(storage=tmp_path)), override.split())
    assert message in str(e.value) and "r.yaml" in str(e.value) and "\n" not in str(e.value)


def test_good_export_options_load(tmp_path):
    recipe = load_recipe(_write(tmp_path, BASE.format(storage=tmp_path)),
                         ["stages.export.format=gguf", "stages.export.dtype=q8_0"])
    assert recipe.sections["export"][1] == {"format": "gguf", "dtype": "q8_0"}


def test_export_stage_refuses_a_format_it_does_not_write(tmp_path, monkeypatch):
    """format: onnx is refused when the stage runs too, not written as a GGUF recorded as onnx."""
    from raylm.config import Config
    from raylm.export import gguf
    from raylm.recipe import StageRun, run_export

    def fake_gguf(checkpoint, out, *_, **__):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(b"GGUF")

    monkeypatch.setattr(gguf, "export_run_gguf", fake_gguf)
    run = StageRun("export", Config(), {"format": "onnx"}, {"pretrain": {"checkpoint": str(tmp_path / "ckpt")}},
                   str(tmp_path / "export"), str(tmp_path), print, None)
    with pytest.raises(ConfigError, match=r"stages.export.format='onnx': choose from \['hf', 'gguf'\]"):
        run_export(run)
    assert not (tmp_path / "export").exists()


def test_recipe_that_is_not_utf8_is_named(tmp_path, capsys):
    from raylm.cli import main

    path = tmp_path / "bin.yaml"
    path.write_bytes(b"name: t\nstages: {tokenizer: {}}\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"recipe .*bin.yaml: not UTF-8 text"):
        load_recipe(str(path))
    assert main(["run", str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bin.yaml: not UTF-8 text" in err[0], err


def test_recipe_that_gives_a_stage_twice_is_named(tmp_path):
    # PyYAML would keep the second `pretrain:` and drop the first's settings without a word.
    path = tmp_path / "dup.yaml"
    path.write_text("name: t\nstages:\n  pretrain: {train.max_steps: 5}\n  pretrain: {}\n")
    with pytest.raises(ConfigError, match=r"recipe .*dup.yaml: not valid YAML \(line 4: duplicate key 'pretrain'\)"):
        load_recipe(str(path))


def test_cli_run_check_refuses_stage_options(tmp_path, capsys):
    from raylm.cli import main

    path = _write(tmp_path, BASE.format(storage=tmp_path))
    assert main(["run", path, "--check", "stages.export.dtype=q4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "r.yaml: stages.export.dtype='q4'" in err[0], err


def test_records_need_their_own_data_path(tmp_path):
    text = BASE.format(storage=tmp_path).replace("sft: {synthetic: word_after}", "sft: {}")
    with pytest.raises(ConfigError, match=r"stages.sft: needs data.path \(the chat records\)"):
        load_recipe(_write(tmp_path, "data: {path: corpus.txt}\n" + text))


def test_a_new_data_format_text_encoding_or_cleaning_reruns_every_stage(tmp_path, monkeypatch):
    """A data stage finished by a raylm that encoded documents otherwise (chat markers in text
    read as markup, before text encoding 2) was kept by its settings alone and trained on."""
    from raylm import data

    path = _write(tmp_path, BASE.format(storage=tmp_path))
    before = load_recipe(path)
    keys = {s.name: stage_key(before, s) for s in before.stages}
    monkeypatch.setattr(data, "TEXT_ENCODING", data.TEXT_ENCODING + 1)
    assert all(stage_key(before, s) != keys[s.name] for s in before.stages)
    for name in ("FORMAT_VERSION", "CLEANING"):
        monkeypatch.undo()
        monkeypatch.setattr(data, name, getattr(data, name) + 1)
        assert all(stage_key(before, s) != keys[s.name] for s in before.stages)


def test_a_new_chat_encoding_or_row_rule_reruns_post_training(tmp_path, monkeypatch):
    """SFT or DPO finished by a raylm that made rows from records otherwise (split by the whole
    record, say) was kept by its settings alone; its stage and those after it run again."""
    from raylm import chat_data

    path = _write(tmp_path, BASE.format(storage=tmp_path))
    before = load_recipe(path)
    keys = {s.name: stage_key(before, s) for s in before.stages}
    monkeypatch.setattr(chat_data, "KIND_ROWS", {**chat_data.KIND_ROWS, "sft": chat_data.KIND_ROWS["sft"] + 1})
    assert {s.name for s in before.stages if stage_key(before, s) != keys[s.name]} == {"sft", "dpo", "export"}
    monkeypatch.undo()
    monkeypatch.setattr(chat_data, "CHAT_ENCODING", chat_data.CHAT_ENCODING + 1)
    assert {s.name for s in before.stages if stage_key(before, s) != keys[s.name]} == {"sft", "dpo", "export"}


def test_a_change_reruns_the_stage_and_everything_after(tmp_path):
    path = _write(tmp_path, BASE.format(storage=tmp_path))
    before = load_recipe(path)
    after = load_recipe(path, ["stages.pretrain.train.max_steps=11"])
    changed = {s.name for s in STAGES if s.name in before.sections and stage_key(before, s) != stage_key(after, s)}
    assert changed == {"pretrain", "sft", "dpo", "export"}
    shared = load_recipe(path, ["model.dim=64"])  # shared settings reach every stage
    assert all(stage_key(before, s) != stage_key(shared, s) for s in before.stages)
    # Where outputs go and what a stage reads follow: dpo starts from sft, sft from pretrain.
    dpo = stage_config(after, after.stages[4], {"sft": {"path": "S"}})
    assert dpo.init_from == "S" and dpo.stage == "dpo" and dpo.train.lr == 1e-4  # the CLI's DPO default


def test_finished_stage_is_skipped_until_it_changes(tmp_path):
    """The tokenizer stage for real (no Ray): done once, skipped, rerun after a change, and
    rerun when its output is gone from storage."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about ray, tokens and tests" for i in range(400)))
    text = f"name: t\nstorage: {tmp_path / 'runs'}\ndata: {{path: {corpus}}}\n" \
           "tokenizer: {vocab_size: 300, sample_bytes: 20000}\nstages:\n  tokenizer: {}\n"
    path = _write(tmp_path, text)
    logs = []
    first = run_recipe(load_recipe(path), log=logs.append)["tokenizer"]
    assert not first["skipped"] and first["inputs"] == {}
    out = first["outputs"]
    assert storage.exists(f"{out['path']}/tokenizer.json") and len(out["sha256"]) == 64
    again = run_recipe(load_recipe(path), log=logs.append)["tokenizer"]
    assert again["skipped"] and again["outputs"] == out
    changed = run_recipe(load_recipe(path, ["tokenizer.vocab_size=320"]), log=logs.append)["tokenizer"]
    assert not changed["skipped"] and changed["outputs"]["path"] != out["path"]
    assert changed["outputs"]["sha256"] != out["sha256"]
    # Back to the first settings: its record was replaced, so it runs again, into its own
    # directory, which still holds its tokenizer (reused, same hash).
    back = run_recipe(load_recipe(path), log=logs.append)["tokenizer"]
    assert not back["skipped"] and back["outputs"] == out
    # Outputs deleted from storage: the record alone does not count as done.
    storage.delete(out["path"])
    gone = run_recipe(load_recipe(path), log=logs.append)["tokenizer"]
    assert not gone["skipped"] and storage.exists(f"{out['path']}/tokenizer.json")
    record = read_stage_record(load_recipe(path), "tokenizer", None)
    assert record["key"] == stage_key(load_recipe(path), STAGES[0]) and record["config"]["tokenizer"]["vocab_size"] == 300
    assert sum(line.endswith("), skipped") for line in logs) == 1


def test_cli_run_check(tmp_path, capsys):
    from raylm.cli import main

    assert main(["run", "--config", str(REPO / "jobs/recipes/tiny-cpu.yaml"), "--check", f"storage={tmp_path}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stages"] == ["tokenizer", "data", "pretrain", "sft", "dpo", "eval", "export", "serve"]
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- job entrypoints


JOBS = sorted((REPO / "jobs").glob("*.py"))


def _takes_config(job: Path) -> bool:
    """Whether the raylm subcommand a jobs/*.py file runs (its `main([...])`) takes --config."""
    from raylm.cli import build_parser

    words = next([e.value for e in node.args[0].elts if isinstance(e, ast.Constant)]
                 for node in ast.walk(ast.parse(job.read_text()))
                 if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main" and node.args
                 and isinstance(node.args[0], ast.List))
    parser = build_parser()
    for word in (w for w in words if not w.startswith("-")):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return any("--config" in a.option_strings for a in parser._actions)


@pytest.mark.parametrize("job", JOBS, ids=[p.name for p in JOBS])
def test_job_entrypoint_shows_its_submit_command(job):
    doc = ast.get_docstring(ast.parse(job.read_text())) or ""
    command = " ".join(doc.replace("\\\n", " ").split())
    assert "ray job submit" in command and "--working-dir ." in command, f"{job.name}: no `ray job submit` command"
    flag = " --config \\S" if _takes_config(job) else ""
    assert re.search(rf"-- (\\+ )?python jobs/{job.stem}\.py(?: \S+)*?{flag}", command), (
        f"{job.name}: the docstring's command must run `python jobs/{job.stem}.py{flag and ' --config ...'}`")


RUNTIME_ENVS = sorted((REPO / "jobs").glob("runtime_env*.yaml"))


@pytest.mark.parametrize("path", RUNTIME_ENVS, ids=[p.name for p in RUNTIME_ENVS])
def test_runtime_env_is_valid_and_holds_no_credentials(path):
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load(path.read_text())
    RuntimeEnv(**env)  # Ray's own validation of the fields
    names = set(env.get("env_vars", {}))
    assert not {n for n in names if re.search(r"SECRET|ACCESS_KEY|TOKEN|PASSWORD", n)}, names
    assert "--runtime-env" in path.read_text() and "ray job submit" in path.read_text()
