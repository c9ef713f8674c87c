"""raylm tune: hyperparameter search where every trial is a real raylm training run.

A search is a base config (as for `raylm pretrain`), a search space over its keys, and a
`TuneConfig`. The corpus, tokenizer and prepared blocks are made once, in the search's own
run directory `<storage>/<name>`, and every trial trains on them: a function trainable
(`run_trial`) builds the trial's config and calls `raylm.train_ray.run_ray_training`, the path
`pretrain` takes, with Tune's `TuneReportCallback` among the Train run's callbacks, so rank
0's reports (validation loss at every evaluation) reach Tune, where ASHA can stop a poor
trial at a rung. Each trial is a normal run under `<storage>/<name>/runs/<trial id>`.

Search space (YAML, Tune's vocabulary; keys dotted or nested; a `tune:` section sets the
TuneConfig):

    train.lr: loguniform(1e-4, 3e-3)
    train.warmup_steps: choice([50, 100, 200])
    model.n_layers: grid_search([2, 4])
    train.weight_decay: uniform(0.0, 0.2)
    train.micro_batch_size: randint(2, 9)     # an integer in [2, 9), as Tune's randint
    tune: {num_samples: 8, scheduler: asha}

Every key, and every extreme or listed value of its distribution, is checked against the
config (`raylm.config.load_config`) before any trial starts. A space that samples nothing
(only grid_search keys and constants; always so for `tune.search=grid`) runs each grid point
once (tune.num_samples 1, its default there; Tune would run the grid num_samples times, each
repeat the same config and seed): repeats are `seed: grid_search([0, 1, ...])`.

Outputs in `<storage>/<name>/`: `results.csv` (the ranked table, also printed),
`best.yaml` (the best trial's config, ready for `raylm pretrain --config`), `val_loss.png`
(validation loss against step for every trial; stopped trials dashed, ending in a cross),
and `search.json` (what `--resume` needs; Tune's own state lies beside it).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from raylm import run_lock, storage
from raylm.config import (Config, ConfigError, TrainConfig, TuneConfig, load_config, load_yaml, metric_mode, to_dict,
                          tune_config, yaml_problem)
from raylm.errors import PathNotFoundError

SEARCH_FILE = "search.json"
RUNS = "runs"  # trials' run directories, under the search's

# --------------------------------------------------------------------------- search space

# Distribution -> (argument count, what it takes), in Tune's names.
DISTRIBUTIONS = {
    "loguniform": (2, "loguniform(low, high) with 0 < low < high"),
    "uniform": (2, "uniform(low, high) with low < high"),
    "randint": (2, "randint(low, high): integers low <= x < high"),
    "choice": (1, "choice([a, b, ...]), a non-empty list"),
    "grid_search": (1, "grid_search([a, b, ...]), a non-empty list"),
}
_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)

# Trials share the search's corpus, tokenizer and prepared blocks, and write where it says.
FIXED_PREFIXES = ("name", "storage", "stage", "init_from", "tokenizer.", "data.", "s3.", "model.vocab_size")
SEARCHABLE_DATA = ("data.document_mask",)  # training-time switches that need no re-preparation
# A trial's resources: a local cluster is sized from the base config's, and a trial drawing more
# workers than that waited for them for ever (Ray Train's worker start timing out every 60 s).
RESOURCE_KEYS = ("train.num_workers", "train.cpus_per_worker", "train.use_gpu")


@dataclass(frozen=True)
class Dimension:
    """One key of the search space: a constant (kind "value") or a Tune distribution."""

    key: str
    kind: str
    args: tuple

    def domain(self):
        """The Tune object for param_space."""
        from ray import tune

        if self.kind == "value":
            return self.args[0]
        if self.kind in ("choice", "grid_search"):
            return getattr(tune, self.kind)(list(self.args[0]))
        return getattr(tune, self.kind)(*self.args)

    def probes(self) -> list:
        """The values checked against the config: the ends of a range, every listed value."""
        if self.kind == "value":
            return [self.args[0]]
        if self.kind in ("choice", "grid_search"):
            return list(self.args[0])
        lo, hi = self.args
        return [lo, hi - 1] if self.kind == "randint" else [float(lo), float(hi)]  # Tune draws floats

    def holds(self, value) -> bool:
        """Whether `value` is one this key's distribution draws (a trial's config as Tune
        saves it, in JSON: lists for tuples)."""
        if self.kind in ("value", "choice", "grid_search"):
            return any(_same(value, v) for v in (self.args if self.kind == "value" else self.args[0]))
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not _finite(value):
            return False
        lo, hi = self.args
        if self.kind == "randint":
            return isinstance(value, int) and lo <= value < hi
        slack = 1e-9 * max(abs(lo), abs(hi))  # Tune's loguniform draws exp(uniform(log lo, log hi))
        return lo - slack <= value <= hi + slack

    def __str__(self) -> str:
        if self.kind == "value":
            return repr(self.args[0])
        return f"{self.kind}({', '.join(repr(a) for a in self.args)})"


def _same(a, b) -> bool:
    """a == b as config values: a bool is not a number, a list and a tuple of equal items are alike."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                             and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def check_trial_params(space: dict[str, "Dimension"], params, where: str) -> None:
    """A trial's config (from Tune: saved in the search's state, or drawn by its searcher,
    whose state is saved there too) is the space's keys, each with a value its distribution
    draws: checked by the driver before a resume and by every trial before it starts, since
    a value outside the space (data.path, s3.endpoint_url, storage, ...) goes unchecked by
    check_space. ConfigError naming `where` and the key."""
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: {type(params).__name__}, not a trial's parameters; the search's state was "
                          f"changed since raylm saved it: start the search anew")
    keys = set(params)
    odd = sorted(keys - set(space)) or sorted(set(space) - keys)
    if odd:
        what = "not a key of" if odd[0] in keys else "missing; a key of"
        raise ConfigError(f"{where}: {odd[0]} is {what} the search space ({', '.join(sorted(space))}); the search's "
                          f"state was changed since raylm saved it: start the search anew")
    for key, value in params.items():
        if not space[key].holds(plain(value)):
            raise ConfigError(f"{where}: {key}={_show(value)} is not a value of {space[key]}; the search's state was "
                              f"changed since raylm saved it: start the search anew")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _flatten(data: dict, prefix: str = "", where: str = "") -> dict[str, Any]:
    """Dotted keys of nested mappings; a key given twice (`train: {lr: ...}` and `train.lr:`)
    is a ConfigError naming `where`: one of the two would be searched, without a word."""
    out = {}
    for k, v in data.items():
        items = _flatten(v, f"{prefix}{k}.", where) if isinstance(v, dict) else {f"{prefix}{k}": v}
        for key, value in items.items():
            if key in out:
                raise ConfigError(f"{where}: {key} is given twice (nested and dotted); keep one")
            out[key] = value
    return out


def parse_dimension(where: str, key: str, value: Any) -> Dimension:
    """`value` as a Dimension; `where` (the file) prefixes every error."""
    if not isinstance(value, str) or not _CALL.match(value):
        return Dimension(key, "value", (value,))
    name, body = _CALL.match(value).groups()
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: {key}: unknown distribution {name!r} in {value!r}; "
                          f"expected one of {', '.join(DISTRIBUTIONS)}")
    n, usage = DISTRIBUTIONS[name]
    try:
        args = ast.literal_eval(f"({body},)") if body.strip() else ()
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # TypeError: {[1]: 2}
        raise ConfigError(f"{where}: {key}: cannot read the arguments of {value!r}; expected {usage}") from None
    if len(args) != n:
        raise ConfigError(f"{where}: {key}: {value!r} has {len(args)} argument(s); expected {usage}")
    if name in ("choice", "grid_search"):
        if not isinstance(args[0], (list, tuple)) or not args[0]:
            raise ConfigError(f"{where}: {key}: {value!r}; expected {usage}")
        return Dimension(key, name, (tuple(args[0]),))
    lo, hi = args
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) and _finite(a) for a in args)
    ints = all(isinstance(a, int) and not isinstance(a, bool) for a in args)
    if not numbers or (name == "randint" and not ints) or lo >= hi or (name == "loguniform" and lo <= 0):
        raise ConfigError(f"{where}: {key}: {value!r}; expected {usage}")
    return Dimension(key, name, (lo, hi))


def _finite(x: int | float) -> bool:
    """math.isfinite, but an int too large for a float (randint(0, 10**400)) is not an error."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def parse_space(text: str, where: str) -> tuple[dict[str, Dimension], dict]:
    """(dimensions by dotted key, the `tune:` section) of a search-space YAML document."""
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({yaml_problem(e)})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: expected a mapping of config keys to values or distributions, "
                          f"e.g. 'train.lr: loguniform(1e-4, 3e-3)'")
    settings = data.pop("tune", None) or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: tune: expected a mapping of search settings (num_samples, scheduler, ...)")
    space = {k: parse_dimension(where, k, v) for k, v in _flatten(data, where=where).items()}
    if not space:
        raise ConfigError(f"{where}: the search space is empty")
    return space, settings


def read_space(path: str, s3=None) -> tuple[dict[str, Dimension], dict, str]:
    """parse_space of a file (local or s3://); also returns its text, kept for --resume."""
    if not storage.exists(path, s3):
        raise PathNotFoundError(f"search space {path}: not found")
    try:
        text = storage.read_text(path, s3)
    except UnicodeDecodeError:
        raise ConfigError(f"search space {path}: not UTF-8 text; pass a YAML file") from None
    space, settings = parse_space(text, f"search space {path}")
    return space, settings, text


def trial_metrics(cfg: Config) -> list[str]:
    """What a trial's evaluations report to Tune, so what tune.metric can rank trials on: the
    validation row of raylm.train.fit (a pre-training run's) and, with eval.every, the
    in-training task scores of raylm.eval.in_training. A metric added there belongs here."""
    from raylm.eval.tasks import GEN_METRICS, MC_METRICS, task_name

    names = ["val_loss", "val_ppl"]
    if cfg.eval.every:
        names += [f"eval_{task_name(p)}_{m}" for p in cfg.eval.mc_tasks for m in MC_METRICS]
        names += [f"eval_{task_name(p)}_{m}" for p in cfg.eval.gen_tasks for m in GEN_METRICS]
    return names


def check_metric(tc: TuneConfig, cfg: Config) -> None:
    """tune.metric is one the trials report: Tune takes any name and fails only once the first
    trial reports, with the search saved and its metric kept for --resume. And tune.mode is
    the metric's direction (its default, auto, is): with the wrong one (min with an accuracy)
    ASHA stops the best trials and best.yaml is the worst one's config, without a word."""
    allowed = trial_metrics(cfg)
    if tc.metric not in allowed:
        raise ConfigError(f"tune.metric={tc.metric!r}: expected one of {', '.join(allowed)}")
    want = metric_mode(tc.metric)
    if tc.mode != want:
        better = "lower" if want == "min" else "higher"
        raise ConfigError(f"tune.mode={tc.mode!r}: {tc.metric} is better when {better}; set tune.mode={want}")


def grace_period(tc: TuneConfig, cfg: Config) -> int:
    """ASHA's first rung, in steps: tune.grace_period, or (0) the first evaluation, which is
    the run's last step where train.eval_every is longer than the run."""
    return tc.grace_period or min(cfg.train.eval_every, cfg.train.max_steps)


def check_schedule(tc: TuneConfig, cfg: Config) -> None:
    """ASHA's first rung lies within a trial. Tune's ASHAScheduler asserts it (a bare
    AssertionError), and only once the data is prepared and search.json written, which then
    named a search that neither a new `raylm tune` nor `--resume` would start."""
    if tc.scheduler == "asha" and grace_period(tc, cfg) > cfg.train.max_steps:
        raise ConfigError(f"tune.grace_period={tc.grace_period}: ASHA's first rung lies past train.max_steps="
                          f"{cfg.train.max_steps}; lower it (0: the first evaluation)")


def samples(space: dict[str, Dimension]) -> bool:
    """Whether any key of the space is drawn from a distribution (not a grid or a constant)."""
    return any(d.kind not in ("grid_search", "value") for d in space.values())


def check_space(space: dict[str, Dimension], base: dict, tc: TuneConfig, where: str) -> None:
    """Every probe value of every key, alone and with the other keys at their low (then high)
    ends, loads as a valid config on top of `base`; and the space suits the searcher.
    Raises ConfigError naming the file, the key and the value."""
    for key, dim in space.items():
        fixed = key.startswith(FIXED_PREFIXES) and key not in SEARCHABLE_DATA
        if fixed:
            raise ConfigError(f"{where}: {key} cannot be searched: every trial shares the search's corpus, "
                              f"tokenizer, prepared data and storage")
        if key == "model.preset":
            # A preset is a whole model shape (its tokenizer size too), where a search compares
            # settings of one model; the fields a search varies are named one by one.
            raise ConfigError(f"{where}: model.preset cannot be searched (a preset is a whole model shape); "
                              f"search the fields themselves: model.dim, model.n_layers, model.n_heads, ...")
        if key in RESOURCE_KEYS:
            raise ConfigError(f"{where}: {key} cannot be searched: a trial's workers are the base config's, for "
                              f"which the cluster is sized (tune.max_concurrent_trials of them); set it in the "
                              f"base config (--config or {key}=...)")
        for value in dim.probes():
            _load(base, [(key, value)], f"{where}: {key}: {dim}: ")
    for end in (0, -1):  # keys that only fail together (model.dim with model.n_heads)
        _load(base, [(k, d.probes()[end]) for k, d in space.items()], f"{where}: the values at the "
              f"{'low' if end == 0 else 'high'} end of every range together: ")
    if tc.search == "grid":
        loose = [k for k, d in space.items() if d.kind not in ("grid_search", "value")]
        if loose:
            raise ConfigError(f"{where}: tune.search=grid needs grid_search([...]) or a constant for every key; "
                              f"{loose[0]} is {space[loose[0]]}")
    if tc.search == "optuna":
        grid = [k for k, d in space.items() if d.kind == "grid_search"]
        if grid:
            raise ConfigError(f"{where}: tune.search=optuna samples; {grid[0]} is a grid_search (use choice)")
    # Tune runs the whole grid num_samples times; with nothing sampled (always so for
    # search=grid) and the seed fixed, every repeat is the same config trained again (a
    # 2-point grid at 8 ran 16 trials).
    if tc.num_samples != 1 and not samples(space):
        repeats = "choice" if tc.search == "optuna" else "grid_search"  # what that searcher takes
        raise ConfigError(f"{where}: tune.num_samples={tc.num_samples}: nothing in the space is sampled, so each "
                          f"grid point runs once (a repeat is the same config and seed); set 1, or search "
                          f"seed: {repeats}([0, 1, ...]) for repeats")
    if tc.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search=optuna needs optuna: pip install -e '.[tune]'") from None


def _load(base: dict, overrides: list, context: str) -> Config:
    try:
        return load_config(base=base, overrides=overrides)
    except ConfigError as e:
        raise ConfigError(context + str(e)) from None


def plain(value):
    """numpy scalars (Tune's integer draws) as Python ones, which the config's types accept."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)) else value


# --------------------------------------------------------------------------- one trial


def run_trial(params: dict, setup: dict) -> None:
    """Tune's function trainable: one raylm run with the trial's parameters, through
    `run_ray_training` (as `pretrain`), named after the trial id. A trial restarted by a
    resumed search continues from its own newest complete checkpoint."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylm.data import prepared_datasets
    from raylm.generate import load_tokenizer
    from raylm.pipeline import keep_in_run, quiet_ray_data
    from raylm.record import write_record
    from raylm.train_ray import run_ray_training

    quiet_ray_data()  # this trial's datasets are made here, not in the driver
    trial_id = ray.tune.get_context().get_trial_id()
    params = {k: plain(v) for k, v in params.items()}
    space, _ = parse_space(setup["space_text"], setup["space_where"])
    check_trial_params(space, params, f"trial {trial_id}")
    cfg = load_config(base=setup["base"], overrides=[*params.items(), ("name", trial_id),
                                                     ("storage", setup["runs_dir"])])
    tok = load_tokenizer(cfg.tokenizer.path, cfg.s3)
    own_tok = storage.join(cfg.run_dir, "tokenizer")  # runs are self-contained, as pretrain's
    keep_in_run(tok, own_tok, cfg.s3)
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=own_tok))
    manifest = setup["manifest"]
    write_record(cfg, "pretrain", tok, manifest, extra={"tune": {"search": setup["search_dir"],
                                                                 "trial_id": trial_id, "params": params}})
    result = run_ray_training(cfg, prepared_datasets(cfg.data.path, manifest, cfg.s3), manifest,
                              resume="auto", callbacks=[_reports_with(TuneReportCallback, setup["metric"])])
    if result.error:
        raise result.error


def _reports_with(base: type, metric: str):
    """Tune's report callback, passing on only the reports that hold `metric`. A trial reports
    a training row every train.log_every steps and the metric only at its evaluations, and
    Tune ends the whole search at a result without its metric (so every search whose log
    steps were not all evaluation steps, the defaults' included, failed at its first log)."""

    class ReportsWithMetric(base):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ReportsWithMetric()


# --------------------------------------------------------------------------- the search


def prepare_search(cfg: Config, tc: TuneConfig) -> tuple[Config, str, dict]:
    """Corpus, tokenizer and prepared blocks in the search's run directory, made once (as
    `pretrain` makes them). Returns the resolved base config (its "auto" worker counts each
    trial's share of the cluster), the data directory, the manifest."""
    from raylm.pipeline import (absolute_paths, check_gpus_here, ensure_corpus, ensure_data, ensure_tokenizer,
                                preflight, resolve_workers)

    cfg, corpus = preflight(absolute_paths(cfg))
    check_gpus_here(cfg)
    cfg = ensure_corpus(cfg)
    cfg, tok = ensure_tokenizer(cfg, corpus[0] if corpus else None)
    init_ray_for(cfg, tc)
    data_dir, manifest = ensure_data(cfg, tok, corpus)
    return resolve_workers(cfg, share=tc.max_concurrent_trials), data_dir, manifest  # "auto": a trial's share


def init_ray_for(cfg: Config, tc: TuneConfig) -> None:
    """Join or start Ray (`raylm.pipeline.init_ray`); a local cluster gets logical CPUs for
    every concurrent trial's workers, with the spare that init_ray keeps for Ray Data. Ray
    Data's cluster-wide actors are started here, on any cluster: made by a trial's worker
    instead, its stats actor dies with that trial's placement group, to be made again by the
    next trial, and one removed while it starts has Ray print a crash report with a stack trace."""
    from raylm.pipeline import init_ray, resolve_workers, start_ray_data_actors

    trial = resolve_workers(cfg, share=tc.max_concurrent_trials).train
    workers = trial.num_workers * tc.max_concurrent_trials + math.ceil(tc.driver_cpus * tc.max_concurrent_trials)
    init_ray(dataclasses.replace(cfg, train=dataclasses.replace(trial, num_workers=workers)), dashboard=True)
    start_ray_data_actors()


def _default_log(log):
    if log is not None:
        return log
    from raylm.pipeline import log  # imports Ray Data and torch: only once the checks have passed

    return log


def tune(cfg: Config, space_path: str, tune_overrides: dict | None = None, log=None) -> dict:
    """Run a new search named cfg.name under cfg.storage; returns `report`'s summary."""
    space, settings, text = read_space(space_path, cfg.s3)
    given = {**settings, **(tune_overrides or {})}
    tc = tune_config(given)
    if "num_samples" not in given and not samples(space):  # the default (8) is for spaces that sample
        tc = dataclasses.replace(tc, num_samples=1)
    check_metric(tc, cfg)
    check_schedule(tc, cfg)
    where = f"search space {space_path}"
    check_space(space, to_dict(cfg), tc, where)  # before anything starts: seconds, not minutes
    with run_lock.held(cfg.run_dir, "search", cfg.s3):  # before anything is written there
        return _new_search(cfg, space, tc, text, space_path, where, log)


def _new_search(cfg: Config, space: dict, tc: TuneConfig, text: str, space_path: str, where: str, log) -> dict:
    search_dir = cfg.run_dir
    if storage.exists(storage.join(search_dir, SEARCH_FILE), cfg.s3):
        raise ConfigError(f"{search_dir}: a search is already there; continue it with `raylm tune --resume "
                          f"name={cfg.name}` or choose another name")
    log = _default_log(log)
    base, data_dir, manifest = prepare_search(cfg, tc)
    base = dataclasses.replace(base, data=dataclasses.replace(base.data, path=data_dir))
    check_space(space, to_dict(base), tc, where)  # again, now that the vocabulary and seq_len are known
    # Written down redacted, as every record (an endpoint's password stays off disk and S3);
    # the trials get the S3 settings of the command line (`_run`).
    state = {"base": to_dict(base, redact=True), "space_text": text, "space_path": space_path, "tune": to_dict(tc),
             "data_dir": data_dir, "manifest": manifest,
             # as given: base holds a trial's share of the cluster, which best.yaml must not pin
             "workers": {"num_workers": cfg.train.num_workers, "cpus_per_worker": cfg.train.cpus_per_worker}}
    storage.write_text(storage.join(search_dir, SEARCH_FILE), json.dumps(state, indent=1), cfg.s3)
    return _run(state, cfg, resume=False, log=log)


def resume(cfg: Config, log=None) -> dict:
    """Continue the search cfg.name under cfg.storage (`raylm tune --resume`) through
    `Tuner.restore`: finished trials are kept, unfinished ones continue from their checkpoints.
    A search that stopped before Tune saved any state is started, with its saved space."""
    uri = storage.join(cfg.run_dir, SEARCH_FILE)
    if not storage.exists(uri, cfg.s3):
        raise PathNotFoundError(f"--resume: no search under {cfg.run_dir} (no {SEARCH_FILE}); check name= and storage=")
    with run_lock.held(cfg.run_dir, "search", cfg.s3):
        return _resumed_search(cfg, uri, log)


def _saved_state(uri: str, s3, keys: dict) -> dict:
    """search.json as raylm writes it: a JSON object with `keys` of their types; else one
    ConfigError naming the file (a damaged one, or another tool's file of that name)."""
    try:
        state = json.loads(storage.read_text(uri, s3))
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        state = None
    if not isinstance(state, dict):
        raise ConfigError(f"--resume: {uri}: not a search raylm saved (not a JSON object); start a new search "
                          f"(another name=)")
    return _check_saved(state, uri, keys)


def _check_saved(state: dict, uri: str, keys: dict) -> dict:
    for key, kind in keys.items():
        if not isinstance(state.get(key), kind):
            raise ConfigError(f"--resume: {uri}: {key} is missing or not a {kind.__name__}: not a search raylm "
                              f"saved; start a new search (another name=)")
    return state


def _resumed_search(cfg: Config, uri: str, log) -> dict:
    state = _saved_state(uri, cfg.s3, {"tune": dict, "base": dict})
    tc = tune_config(state["tune"])
    base = load_config(base=state["base"])
    try:  # saved by a raylm that took any metric
        check_metric(tc, base)
    except ConfigError as e:
        raise ConfigError(f"--resume: {uri}: {e}; Tune keeps a search's metric, so start a new search "
                          f"(another name=)") from None
    _check_saved(state, uri, {"space_text": str, "space_path": str, "manifest": dict})
    # The saved space, checked as a new search's: the trials' configs are checked against it.
    space, _ = parse_space(state["space_text"], f"--resume: {uri}: space_text")
    check_space(space, state["base"], tc, f"--resume: {uri}: space_text")
    # A local cluster sized for the saved trials (the command line names only the search).
    init_ray_for(dataclasses.replace(base, name=cfg.name, storage=cfg.storage, s3=cfg.s3), tc)
    return _run(state, cfg, resume=True, log=_default_log(log))


def _trainable(state: dict, search_dir: str):
    from ray import tune as rt

    base = state["base"]
    setup = {"base": base, "manifest": state["manifest"], "search_dir": search_dir,
             "runs_dir": storage.join(search_dir, RUNS), "metric": state["tune"]["metric"],
             "space_text": state["space_text"], "space_where": f"search space {state['space_path']}"}
    trainable = rt.with_parameters(run_trial, setup=setup)
    return rt.with_resources(trainable, {"CPU": state["tune"]["driver_cpus"]})


def _searcher(tc: TuneConfig):
    if tc.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=tc.seed))
    from raylm.tune_state import BasicVariantGenerator  # its saved state pickles without code

    # Tune applies max_concurrent_trials to a Searcher only; this generator takes it itself.
    return BasicVariantGenerator(random_state=tc.seed, max_concurrent=tc.max_concurrent_trials)


def _scheduler(tc: TuneConfig, base: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tc.scheduler == "fifo":
        return FIFOScheduler()
    check_schedule(tc, base)
    # Rungs are counted in optimizer steps ("step" in every report), not in Tune's report count.
    # A trial that reaches max_t ends by itself: stopped there by Tune (its default), its actor
    # is killed with the Train run's controller still winding down, whose placement group Ray
    # Train's cleaner then frees with a warning, for every trial that ran to the end.
    return ASHAScheduler(time_attr="step", max_t=base.train.max_steps, stop_last_trials=False,
                         grace_period=grace_period(tc, base), reduction_factor=tc.reduction_factor)


def _run(state: dict, cfg: Config, resume: bool, log=print) -> dict:
    import ray.tune as rt

    tc = tune_config(state["tune"])
    # saved redacted; the settings as validated (the trainable reads them: a key left out is its default)
    state = {**state, "base": {**state["base"], "s3": to_dict(cfg.s3)}, "tune": to_dict(tc)}
    base = load_config(base=state["base"])
    space, _ = parse_space(state["space_text"], f"search space {state['space_path']}")
    from raylm.pipeline import absolute_paths

    # Absolute: each trial runs in a working directory of Tune's own, where ./runs names
    # another place (the trials' runs went under Ray's session directory in /tmp).
    search_dir = absolute_paths(cfg).run_dir
    fs, root = storage.filesystem(cfg.storage, cfg.s3)
    trainable = _trainable(state, search_dir)
    # Tune reads config changes from its own storage path; an explicit filesystem takes the
    # path without its s3:// scheme.
    path = f"{root.rstrip('/')}/{cfg.name}"
    callbacks = [trial_log(log, base.train)]
    from raylm.tune_state import CheckedStateFileSystem, check_search_state

    if resume and rt.Tuner.can_restore(path, storage_filesystem=fs):
        # Tune's state unpickles: refused unless it runs no code; its data as raylm saves it.
        # Ray reads the bytes checked, not the files again (one swapped since would run unchecked),
        # and no trial's pickle (a failed trial's error.pkl, unpickled as fit() returns).
        checked = check_search_state(search_dir, cfg.s3,
                                     check_params=lambda p, where: check_trial_params(space, p, where))
        fs = CheckedStateFileSystem(fs, path, checked)
        tuner = rt.Tuner.restore(path, trainable, storage_filesystem=fs, resume_unfinished=True,
                                 resume_errored=True)
    else:
        fs = CheckedStateFileSystem(fs, path, {})  # no Tune state but its own, and no trial's pickle
        if resume:  # a new search refuses this name (search.json is there): this is the one way on
            log(f"tune: {search_dir} holds no Tune state yet (the search stopped before Tune started): "
                f"starting it with its saved space and settings")
        tuner = rt.Tuner(
            trainable,
            param_space={k: d.domain() for k, d in space.items()},
            tune_config=rt.TuneConfig(metric=tc.metric, mode=tc.mode, search_alg=_searcher(tc),
                                      scheduler=_scheduler(tc, base), num_samples=tc.num_samples,
                                      max_concurrent_trials=tc.max_concurrent_trials if tc.search == "optuna" else None,
                                      time_budget_s=tc.time_budget_s or None),
            run_config=rt.RunConfig(name=cfg.name, storage_path=root, storage_filesystem=fs, callbacks=callbacks,
                                    failure_config=rt.FailureConfig(max_failures=tc.max_failures), verbose=0),
        )
    grid = tuner.fit()
    left = unfinished_trials(search_dir, cfg.s3)
    if left:  # not a finished search: no results.csv or best.yaml of part of it
        log(f"tune: interrupted with {len(left)} trial(s) unfinished ({', '.join(left[:5])}); its state is saved: "
            f"continue it with `raylm tune --resume name={cfg.name} storage={cfg.storage}`")
        raise KeyboardInterrupt
    if resume:  # the trials of a restored state are what it says; a new search's are this process's own
        check_recorded(grid, search_dir, cfg.s3, tc.metric)
    return report(grid, state, cfg, tc, log)


def check_recorded(grid, search_dir: str, s3, metric: str) -> None:
    """Every trial the results list with what it reported is a run raylm trained for this
    search, with the parameters the results give it: its run's record (written by `run_trial`
    as it starts training) names the trial and holds them. Tune's results are what its state
    says: a trial added to a saved state, with another trial's reports, was ranked and its
    config, which nothing trained, written to best.yaml. ConfigError naming the trial."""
    from raylm.record import RECORD
    from raylm.tune_state import TRIAL_ID

    seen = set()
    for res in grid:
        m = res.metrics or {}
        df = res.metrics_dataframe
        if metric not in m and not (df is not None and metric in df and len(df[metric])):
            continue  # nothing reported: not ranked, its parameters Tune's checked config
        trial_id = m.get("trial_id")
        if not isinstance(trial_id, str) or not TRIAL_ID.fullmatch(trial_id) or trial_id in seen:
            raise ConfigError(f"tune: a trial's results name trial {_show(trial_id)}, not one trial's own id; the "
                              f"search's state was changed since raylm saved it: start the search anew")
        seen.add(trial_id)
        params = {k: plain(v) for k, v in (res.config or {}).items()}
        uri = storage.join(search_dir, RUNS, trial_id, RECORD)
        try:
            record = json.loads(storage.read_text(uri, s3)) if storage.exists(uri, s3) else None
        except (ValueError, UnicodeDecodeError):
            record = None
        own = record.get("tune") if isinstance(record, dict) else None
        if not (isinstance(own, dict) and own.get("trial_id") == trial_id and _same(own.get("params"), params)):
            raise ConfigError(f"tune: trial {trial_id} reported {metric} with {_params_text(params) or 'no config'}, "
                              f"which {uri} does not record as trained; the search's state was changed since raylm "
                              f"saved it: start the search anew")


def unfinished_trials(search_dir: str, s3=None) -> list[str]:
    """The trials that the search's newest saved Tune state holds neither finished nor failed.
    On Ctrl-C (and SIGTERM, raylm's Ctrl-C) Tune saves its state with the running trials as
    they were, stops them, and returns from fit() as at a search's end, every trial it made
    "terminated" in its results (those not made yet left out): read as finished, it wrote a
    part of the search as its results and best.yaml, and exited 0. Its saved state, which
    --resume continues, tells. Read as JSON only: nothing in it is unpickled."""
    from raylm.tune_state import state_files

    states = sorted(uri for uri, kind in state_files(search_dir, s3) if kind == "experiment")
    if not states:
        return []
    doc = json.loads(storage.read_text(states[-1], s3))
    trials = [json.loads(entry[0]) for entry in doc.get("trial_data", [])]
    return [str(t.get("trial_id")) for t in trials if t.get("status") not in ("TERMINATED", "ERROR")]


def trial_log(log, train: TrainConfig):
    """A Tune callback that prints each trial's start, evaluations and end, one line each
    (`raylm.tune_state.TrialLog`: a module's class, so that tuner.pkl holds no code)."""
    from raylm.tune_state import TrialLog

    return TrialLog(log, train)


def _ended(steps: int, train: TrainConfig, params: dict | None = None, budget_spent: bool | None = None) -> str:
    """How a trial that did not fail ended: "finished" (all its train.max_steps), "time budget"
    (its run stopped itself early, its train.time_budget_s spent: `budget_spent`), or
    "stopped" early by Tune (ASHA, tune.time_budget_s). Its own train.max_steps and
    train.time_budget_s where the space searches them, else the base config's. Where whether
    the budget was spent is not known (None: the trial's run not read), a time-budgeted
    trial that ended early "ended"."""
    params = params or {}
    max_steps = plain(params.get("train.max_steps", train.max_steps))
    budget = plain(params.get("train.time_budget_s", train.time_budget_s))
    if steps >= max_steps:
        return "finished"
    if budget and budget_spent:
        return "time budget"
    return "ended" if budget and budget_spent is None else "stopped"


def _time_budget_spent(run_dir: str | None, steps: int, s3=None) -> bool | None:
    """Whether the trial's run stopped itself at `steps` because its train.time_budget_s was
    spent: training saves the step it ends at, and that checkpoint records the training
    seconds spent and the run's config. None where `run_dir` holds no raylm run (no record)."""
    from raylm import checkpoint
    from raylm.errors import UserError
    from raylm.record import RECORD

    if run_dir is None or not storage.exists(storage.join(run_dir, RECORD), s3):
        return None
    done = [uri for step, uri, complete in checkpoint.list_checkpoints(run_dir, s3) if complete and step == steps]
    if not done:
        return False
    try:
        meta = checkpoint.read_meta(done[-1], s3)
    except (UserError, OSError):
        return False
    budget = ((meta.get("config") or {}).get("train") or {}).get("time_budget_s")
    spent = meta.get("train_seconds")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (budget, spent))
    return numbers and budget > 0 and spent >= budget - 1e-3  # meta.json keeps the seconds to 3 decimals


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={_fmt(plain(v))}" for k, v in sorted(params.items()))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- results


def trial_rows(grid, metric: str, mode: str, runs_dir: str | None = None, s3=None) -> list[dict]:
    """One row per trial, best first: parameters, error, steps reached, the last and best
    reported metric, its history, and (`runs_dir`: the trials' runs) whether its run stopped
    itself there with its time budget spent (`_time_budget_spent`; `report` makes the status)."""
    from raylm.tune_state import TRIAL_ID

    rows = []
    for res in grid:
        df = res.metrics_dataframe
        reported = []
        if df is not None and metric in df and "step" in df:
            reported = [(int(s), float(v)) for s, v in zip(df["step"], df[metric]) if s == s]  # s == s: not NaN
        hist = [(s, v) for s, v in reported if v == v]  # what can be plotted
        m = res.metrics or {}
        trial_id = m.get("trial_id") or res.path.rstrip("/").rsplit("/", 1)[-1]
        # The last value reported, NaN included: a trial that ended on NaN (diverged) must not
        # be ranked, and chosen for best.yaml, on a value from before it diverged.
        # The step of its last report (Tune's last result, kept in its saved state apart from
        # the reports: a changed one labelled a trial ASHA stopped at step 2 "finished" at 8).
        steps = reported[-1][0] if reported else int(m.get("step") or 0)
        run_dir = storage.join(runs_dir, trial_id) if runs_dir and TRIAL_ID.fullmatch(str(trial_id)) else None
        rows.append({"trial": trial_id, "params": {k: plain(v) for k, v in (res.config or {}).items()},
                     "error": res.error, "steps": steps,
                     "last": reported[-1][1] if reported else None,
                     "best": (min if mode == "min" else max)(v for _, v in hist) if hist else None,
                     "history": hist, "budget_spent": _time_budget_spent(run_dir, steps, s3)})
    sign = 1 if mode == "min" else -1
    # A failed trial ranks after every trial that can be ranked, whatever it reported before it
    # failed: best.yaml is never its config, so rank 1 must not be it either.
    rows.sort(key=lambda r: (r["error"] is not None or not _ranked(r), sign * r["last"] if _ranked(r) else 0))
    return rows


def _ranked(row: dict) -> bool:
    """Whether a trial's last reported metric can rank it: it reported one, and not NaN."""
    return row["last"] is not None and not math.isnan(row["last"])


def report(grid, state: dict, cfg: Config, tc: TuneConfig, log=print) -> dict:
    """The ranked table (printed and results.csv), best.yaml and val_loss.png."""
    base = load_config(base=state["base"])
    search_dir = cfg.run_dir
    rows = trial_rows(grid, tc.metric, tc.mode, storage.join(search_dir, RUNS), cfg.s3)
    for r in rows:
        r["status"] = "error" if r["error"] else _ended(r["steps"], base.train, r["params"], r["budget_spent"])
    keys = sorted({k for r in rows for k in r["params"]})
    header = ["rank", "trial", "status", "steps", f"last_{tc.metric}", f"best_{tc.metric}", *keys]
    table = [[i + 1, r["trial"], r["status"], r["steps"], _num(r["last"]), _num(r["best"]),
              *(r["params"].get(k, "") for k in keys)] for i, r in enumerate(rows)]
    buf = io.StringIO()  # the parameters as drawn: 4 significant digits would not reproduce a trial
    csv.writer(buf, lineterminator="\n").writerows([header, *table])
    storage.write_text(storage.join(search_dir, "results.csv"), buf.getvalue(), cfg.s3)
    log("tune: results\n" + format_table(header, [[*row[:6], *map(_fmt, row[6:])] for row in table]))
    summary = {"search_dir": search_dir, "trials": len(rows), "results_csv": storage.join(search_dir, "results.csv"),
               "stopped": [r["trial"] for r in rows if r["status"] == "stopped"],
               "time_budget": [r["trial"] for r in rows if r["status"] == "time budget"],
               "errors": [r["trial"] for r in rows if r["status"] == "error"]}
    ok = [r for r in rows if r["status"] != "error" and _ranked(r)]
    if ok:
        best = ok[0]
        given = [(f"train.{k}", v) for k, v in state.get("workers", {}).items() if f"train.{k}" not in best["params"]]
        best_cfg = load_config(base=state["base"], overrides=[*given, *best["params"].items(),
                                                              ("name", f"{cfg.name}-best"), ("storage", cfg.storage)])
        uri = storage.join(search_dir, "best.yaml")
        text = (f"# raylm tune {cfg.name}: trial {best['trial']}, {tc.metric} {best['last']:.4f} at step "
                f"{best['steps']}\n# {_params_text(best['params'])}\n# run it: raylm pretrain --config best.yaml\n")
        storage.write_text(uri, text + yaml.safe_dump(to_dict(best_cfg, redact=True), sort_keys=False), cfg.s3)
        summary.update(best_trial=best["trial"], best_params=best["params"], best_config=uri)
    png = storage.join(search_dir, f"{tc.metric}.png")
    plot_trials(rows, tc.metric, png, cfg.s3)
    summary["plot"] = png
    return summary


def _num(v) -> str:
    return "" if v is None else f"{v:.4f}"


def format_table(header: list, rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def plot_trials(rows: list[dict], metric: str, uri: str, s3=None) -> None:
    """The metric against step for every trial: finished trials solid, stopped ones (by the
    scheduler or their time budget) dashed and ending in a cross, so that where each was cut
    is visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for r in rows:
        if not r["history"]:
            continue
        steps, values = zip(*r["history"])
        stopped = r["status"] != "finished"
        line, = ax.plot(steps, values, "--" if stopped else "-", marker=".",
                        label=f"{r['trial']} ({r['status']}): {_params_text(r['params'])}"[:70])
        if stopped:
            ax.plot(steps[-1], values[-1], "x", color=line.get_color(), markersize=10, markeredgewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    storage.write_bytes(uri, out.getvalue(), s3)
