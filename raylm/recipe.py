"""One recipe, the whole pipeline: tokenizer -> data -> pretrain -> sft -> dpo -> eval -> export -> serve.

A recipe is a raylm config file (shared settings, nested or dotted keys) with a `stages:`
mapping. Each stage named there runs, in the fixed order of `STAGES`, with the shared
settings, then its own section's keys on top:

    name: tiny-cpu                 # outputs under <storage>/<name>/
    storage: s3://bucket/recipes
    model: {preset: tiny}
    stages:
      tokenizer: {tokenizer.vocab_size: 2048}
      data: {data.dedup: exact}
      pretrain: {train.max_steps: 600}
      sft: {synthetic: word_after, train.max_steps: 200}
      export: {format: hf}

What the pipeline decides itself (each stage's name and storage, the tokenizer, data and
parent model a stage reads, serve.* outside the serve stage) is refused in a section, not
overwritten. A shared key given on the command line that a section sets to another value is
refused, naming the `stages.<stage>.<key>` to give: sections win over shared keys, so it
would not reach that stage.

Skipping and lineage. A stage's key hashes its settings and the keys of the stages it reads,
so a changed stage changes the key of everything downstream; how a stage is retried
(max_failures, samples) and reaches storage (storage, s3.*) are left out. Each stage writes
its outputs under `<root>/<stage>-<key[:10]>/` (a changed stage never resumes the old one's
checkpoints) and, once they are committed, `<root>/stages/<stage>.json`: its key, config
(credentials redacted), the paths and content hashes of its inputs and outputs, and a digest of
the listing of each file it reads that no stage writes (its corpus, chat or preference records,
eval corpora and task files, a checkpoint outside the recipe it starts from: sizes and S3 ETags, small local files' hashes or large ones' mtimes,
`input_fingerprint`). A stage whose record has the current key, whose inputs have the
recorded hashes (an input that ran again may differ), whose files list as they did and whose outputs are still committed is skipped,
so a resubmitted recipe continues where it stopped (a training stage resumes from its newest
checkpoint); one whose files changed runs again, and so does each stage its new outputs reach.
Following `inputs` from the serve record back to the tokenizer gives a model's lineage. A
recipe's storage copied or moved to another directory or bucket goes on there: a record's
paths under the root it was written under are read under the current one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from raylm import run_lock, storage
from raylm.config import (Config, ConfigError, S3Config, _build, _merge, _nest, _override_value, load_yaml, to_dict,
                          yaml_problem)
from raylm.errors import PathNotFoundError

STAGE_RECORDS = "stages"  # <root>/stages/<stage>.json
SYNTHETIC_EXAMPLES = 2000  # train records a `synthetic:` task writes (the quickstart's count)
SYNTHETIC_HELDOUT = 50  # and held-out ones, beside them


class StageUnavailable(ConfigError):
    """A stage whose library is not installed or not part of this raylm yet."""


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class StageRun:
    """What a stage function gets: its config, its own options, the outputs of the stages it
    reads (by stage name), and the directory its outputs go to."""

    name: str
    cfg: Config
    options: dict
    inputs: dict  # stage name -> that stage's outputs
    out: str  # <root>/<stage>-<key[:10]>
    root: str
    log: Callable[[str], None]
    recipe: "Recipe"

    @property
    def s3(self) -> S3Config:
        return self.cfg.s3


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_input(run: StageRun) -> dict:
    """The outputs of the model stage this one reads (the last of pretrain, sft, dpo named)."""
    (parent,) = [v for k, v in run.inputs.items() if k in MODEL_STAGES]
    return parent


# --------------------------------------------------------------------------- stages


def run_tokenizer(run: StageRun) -> dict:
    """Train the tokenizer (on the built-in corpus when data.path is empty, written beside it)."""
    from raylm.generate import load_tokenizer
    from raylm.pipeline import absolute_paths, ensure_corpus, train_tokenizer_from
    from raylm.tokenizer import META_FILE, MODEL_FILE

    cfg = absolute_paths(run.cfg)
    if not cfg.data.path:  # the built-in corpus, once for the recipe: <root>/corpus
        cfg = ensure_corpus(dataclasses.replace(cfg, storage=run.root, name=""))
    target = storage.join(run.out, "tokenizer")
    if cfg.tokenizer.path:  # a given tokenizer: adopted, not retrained
        tok = load_tokenizer(cfg.tokenizer.path, cfg.s3)
        target = cfg.tokenizer.path
    elif all(storage.exists(storage.join(target, f), cfg.s3) for f in (META_FILE, MODEL_FILE)):
        # Trained, then stopped before the record. Both files: an s3:// upload writes
        # tokenizer.json before tokenizer.model, so one alone is an upload cut short.
        tok = load_tokenizer(target, cfg.s3)
    else:
        tok = train_tokenizer_from(cfg, target)
    return {"path": target, "sha256": tok.sha256, "corpus": cfg.data.path, "vocab_size": tok.vocab_size}


def run_data(run: StageRun) -> dict:
    """Ray Data: clean, de-duplicate, tokenize and pack the corpus into `<out>/`."""
    from raylm.data import prepare
    from raylm.generate import load_tokenizer
    from raylm.pipeline import absolute_paths, init_ray, log, preflight

    cfg = absolute_paths(run.cfg)
    cfg, corpus = preflight(cfg, out=run.out)
    tok = load_tokenizer(cfg.tokenizer.path, cfg.s3)
    init_ray(cfg)
    prepare(cfg.data, tok, run.out, cfg.seed, cfg.s3, log=log, corpus=corpus)
    manifest = storage.read_bytes(storage.join(run.out, "manifest.json"), cfg.s3)
    return {"path": run.out, "sha256": _sha256(manifest), "tokenizer_sha256": tok.sha256}


def _trained(run: StageRun, cfg: Config) -> dict:
    """A training stage's outputs: the run and its newest complete checkpoint, whose hash is
    the sha256 of its commit marker (which lists the sha256 of every file in it)."""
    from raylm import checkpoint

    ckpt = checkpoint.latest_complete(cfg.run_dir, cfg.s3)
    if ckpt is None:
        raise RuntimeError(f"{cfg.run_dir}: training finished without a complete checkpoint")  # a bug
    marker = storage.read_bytes(storage.join(ckpt, checkpoint.COMMIT_MARKER), cfg.s3)
    return {"path": cfg.run_dir, "checkpoint": ckpt, "sha256": _sha256(marker)}


def run_pretrain(run: StageRun) -> dict:
    from raylm.pipeline import pretrain

    pretrain(run.cfg, resume="auto", max_failures=run.options.get("max_failures", 0),
             samples=run.options.get("samples", True))
    return _trained(run, run.cfg)


def _synthetic_records(run: StageRun, fmt: str) -> str:
    """`synthetic: TASK`: the built-in task's train records (raylm.synthetic), written once
    under <root>/records-<task>-<seed>[-<option><value>]/ and named by content, so they are an
    ordinary input."""
    from raylm import synthetic

    task, seed = run.options["synthetic"], run.cfg.seed
    options = run.options.get("synthetic_options", {})
    suffix = "".join(f"-{k}{v}" for k, v in sorted(options.items()))  # none: the directory as before options
    target = storage.join(run.root, f"records-{task}-{seed}{suffix}")
    name = f"{task}.train.{fmt}.jsonl"
    if not storage.exists(storage.join(target, name), run.s3):
        with tempfile.TemporaryDirectory() as tmp:
            synthetic.write_jsonl(tmp, task, SYNTHETIC_EXAMPLES, SYNTHETIC_HELDOUT, seed=seed, **options)
            if storage.is_s3(target):
                storage.upload_dir(tmp, target, run.s3)
            else:
                _copy_dir(tmp, target)
    return storage.join(target, name)


def _check_synthetic(stage: str, options: dict) -> None:
    """`synthetic:` names one of raylm.synthetic's built-in tasks, `synthetic_options:` its
    option, and together they give the SYNTHETIC_EXAMPLES + SYNTHETIC_HELDOUT prompts the
    stage writes (add's default max_value=20 has 441), or the stage would fail after the
    stages before it ran."""
    from raylm import synthetic

    if "synthetic" not in options:
        if "synthetic_options" in options:
            raise ConfigError(f"stages.{stage}.synthetic_options: options of a synthetic task; give synthetic: "
                              f"TASK with it, or remove it")
        return
    task = options["synthetic"]
    if task not in synthetic.TASKS:
        raise ConfigError(f"stages.{stage}.synthetic={task!r}: choose from {list(synthetic.TASKS)}")
    try:
        given = synthetic.check_options(task, options.get("synthetic_options", {}))
    except ConfigError as e:
        raise ConfigError(f"stages.{stage}.synthetic_options: {e}") from None
    need, have = SYNTHETIC_EXAMPLES + SYNTHETIC_HELDOUT, synthetic.split_capacity(task, **given)
    if have < need:
        (option, value), (_, _, low, high) = next(iter(given.items())), synthetic.OPTIONS[task]
        fits = next((v for v in range(low, (high or need) + 1)
                     if synthetic.split_capacity(task, **{option: v}) >= need), None)
        space = synthetic.prompt_space(task, **given)
        twins = f" ({have} once a + b and b + a, which the split keeps on one side, count as one)" if have < space \
            else ""
        fix = f"set stages.{stage}.synthetic_options.{option} to {fits} or more" if fits is not None else \
            "choose another task"
        raise ConfigError(f"stages.{stage}.synthetic={task}: with {option}={value} the task has "
                          f"{space} distinct prompts{twins}, fewer than "
                          f"the {need} the stage writes ({SYNTHETIC_EXAMPLES} train, {SYNTHETIC_HELDOUT} held out); "
                          f"{fix}, or give data.path")


def _check_eval(stage: str, options: dict) -> None:
    """`limit:` as raylm.eval takes it (items[:0] scores nothing, items[:-1] all but the last)."""
    if options.get("limit") is not None and options["limit"] < 1:
        raise ConfigError(f"stages.{stage}.limit={options['limit']}: expected an integer >= 1")
    for key, what in (("tasks", "lm-eval task names"), ("corpora", "corpus paths")):
        bad = [v for v in options.get(key, []) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ConfigError(f"stages.{stage}.{key}: {bad[0]!r} is not a name; expected a list of {what}")
    if options.get("tasks"):  # raylm.eval.run.harness_rows refuses these only after the model stages
        known = _lm_eval_tasks()
        if known is None:
            raise StageUnavailable(f"stages.{stage}.tasks: lm-eval tasks need lm-eval: pip install 'raylm[eval]' "
                                   f"(or remove tasks)")
        unknown = [t for t in options["tasks"] if t not in known]
        if unknown:
            raise ConfigError(f"stages.{stage}.tasks: unknown lm-eval task(s) {', '.join(unknown)}")


@functools.lru_cache(maxsize=1)
def _lm_eval_tasks() -> frozenset | None:
    """The task names lm-eval's registry knows (as raylm.eval.run reads them); None without
    lm-eval. Indexing them takes seconds: once a process."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        return None
    return frozenset(TaskManager().all_tasks)


def _copy_dir(src: str, dst: str) -> None:
    import shutil

    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".records-", dir=Path(dst).parent)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    # Content on disk before the rename: a crash after a rename that reached the disk first
    # would leave empty or short records that a rerun finds in place and trains on.
    storage.make_durable(tmp)
    os.replace(tmp, dst)
    storage.make_durable(str(Path(dst).parent), names=())  # the rename itself


def run_posttrain(run: StageRun) -> dict:
    from raylm.posttrain import posttrain

    cfg = run.cfg
    if "synthetic" in run.options:
        path = _synthetic_records(run, "messages" if run.name == "sft" else "preference")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))
    posttrain(cfg.validate(), resume="auto", max_failures=run.options.get("max_failures", 0))
    return _trained(run, cfg)


def run_eval(run: StageRun) -> dict:
    """raylm.eval on the model: lm-eval `tasks`, the config's eval.mc_tasks/gen_tasks, and bits
    per byte on `corpora`; with none of them, bits per byte on the recipe's own corpus."""
    try:
        from raylm.eval.run import evaluate_run
    except ImportError as e:
        raise StageUnavailable(f"stages.eval: raylm.eval cannot be imported ({e}); remove the eval stage") from None
    parent = _model_input(run)
    tasks, corpora = list(run.options.get("tasks", [])), list(run.options.get("corpora", []))
    if not (tasks or corpora or run.cfg.eval.mc_tasks or run.cfg.eval.gen_tasks):
        # The recipe's corpus: the shared data.path, or the built-in one the tokenizer wrote.
        corpus = run.cfg.data.path or run.inputs.get("tokenizer", {}).get("corpus")
        if not corpus:
            raise ConfigError("stages.eval: nothing to evaluate; give tasks, corpora or eval.mc_tasks")
        corpora = [corpus]
    result = evaluate_run(parent["checkpoint"], run.cfg, tasks=tasks, corpora=corpora,
                          limit=run.options.get("limit"), out=run.out, log=run.log)
    report = result["paths"]["json"]
    return {"path": run.out, "report": report, "sha256": _sha256(storage.read_bytes(report, run.s3))}


def _exporter(stage: str, options: dict) -> tuple[str, str, Callable]:
    """The export stage's format, dtype and export function (raylm.export.exporter, as
    `raylm export` has them), checked when the recipe loads, not once the model is trained."""
    from raylm.export import MissingExtra, exporter

    fmt = options.get("format", "hf")
    try:
        dtype, export_run = exporter(fmt, options.get("dtype"), prefix=f"stages.{stage}.")
    except MissingExtra as e:
        raise StageUnavailable(str(e)) from None
    return fmt, dtype, export_run


def run_export(run: StageRun) -> dict:
    parent = _model_input(run)
    fmt, dtype, export_run = _exporter(run.name, run.options)
    if fmt == "hf":
        from raylm.export.hf import EXPORT_MARKER

        out = storage.join(run.out, "hf")
        marker = storage.join(out, EXPORT_MARKER)
        if not storage.exists(marker, run.s3):  # an export is complete once its marker is there
            export_run(parent["checkpoint"], out, run.s3, dtype=dtype)
        return {"path": out, "format": fmt, "sha256": _sha256(storage.read_bytes(marker, run.s3))}
    out = storage.join(run.out, "model.gguf")
    if not storage.exists(out, run.s3):
        export_run(parent["checkpoint"], out, run.s3, dtype=dtype)
    return {"path": out, "format": fmt, "sha256": _sha256(storage.read_bytes(out, run.s3))}


def run_serve(run: StageRun) -> dict:
    """Deploy `raylm serve`'s application for the model on the cluster. In a job (RAY_ADDRESS
    set) the application outlives the job; on a local cluster of its own, `raylm run` keeps
    serving until interrupted."""
    try:
        from raylm.serve.app import model_name_of, start
        from raylm.serve.local import wait_ready
    except ImportError as e:
        raise StageUnavailable(f"stages.serve: raylm.serve cannot be imported ({e}); remove the serve stage") from None
    from raylm.pipeline import init_ray

    cfg = serve_config(run.recipe)
    parent = _model_input(run)
    init_ray(run.cfg)
    url = start(parent["checkpoint"], cfg)
    wait_ready(url, timeout=600)
    return {"path": parent["checkpoint"], "url": url, "model": model_name_of(parent["checkpoint"], cfg),
            "sha256": parent["sha256"]}


def _exists(key: str = "path", inside: str = "") -> Callable[[dict, S3Config], bool]:
    def check(outputs: dict, s3: S3Config) -> bool:
        uri = outputs.get(key)
        return bool(uri) and storage.exists(storage.join(uri, inside) if inside else uri, s3)
    return check


def _tokenizer_committed(outputs: dict, s3: S3Config) -> bool:
    """The recorded tokenizer is still the one at its path: an adopted tokenizer.path is
    someone else's directory, and a tokenizer put there since would otherwise be trained on
    with the data prepared by the old one (its tokenizer.json records the model's sha256)."""
    from raylm.tokenizer import META_FILE

    meta_uri = storage.join(outputs["path"], META_FILE) if outputs.get("path") else ""
    if not meta_uri or not storage.exists(meta_uri, s3):
        return False
    try:
        recorded = json.loads(storage.read_bytes(meta_uri, s3)).get("sha256")
    except (ValueError, AttributeError):  # not a JSON object: loading it says what is wrong
        recorded = None
    return recorded is None or recorded == outputs.get("sha256")


def _checkpoint_committed(outputs: dict, s3: S3Config) -> bool:
    from raylm.checkpoint import COMMIT_MARKER

    return bool(outputs.get("checkpoint")) and storage.exists(storage.join(outputs["checkpoint"], COMMIT_MARKER), s3)


def _export_committed(outputs: dict, s3: S3Config) -> bool:
    if outputs.get("format") == "gguf":
        return storage.exists(outputs["path"], s3)
    return _exists(inside="raylm_export.json")(outputs, s3)


def _serve_running(outputs: dict, s3: S3Config) -> bool:
    """The recorded application still answers readiness with the recorded model."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{outputs['url']}/ready", timeout=10) as r:
            return r.status == 200 and json.loads(r.read()).get("model") == outputs.get("model")
    except (KeyError, ValueError, OSError, urllib.error.URLError):
        return False


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: `run` turns the stage's config and its inputs' outputs into
    outputs (paths and content hashes); `committed` says whether recorded outputs are still
    whole in storage. `inputs`: groups of stages, of which the last one the recipe names is
    read (dpo reads sft if the recipe has one, else pretrain). `options`: the non-config
    keys the stage's section takes, and their types; `check(stage name, options)` refuses
    values the stage itself would refuse when it runs, with a ConfigError naming the option."""

    name: str
    run: Callable[[StageRun], dict]
    inputs: tuple[tuple[str, ...], ...]
    outputs: tuple[str, ...]
    committed: Callable[[dict, S3Config], bool]
    options: dict[str, type] = dataclasses.field(default_factory=dict)
    check: Callable[[str, dict], object] | None = None


MODEL_STAGES = ("pretrain", "sft", "dpo")
_MODEL = (MODEL_STAGES,)
STAGES: tuple[Stage, ...] = (
    Stage("tokenizer", run_tokenizer, (), ("path", "sha256", "corpus"), _tokenizer_committed),
    Stage("data", run_data, (("tokenizer",),), ("path", "sha256"), _exists(inside="manifest.json")),
    Stage("pretrain", run_pretrain, (("tokenizer",), ("data",)), ("path", "checkpoint", "sha256"),
          _checkpoint_committed, {"max_failures": int, "samples": bool}),
    Stage("sft", run_posttrain, (("pretrain",),), ("path", "checkpoint", "sha256"), _checkpoint_committed,
          {"max_failures": int, "synthetic": str, "synthetic_options": dict}, _check_synthetic),
    Stage("dpo", run_posttrain, (("pretrain", "sft"),), ("path", "checkpoint", "sha256"), _checkpoint_committed,
          {"max_failures": int, "synthetic": str, "synthetic_options": dict}, _check_synthetic),
    Stage("eval", run_eval, (MODEL_STAGES, ("tokenizer",)), ("path", "report", "sha256"), _exists("report"),
          {"tasks": list, "corpora": list, "limit": int}, _check_eval),
    Stage("export", run_export, _MODEL, ("path", "format", "sha256"), _export_committed,
          {"format": str, "dtype": str}, _exporter),
    Stage("serve", run_serve, _MODEL, ("url", "model", "path", "sha256"), _serve_running),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}


# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class Recipe:
    path: str
    name: str
    root: str  # <storage>/<name>: every stage's outputs and records
    shared: dict  # raylm config keys, nested
    sections: dict  # stage name -> (config keys nested, options), in STAGES order

    @property
    def stages(self) -> list[Stage]:
        return [s for s in STAGES if s.name in self.sections]

    def inputs_of(self, stage: Stage) -> list[str]:
        """The stages `stage` reads in this recipe: the last one named of each input group."""
        out = []
        for group in stage.inputs:
            present = [g for g in group if g in self.sections]
            if present:
                out.append(present[-1])
        return out


def _expand(section: Any, where: str) -> dict:
    """A mapping whose keys may be dotted (`train.lr: 3e-4`), nested."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, got {section!r:.80}")
    out: dict = {}
    for k, v in section.items():
        if not isinstance(k, str):
            raise ConfigError(f"{where}: key {k!r} is not a string")
        out = _merge(out, _nest([(k, _expand(v, f"{where}.{k}") if isinstance(v, dict) else v)]))
    return out


def load_recipe(path: str, overrides: list[str] = ()) -> Recipe:
    """Read and check a recipe: every stage's config is built and validated (no Ray, no
    storage but the recipe file), so a typo fails here, naming the file and the key. `overrides`
    are dotted keys into the recipe (`storage=s3://b/x`, `stages.pretrain.train.max_steps=10`).
    `path` may be an s3:// object, read with the environment's endpoint and credentials (the
    recipe's own s3.* settings are inside it)."""
    if storage.is_s3(path):
        if not storage.exists(path):
            raise PathNotFoundError(f"recipe {path}: not found")
        read = functools.partial(storage.read_text, path)
    else:
        p = Path(path)
        if not p.is_file():
            raise PathNotFoundError(f"recipe {path}: not found")
        read = functools.partial(p.read_text, encoding="utf-8")
    try:
        raw = load_yaml(read())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path}: not valid YAML ({yaml_problem(e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path}: not UTF-8 text; pass a YAML file") from None
    except storage.StorageError:  # one line already, naming the object
        raise
    except OSError as e:
        raise ConfigError(f"recipe {path}: cannot read it ({e.strerror})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict) or not raw["stages"]:
        raise ConfigError(f"recipe {path}: expected a mapping with a non-empty `stages:` mapping "
                          f"(stages: {[s.name for s in STAGES]})")
    try:
        data = _expand({k: v for k, v in raw.items() if k != "stages"}, "")
        data["stages"] = {k: _expand(v, f"stages.{k}") for k, v in raw["stages"].items()}
        shared_overrides = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value, e.g. stages.pretrain.train.max_steps=10")
            key, value = item.split("=", 1)
            override = _nest([(key.strip(), _override_value(key.strip(), value))])
            data = _merge(data, override)
            if "stages" not in override:
                shared_overrides = _merge(shared_overrides, override)
        # Again after the overrides, which may replace `stages` or a section with any value.
        stages = data.pop("stages")
        if not isinstance(stages, dict) or not stages:
            raise ConfigError(f"stages: expected a mapping of stage names to their settings "
                              f"(stages: {[s.name for s in STAGES]}), got {stages!r:.80}")
        stages = {k: _expand(v, f"stages.{k}") for k, v in stages.items()}
    except ConfigError as e:
        raise ConfigError(f"recipe {path}: {e}") from None
    unknown = [k for k in stages if k not in STAGE_BY_NAME]
    if unknown:
        raise ConfigError(f"recipe {path}: stages.{unknown[0]}: unknown stage; choose from {list(STAGE_BY_NAME)}")
    _check_shadowed(path, shared_overrides, stages)
    if "stage" in data:
        raise ConfigError(f"recipe {path}: stage={data['stage']!r}: the recipe sets it for each stage from "
                          f"its name; remove it")
    try:
        base = _build(Config, data, "").validate()
    except ConfigError as e:
        raise ConfigError(f"recipe {path}: {e}") from None
    # A local storage as the storage layer reads it (`~/runs`, `file:///runs`), and as
    # `raylm pretrain` does: made absolute as it was written, it was a `./~/runs` directory.
    root = storage.join(base.storage if storage.is_s3(base.storage) else storage._local(base.storage), base.name)
    sections = {}
    for stage in STAGES:
        if stage.name not in stages:
            continue
        section = dict(stages[stage.name])
        options = {k: section.pop(k) for k in list(section) if k in stage.options}
        for k, v in options.items():
            tp = stage.options[k]
            if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
                raise ConfigError(f"recipe {path}: stages.{stage.name}.{k}={v!r}: expected {tp.__name__}")
            if k == "max_failures" and v < -1:  # as --max-failures: Ray Train takes any negative as no limit
                raise ConfigError(f"recipe {path}: stages.{stage.name}.max_failures={v}: expected an integer >= 0 "
                                  f"(-1: no limit)")
        if stage.check is not None:  # here, not hours later when the stage runs
            try:
                stage.check(stage.name, options)
            except ConfigError as e:
                raise type(e)(f"recipe {path}: {e}") from None
        sections[stage.name] = (section, options)
    recipe = Recipe(path if storage.is_s3(path) else str(Path(path)), base.name, root, data, sections)
    for stage in recipe.stages:
        for key, why in _set_by_recipe(recipe, stage).items():
            value = _lookup(sections[stage.name][0], key)
            if value is not _MISSING:
                leaf = key + next((f".{k}" for k, _ in _leaves(value)), "") if isinstance(value, dict) else key
                raise ConfigError(f"recipe {path}: stages.{stage.name}.{leaf}: {why}")
    configs = {stage.name: stage_config(recipe, stage, _placeholders(recipe, stage)) for stage in recipe.stages}
    _check_vocab(recipe, configs)
    _check_seq_len(recipe, configs)
    return recipe


def _placeholders(recipe: Recipe, stage: Stage) -> dict:
    """Stand-ins for the outputs of the stages `stage` reads, not made yet: enough to build
    its config."""
    return {s: {"path": storage.join(recipe.root, s), "checkpoint": storage.join(recipe.root, s), "corpus": ""}
            for s in recipe.inputs_of(stage)}


_MISSING = object()


def _lookup(nested: dict, key: str) -> Any:
    """The value at dotted `key` in a nested mapping, or _MISSING."""
    for part in key.split("."):
        if not isinstance(nested, dict) or part not in nested:
            return _MISSING
        nested = nested[part]
    return nested


def _leaves(nested: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """[(dotted key, value)] of every non-mapping value in a nested mapping."""
    out = []
    for k, v in nested.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [(f"{prefix}{k}", v)]
    return out


def _check_shadowed(path: str, shared_overrides: dict, stages: dict) -> None:
    """A shared key given on the command line that a stage section sets to something else would
    not reach that stage (its section wins, as in the file): refused, naming the key to give."""
    for key, value in _leaves(shared_overrides):
        shadowed = [name for name in STAGE_BY_NAME if name in stages
                    and _lookup(stages[name], key) not in (_MISSING, value)
                    # sft and dpo never read the shared data.path (the corpus), only their own records
                    and not (key == "data.path" and name in ("sft", "dpo"))]
        if shadowed:
            raise ConfigError(f"recipe {path}: override {key}={value}: stages {', '.join(shadowed)} set {key} "
                              f"themselves (a section wins over the shared settings); give "
                              f"{' '.join(f'stages.{s}.{key}={value}' for s in shadowed)} instead")


def _set_by_recipe(recipe: Recipe, stage: Stage) -> dict[str, str]:
    """The config keys the recipe sets for `stage` itself (dotted key -> why): in the stage's
    section they would be overwritten without a word, so they are refused."""
    reads = recipe.inputs_of(stage)
    keys = {"name": "the recipe names each stage's directory (<storage>/<name>/<stage>-<key>); set the "
                    "top-level name",
            "storage": "every stage writes under the top-level storage; set it there",
            "stage": "the recipe sets it from the stage's name"}
    if "tokenizer" in reads:
        keys["tokenizer.path"] = "the recipe sets it to the tokenizer stage's output; set it in the " \
                                 "tokenizer stage's section (or the shared settings) to adopt a tokenizer"
    if stage.name == "pretrain" and "data" in reads:
        keys["data.path"] = "the recipe sets it to the data stage's output; remove the data stage to train " \
                            "on a prepared dataset"
    parents = [s for s in reads if s in MODEL_STAGES]
    if stage.name in ("sft", "dpo") and parents:
        keys["init_from"] = f"the recipe sets it to the {parents[0]} stage's run; remove the {parents[0]} " \
                            f"stage to start from another run"
    if stage.name in ("sft", "dpo") and "synthetic" in recipe.sections[stage.name][1]:
        keys["data.path"] = "synthetic: writes the records it would name; give one of them"
    if stage.name != "serve":
        keys["serve"] = "only the serve stage reads serve.* keys; move it to stages.serve"
    return keys


def _check_vocab(recipe: Recipe, configs: dict[str, Config]) -> None:
    """model.vocab_size against the vocabulary the tokenizer stage trains, here rather than when
    pre-training starts (an adopted tokenizer.path is read only then)."""
    tok, pre = configs.get("tokenizer"), configs.get("pretrain")
    if tok is None or pre is None or tok.tokenizer.path:
        return
    try:
        pre.model.with_vocab(tok.tokenizer.vocab_size)
    except ConfigError as e:
        raise ConfigError(f"recipe {recipe.path}: stages.pretrain: {e} (the tokenizer stage trains "
                          f"tokenizer.vocab_size={tok.tokenizer.vocab_size})") from None


def _check_seq_len(recipe: Recipe, configs: dict[str, Config]) -> None:
    """Pre-training reads the data stage's blocks, whose length the data stage fixes: a
    pre-training data.seq_len set to another value (pipeline.adopt_seq_len refuses it) or a
    model too short for them fails only once the data is prepared, so here instead."""
    from raylm.config import DataConfig

    data, pre = configs.get("data"), configs.get("pretrain")
    if data is None or pre is None:
        return
    have, want = data.data.seq_len, pre.data.seq_len
    if have != want and want != DataConfig().seq_len:
        raise ConfigError(f"recipe {recipe.path}: stages.pretrain: data.seq_len={want}, but the data stage "
                          f"prepares blocks of data.seq_len={have}; set one value for both (a shared data.seq_len), "
                          f"or leave pre-training's at its default to take the data stage's")
    if have > pre.model.max_seq_len:
        raise ConfigError(f"recipe {recipe.path}: stages.pretrain: the data stage prepares data.seq_len={have}, more "
                          f"than model.max_seq_len={pre.model.max_seq_len}; raise model.max_seq_len or lower "
                          f"data.seq_len")


def stage_config(recipe: Recipe, stage: Stage, inputs: dict) -> Config:
    """The stage's raylm config: its defaults, the shared settings, its section, then what the
    pipeline decides (where it writes, what it starts from). Errors name the stage and key."""
    section, options = recipe.sections[stage.name]
    base: dict = {}
    if stage.name in ("sft", "dpo"):
        from raylm.cli import STAGE_DEFAULTS

        base = _merge(STAGE_DEFAULTS[stage.name], {"stage": stage.name})
        # The shared data.path is the pre-training corpus; records must be named here.
        if "path" not in section.get("data", {}) and "synthetic" not in options:
            raise ConfigError(f"recipe {recipe.path}: stages.{stage.name}: needs data.path (the "
                              f"{'chat' if stage.name == 'sft' else 'preference'} records) or synthetic: TASK")
    data = _merge(_merge(base, recipe.shared), section)
    if stage.name in ("sft", "dpo") and "val_path" not in section.get("data", {}):
        # The shared data.val_path is the corpus's held-out part; records hold out their own.
        data = _merge(data, {"data": {"val_path": ""}})
    data.pop("serve", None)  # `raylm serve`'s own config: serve_config()
    data = _merge(data, {"storage": recipe.root, "name": f"{stage.name}-{stage_key(recipe, stage)[:10]}"})
    if "tokenizer" in inputs:
        data = _merge(data, {"tokenizer": {"path": inputs["tokenizer"]["path"]}})
    if stage.name == "data":
        _data_corpus_and_tokenizer(recipe, data)
        # Only the built-in corpus is adopted: a tokenizer section's own data.path (a sample
        # to train it on) is not the corpus the data stage prepares (refused above).
        if "tokenizer" in inputs and not data.get("data", {}).get("path") and inputs["tokenizer"].get("corpus"):
            data = _merge(data, {"data": {"path": inputs["tokenizer"]["corpus"]}})
    if "data" in inputs and stage.name == "pretrain":
        data = _merge(data, {"data": {"path": inputs["data"]["path"]}})
    parents = [k for k in inputs if k in MODEL_STAGES]
    if parents and stage.name in ("sft", "dpo"):
        data = _merge(data, {"init_from": inputs[parents[0]]["path"]})
    if stage.name in ("sft", "dpo") and not data.get("init_from"):  # raylm.posttrain refuses it when it runs
        before = "a pretrain stage" if stage.name == "sft" else "a pretrain or sft stage"
        raise ConfigError(f"recipe {recipe.path}: stages.{stage.name}: needs {before}, or init_from")
    if stage.name in ("eval", "export") and not parents:
        raise ConfigError(f"recipe {recipe.path}: stages.{stage.name}: needs a pretrain, sft or dpo stage before it")
    if stage.name == "serve" and not parents:
        raise ConfigError(f"recipe {recipe.path}: stages.serve: needs a pretrain, sft or dpo stage before it")
    if stage.name == "serve":
        serve_config(recipe)
    try:
        cfg = _build(Config, data, "").validate()
    except ConfigError as e:
        raise ConfigError(f"recipe {recipe.path}: stages.{stage.name}: {e}") from None
    if stage.name == "eval":
        _check_eval_work(recipe, stage, cfg)
    return cfg


def _data_corpus_and_tokenizer(recipe: Recipe, data: dict) -> None:
    """The data stage needs a tokenizer and a corpus, known from the recipe alone: refused here
    rather than when the stage runs (a tokenizer section's sample is not the corpus)."""
    own = data.get("data", {}).get("path")
    tok_section = recipe.sections["tokenizer"][0] if "tokenizer" in recipe.sections else None
    if tok_section is None and not data.get("tokenizer", {}).get("path"):
        raise ConfigError(f"recipe {recipe.path}: stages.data: needs a tokenizer stage before it, or tokenizer.path "
                          f"(a trained tokenizer)")
    if not own and (tok_section is None or tok_section.get("data", {}).get("path")):
        why = "stages.tokenizer.data.path is the tokenizer's sample, not the corpus; " if tok_section else ""
        raise ConfigError(f"recipe {recipe.path}: stages.data: no corpus to prepare ({why}give data.path, shared "
                          f"or as stages.data.data.path)")


def _check_eval_work(recipe: Recipe, stage: Stage, cfg: Config) -> None:
    """What run_eval would refuse once the model stages before it had run: two task files of
    one name, or nothing to evaluate (its default, bits per byte on the recipe's corpus, needs
    the shared data.path or the corpus the tokenizer stage reads)."""
    from raylm.eval.tasks import check_task_names

    try:  # raylm.eval.run refuses two task files of one name, but only once it runs
        check_task_names(cfg.eval.mc_tasks, cfg.eval.gen_tasks)
    except ConfigError as e:
        raise ConfigError(f"recipe {recipe.path}: stages.eval: {e}") from None
    options = recipe.sections[stage.name][1]
    if options.get("tasks") or options.get("corpora") or cfg.eval.mc_tasks or cfg.eval.gen_tasks:
        return
    if not cfg.data.path and "tokenizer" not in recipe.inputs_of(stage):
        raise ConfigError(f"recipe {recipe.path}: stages.eval: nothing to evaluate; give tasks, corpora or "
                          f"eval.mc_tasks, or a shared data.path (bits per byte on it)")


def serve_config(recipe: Recipe):
    """The serve stage's ServeConfig: `serve.*` keys, shared then the stage's own. The API key
    is refused here: recipes are files, and the key belongs in $RAYLM_API_KEY (a Secret)."""
    from raylm.config import ServeConfig

    own = recipe.sections["serve"][0].get("serve")
    own = {} if own is None else own  # `serve:` with every key commented out: none
    if not isinstance(own, dict):  # `serve: 5` in the section: _merge would fail on it
        raise ConfigError(f"recipe {recipe.path}: stages.serve.serve: expected a mapping of serve.* keys, "
                          f"got {own!r:.80}")
    data = _merge(recipe.shared.get("serve", {}), own)
    if data.get("api_key"):
        raise ConfigError(f"recipe {recipe.path}: serve.api_key does not belong in a file; set $RAYLM_API_KEY "
                          f"where the server runs (a Kubernetes Secret on KubeRay)")
    try:
        cfg = _build(ServeConfig, data, "serve.").validate()
    except ConfigError as e:
        raise ConfigError(f"recipe {recipe.path}: stages.serve: {e}") from None
    if cfg.engine != "raylm":  # here, when the recipe loads, not once every model stage before it ran
        raise ConfigError(f"recipe {recipe.path}: stages.serve: serve.engine={cfg.engine} serves an HF export; a "
                          f"recipe serves its run with serve.engine=raylm (or run `raylm serve --engine "
                          f"{cfg.engine}` on the export)")
    return cfg


# How a stage gets its outputs, not what they are: out of the key, so a resubmission with more
# retries (or another S3 endpoint for the same bucket) resumes the same run, not a new one.
OPERATIONAL_OPTIONS = ("max_failures", "samples")
OPERATIONAL_KEYS = ("name", "storage", "s3")


def stage_key(recipe: Recipe, stage: Stage) -> str:
    """sha256 of what decides a stage's outputs: its settings (shared and its own, without where
    they are stored or how often a failure is retried), the keys of the stages it reads, and
    the versions of raylm's prepared-data format, text encoding and cleaning, and for SFT and
    DPO of how records become rows (a data stage or records a raylm
    before them finished is run again, as a dataset key would have it, not kept for training
    by its settings alone). A change anywhere upstream changes it."""
    from raylm.chat_data import CHAT_ENCODING, KIND_ROWS, KINDS
    from raylm.data import CLEANING, FORMAT_VERSION, TEXT_ENCODING

    section, options = recipe.sections[stage.name]
    shared = {k: v for k, v in recipe.shared.items() if k not in OPERATIONAL_KEYS}
    section = {k: v for k, v in section.items() if k not in OPERATIONAL_KEYS}
    options = {k: v for k, v in options.items() if k not in OPERATIONAL_OPTIONS}
    parents = {s: stage_key(recipe, STAGE_BY_NAME[s]) for s in recipe.inputs_of(stage)}
    formats = {"data": FORMAT_VERSION, "text": TEXT_ENCODING, "cleaning": CLEANING}
    if stage.name in KINDS:  # how records become rows, as raylm.chat_data's dataset key has it
        formats["chat"] = {"encoding": CHAT_ENCODING, "rows": KIND_ROWS[stage.name]}
    text = json.dumps({"stage": stage.name, "shared": shared, "section": section, "options": options,
                       "inputs": parents, "formats": formats}, sort_keys=True, default=str)
    return _sha256(text.encode())


# --------------------------------------------------------------------------- input files


def input_files(recipe: Recipe, stage: Stage, cfg: Config) -> list[str]:
    """The paths (files, directories, globs) a stage reads that no stage of the recipe writes,
    as `cfg`, its config, names them: the corpus, chat or preference records, eval corpora and
    task files, and the run or checkpoint a model stage starts from (`outside_init_from`). A
    training stage's in-training eval tasks (eval.every) are not among them: an edit changes
    what its metrics would have said, not its weights, so it does not retrain. A path the recipe sets from an input stage's
    outputs is left out (that stage's key covers it), as is a tokenizer.path the tokenizer stage
    adopts (it checks its sha256); without a tokenizer stage, the data and pre-training stages
    list the tokenizer.path they read."""
    options = recipe.sections[stage.name][1]
    paths: list[str] = []
    if stage.name == "tokenizer" and not cfg.tokenizer.path:
        paths = [cfg.data.path]  # empty: the built-in corpus, which the stage writes
    elif stage.name == "data" or (stage.name == "pretrain" and "data" not in recipe.inputs_of(stage)):
        paths = [cfg.data.path, cfg.data.val_path]
    elif stage.name in ("sft", "dpo") and "synthetic" not in options:
        paths = [cfg.data.path]
    elif stage.name == "eval":
        paths = [*options.get("corpora", []), *cfg.eval.mc_tasks, *cfg.eval.gen_tasks]
        if not paths and not options.get("tasks"):  # bits per byte on the recipe's corpus (run_eval)
            paths = [cfg.data.path]
    if stage.name in ("data", "pretrain") and "tokenizer" not in recipe.inputs_of(stage):
        paths += [cfg.tokenizer.path]  # a trained tokenizer adopted with no tokenizer stage to check it
    if stage.name in MODEL_STAGES:
        paths += [outside_init_from(recipe, stage, cfg)]
    return [p for p in paths if p]


def outside_init_from(recipe: Recipe, stage: Stage, cfg: Config) -> str:
    """The run or checkpoint a model stage starts from that no stage of the recipe makes: a
    pre-training init_from, or SFT's and DPO's with no model stage before them; '' if none."""
    if stage.name not in MODEL_STAGES or any(s in MODEL_STAGES for s in recipe.inputs_of(stage)):
        return ""
    return cfg.init_from


def _init_from_digest(path: str, s3: S3Config, content: bool = True) -> str:
    """_listing_digest of the weights a stage starting from `path` loads: the checkpoint it names
    (a run directory: its newest complete one, so one committed since changes it), or a Hugging
    Face directory. A run's other files (its metrics, its lock) are not listed: they change
    while it trains on, and the weights read do not. Nothing there yet: the path listed as it is
    (the stage refuses it when it runs)."""
    from raylm.generate import resolve_checkpoint
    from raylm.hf import is_hf_dir

    if not is_hf_dir(path, s3):
        try:
            path = resolve_checkpoint(path, s3)
        except PathNotFoundError:
            pass
    return _listing_digest(path, s3, content)


# Local files a path lists at most this many bytes of in all are hashed, not dated: records or
# task files copied or checked out again unchanged (new mtimes) keep their stages. A larger
# corpus is dated: reading it on every run would take about as long as preparing it. S3 ETags
# follow the content already.
CONTENT_HASH_BYTES = 64 << 20


def _listing_digest(path: str, s3: S3Config, content: bool = True, places: tuple = ()) -> str:
    """sha256 of what a listing says of the files at `path`: each one's URI, size and S3 ETag or
    local mtime, as raylm.data's dataset key has them (and make or DVC decide what changed).
    A listing, not the content: hashing a corpus of terabytes on every run would take hours,
    and an S3 listing returns a thousand files' ETags a request. An edit, a file added or
    removed changes it. Local files of CONTENT_HASH_BYTES or less in all give the sha256 of
    their bytes for their mtime (`content`; False: the mtime, as a raylm before it recorded), so
    one touched without a change leaves it as it was; a larger corpus touched runs its stage again.
    Nothing there gives the digest of no files, so a path that appears later changes it.
    `places`: the files under a moved root named as they were there (_moved_files)."""
    from raylm.pipeline import named_where_written

    files = storage.list_files(path, s3, follow_links=True)
    hashed = content and not storage.is_s3(path) and sum(f.size for f in files) <= CONTENT_HASH_BYTES
    rows = [[there.uri, f.size, _sha256(storage.read_bytes(f.uri, s3)) if hashed else f.etag_or_mtime]
            for f, there in zip(files, named_where_written(files, list(places)))]
    return _sha256(json.dumps(rows).encode())


# A stage record's options entry: {path: _listing_digest} of the stage's input_files when it ran.
INPUT_FILES = "input_files"


def input_fingerprint(recipe: Recipe, stage: Stage, s3: S3Config, listed: dict | None = None,
                      content: bool = True, places: tuple = ()) -> dict[str, str]:
    """{path: listing digest} of the files the stage reads (input_files, as the recipe names
    them: its config built on placeholders, so a path an input stage gives is not among them).
    `listed`: digests already made in this run (the shared corpus is read by several stages).
    `content`, `places`: as _listing_digest takes them."""
    listed = {} if listed is None else listed
    named = stage_config(recipe, stage, _placeholders(recipe, stage))
    init_from = outside_init_from(recipe, stage, named)
    out = {}
    for path in input_files(recipe, stage, named):
        weights = path == init_from
        if (weights, content, places, path, s3) not in listed:
            listed[weights, content, places, path, s3] = _init_from_digest(path, s3, content) if weights \
                else _listing_digest(path, s3, content, places)
        out[storage.redact_url(path)] = listed[weights, content, places, path, s3]
    return out


def _changed_files(old: dict, files: dict[str, str], dated: Callable[[], dict[str, str]]) -> list[str]:
    """The paths whose listing differs from the one the stage's record holds. A record written
    before raylm listed input files holds none, and one written before it listed some of them
    (an outside init_from) holds no digest for those: taken as unchanged, there
    being nothing to compare (running every finished stage again would retrain them all on an
    upgrade). The paths a stage reads follow from its settings, which its key covers, so with
    the key unchanged a path missing from the record is one an older raylm did not list.
    `dated`: the digests with local files dated, as an older raylm recorded small ones too; a
    path whose record matches them has not changed either."""
    recorded = (old.get("options") or {}).get(INPUT_FILES)
    if not isinstance(recorded, dict):
        return []
    changed = [p for p in sorted(recorded) if files.get(p) != recorded[p]]
    if changed:
        then = dated()
        changed = [p for p in changed if then.get(p) != recorded[p]]
    return changed


def _moved_files(recipe: Recipe, stage: Stage, old: dict, changed: list[str], s3: S3Config,
                 listed: dict) -> list[str]:
    """Those of the `changed` paths whose listing differs from the record's also with the
    files under the recipe's root named under the root the record was written under: a
    recipe's storage moved (a move, cp -a, rsync -a) with a corpus inside it, the same names,
    sizes and dates, changed nothing (its stages ran again, the pretrain stage from scratch)."""
    try:
        written = json.loads(storage.read_text(record_uri(recipe, stage.name), s3))["config"]["storage"]
    except (storage.StorageError, json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
        return changed
    if not isinstance(written, str) or not written or written.rstrip("/") == recipe.root.rstrip("/"):
        return changed
    places = ((recipe.root.rstrip("/"), written.rstrip("/")),)
    recorded = old["options"][INPUT_FILES]
    for content in (True, False):
        if changed:
            there = input_fingerprint(recipe, stage, s3, listed, content=content, places=places)
            changed = [p for p in changed if there.get(p) != recorded[p]]
    return changed


def _learn_files(recipe: Recipe, stage: Stage, old: dict, files: dict[str, str], s3: S3Config) -> dict:
    """A skipped stage's record with the digests of the files it lacks (`_changed_files`) added,
    as they are now (there is nothing older to take), written back: an edit to them from now on
    runs the stage again."""
    recorded = (old.get("options") or {}).get(INPUT_FILES)
    recorded = recorded if isinstance(recorded, dict) else {}
    if not set(files) - set(recorded):
        return old
    record = {**old, "options": {**(old.get("options") or {}), INPUT_FILES: {**files, **recorded}}}
    storage.write_text(record_uri(recipe, stage.name), json.dumps(record, indent=1), s3)
    return record


# --------------------------------------------------------------------------- running


def record_uri(recipe: Recipe, stage: str) -> str:
    return storage.join(recipe.root, STAGE_RECORDS, f"{stage}.json")


def read_stage_record(recipe: Recipe, stage: str, s3: S3Config) -> dict | None:
    uri = record_uri(recipe, stage)
    if not storage.exists(uri, s3):
        return None
    try:
        record = json.loads(storage.read_text(uri, s3))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # written whole: a broken one is foreign, rerun
        return None
    # JSON, but not a record (a list, a string, outputs that are not a mapping): foreign, rerun
    if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict):
        return None
    return _relocated(record, recipe.root)


def _relocated(record: dict, root: str) -> dict:
    """A record written under another root (the recipe's storage copied or moved to another
    directory or bucket) with the paths under that root (its inputs', outputs' and config's)
    named under this one, where the copies are. As recorded they named the original: the
    copy's stages were skipped but read, trained from and served what the original held, or,
    the original gone, all ran again (the data prepared anew, and pre-training's resume
    refused it)."""
    config = record.get("config")
    old = config.get("storage") if isinstance(config, dict) else None
    if not isinstance(old, str) or not old or old.rstrip("/") == root.rstrip("/"):
        return record
    old, new = old.rstrip("/"), root.rstrip("/")

    def move(value):
        if isinstance(value, str) and (value == old or value.startswith(old + "/")):
            return new + value[len(old):]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return move(record)  # its config too: written back (_learn_files), it reads as this root's


# Stages whose directory, kept from a run on other inputs, would be reused as it is when they run
# again (the tokenizer stage keeps a tokenizer trained there; the pretrain stage is not here:
# resuming refuses another tokenizer or dataset by itself, and resumes one re-prepared alike;
# the data stage re-prepares by its dataset key, which covers its files).
REDONE_FROM_SCRATCH = ("tokenizer", "sft", "dpo", "eval", "export")


def _trained_on_other_data(cfg: Config) -> bool:
    """Whether the pre-training run in cfg.run_dir trained on another tokenizer or dataset than
    cfg names now: its newest complete checkpoint records both (raylm.train.checkpoint_facts),
    compared as raylm.pipeline.check_resume_before_data makes them (`data_key`). A run that
    did would be refused on resume, and the recipe could not go on: its directory follows
    from the stage key, which names no data. One re-made alike (a lost input prepared again)
    resumes, and so does one moved with its corpus (raylm.pipeline.moved_data_key)."""
    from raylm import checkpoint
    from raylm.generate import load_tokenizer
    from raylm.pipeline import absolute_paths, data_key, moved_data_key, preflight

    ckpt = checkpoint.latest_complete(cfg.run_dir, cfg.s3)
    if ckpt is None:
        return False
    meta = checkpoint.read_meta(ckpt, cfg.s3)
    cfg, corpus = preflight(absolute_paths(cfg))
    tok = load_tokenizer(cfg.tokenizer.path, cfg.s3)
    if not cfg.data.path:  # the built-in corpus, written when the stage runs: the tokenizer decides
        return meta.get("tokenizer_sha256") != tok.sha256
    key, corpus = data_key(cfg, tok.sha256, corpus)
    then = meta.get("data_key")
    # a run moved with its corpus (the recipe's storage moved) takes the key its files had there
    same = then == key or (then and moved_data_key(cfg, tok.sha256, corpus, meta) == then)
    return meta.get("tokenizer_sha256") != tok.sha256 or not same


def run_recipe(recipe: Recipe, log: Callable[[str], None] | None = None) -> dict:
    """Run the recipe's stages in order, skipping those done; returns {stage: record}."""
    from raylm.record import write_stage_record

    if log is None:
        from raylm.pipeline import log
    done: dict[str, dict] = {}
    listed: dict = {}
    for stage in recipe.stages:
        parents = recipe.inputs_of(stage)  # earlier in STAGES, so done already
        inputs = {p: done[p]["outputs"] for p in parents}
        cfg = stage_config(recipe, stage, inputs)
        key = stage_key(recipe, stage)
        files = input_fingerprint(recipe, stage, cfg.s3, listed)
        old = read_stage_record(recipe, stage.name, cfg.s3)
        if old and old.get("key") == key and stage.committed(old.get("outputs", {}), cfg.s3):
            # The same key, but an input that reran (its outputs were lost) may differ now, and
            # so may a file it reads (records edited, a corpus file added).
            changed = [p for p in parents
                       if old.get("inputs", {}).get(p, {}).get("sha256") != done[p]["outputs"]["sha256"]]
            dated = functools.partial(input_fingerprint, recipe, stage, cfg.s3, listed, content=False)
            changed_files = _changed_files(old, files, dated)
            if changed_files:
                changed_files = _moved_files(recipe, stage, old, changed_files, cfg.s3, listed)
            changed += changed_files
            if not changed:
                log(f"recipe: {stage.name}: done (key {key[:10]}), skipped")
                done[stage.name] = {**_learn_files(recipe, stage, old, files, cfg.s3), "skipped": True}
                continue
            log(f"recipe: {stage.name}: {', '.join(changed)} changed since it ran, running it again")
            corpus = {storage.redact_url(p) for p in (cfg.data.path, cfg.data.val_path) if p}
            if stage.name in REDONE_FROM_SCRATCH or (stage.name == "pretrain" and (
                    any(p not in corpus for p in changed_files) or _trained_on_other_data(cfg))):
                # Its directory holds what the old inputs made, which the stage would reuse: an
                # export whose marker is there, a training run resumed from its own checkpoints
                # (started from the old parent or the old init_from, or trained on another tokenizer or dataset, which pre-training's resume
                # would refuse). Removed, so it is made from the new ones.
                log(f"recipe: {stage.name}: removing {storage.redact_url(cfg.run_dir)}, made from the old inputs")
                _empty_run_dir(cfg)
        log(f"recipe: {stage.name}: running (key {key[:10]}) -> {storage.redact_url(cfg.run_dir)}")
        t0 = time.time()
        options = recipe.sections[stage.name][1]
        outputs = stage.run(StageRun(stage.name, cfg, options, inputs, cfg.run_dir, recipe.root, log, recipe))
        lineage = {p: {"key": done[p]["key"], "sha256": done[p]["outputs"]["sha256"], "path": done[p]["outputs"]["path"]}
                   for p in parents}
        if stage.name == "serve":  # what the server runs with, recorded beside the (unused) run config
            options = {**options, "serve": to_dict(serve_config(recipe))}
        if files:
            options = {**options, INPUT_FILES: files}
        record = write_stage_record(record_uri(recipe, stage.name), stage.name, key, cfg, options, lineage,
                                    outputs, round(time.time() - t0, 1))
        log(f"recipe: {stage.name}: done in {time.time() - t0:.1f}s, record {record_uri(recipe, stage.name)}")
        done[stage.name] = {**record, "skipped": False}
    return done


def _empty_run_dir(cfg: Config) -> None:
    """Remove what a stage's directory holds, holding it as the stage itself does: a process
    at work there (a second `raylm recipe`, the stage run by hand) has it refused in one line,
    where it lost its checkpoints mid-run. The lock stays while it is held (a lease deleted
    under its holder's renewals reads as taken over) and goes when it is let go."""
    with run_lock.held(cfg.run_dir, "run", cfg.s3):
        if storage.is_s3(cfg.run_dir):
            names = {storage.relative(f.uri, cfg.run_dir).split("/")[0]
                     for f in storage.list_files(cfg.run_dir, cfg.s3, pattern=False)}
        else:
            names = set(os.listdir(storage._local(cfg.run_dir)))
        for name in sorted(names - {run_lock.RUN_LOCK}):
            storage.delete(storage.join(cfg.run_dir, name), cfg.s3)


def lineage(recipe: Recipe, stage: str, s3: S3Config | None = None) -> list[dict]:
    """The stage records from `stage` back to the first stage: each step follows the input
    that carries the model (the tokenizer only where nothing else is read). Only stages before
    the one read are followed: a record naming a later stage, or none of the recipe's, would
    have the chain go round for ever or read a file outside `stages/`."""
    order = [s.name for s in STAGES]
    chain, name = [], stage
    while name:
        rec = read_stage_record(recipe, name, s3 or S3Config())
        if rec is None:
            break
        chain.append(rec)
        inputs = rec.get("inputs") if isinstance(rec.get("inputs"), dict) else {}
        inputs = [k for k in inputs if name in order and k in order[:order.index(name)]]
        name = ([k for k in inputs if k != "tokenizer"] or inputs or [None])[-1]
    return chain
