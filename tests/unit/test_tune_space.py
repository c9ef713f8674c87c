"""Search spaces for `raylm tune`: Tune's vocabulary, and every mistake caught before any
trial (or Ray, or data preparation) starts, as one line naming the file, key and value."""

from __future__ import annotations

import pytest

from raylm import tune
from raylm.config import ConfigError, Config, TuneConfig, load_config, to_dict


def _space(text: str):
    return tune.parse_space(text, "space.yaml")[0]


def test_parses_tune_vocabulary_nested_or_dotted():
    space, settings = tune.parse_space(
        "train.lr: loguniform(1e-4, 3e-3)\n"
        "train: {warmup_steps: 'choice([50, 100, 200])', weight_decay: 'uniform(0.0, 0.2)'}\n"
        "model.n_layers: grid_search([2, 4])\n"
        "train.micro_batch_size: randint(2, 9)\n"
        "train.beta2: 0.99\n"
        "tune: {num_samples: 3}\n", "space.yaml")
    assert settings == {"num_samples": 3}
    kinds = {k: (d.kind, d.args) for k, d in space.items()}
    assert kinds == {"train.lr": ("loguniform", (1e-4, 3e-3)), "train.warmup_steps": ("choice", ((50, 100, 200),)),
                     "train.weight_decay": ("uniform", (0.0, 0.2)), "model.n_layers": ("grid_search", ((2, 4),)),
                     "train.micro_batch_size": ("randint", (2, 9)), "train.beta2": ("value", (0.99,))}
    assert space["train.micro_batch_size"].probes() == [2, 8]  # Tune's randint excludes the upper end
    tune.check_space(space, to_dict(Config()), TuneConfig(), "space.yaml")


@pytest.mark.parametrize("text, words", [
    ("train.lrr: loguniform(1e-4, 3e-3)", ["train.lrr", "unknown config key"]),
    ("model.n_layers: uniform(1, 4)", ["model.n_layers", "expected int"]),
    ("train.lr: loguniform(0, 1e-3)", ["train.lr", "0 < low < high"]),
    ("train.lr: loguniform(3e-3, 1e-4)", ["train.lr", "0 < low < high"]),
    ("train.lr: loguniform(1e-3)", ["train.lr", "1 argument"]),
    ("train.lr: normal(0, 1)", ["train.lr", "unknown distribution 'normal'"]),
    ("train.lr: uniform(a, b)", ["train.lr", "cannot read the arguments"]),
    ("train.warmup_steps: choice([])", ["train.warmup_steps", "non-empty list"]),
    ("train.warmup_steps: randint(1.5, 4)", ["train.warmup_steps", "integers"]),
    ("train.lr: choice([1.0e-3, -1.0])", ["train.lr=-1.0", "expected a number > 0"]),
    ("train.beta2: uniform(0.9, 1.0)", ["train.beta2=1.0", "expected a number in [0, 1)"]),
    ("model.dim: grid_search([64, 96])\nmodel.n_heads: choice([4, 5])", ["model.n_heads", "not divisible"]),
    ("data.seq_len: choice([64, 128])", ["data.seq_len cannot be searched"]),
    ("name: choice(['a', 'b'])", ["name cannot be searched"]),
    ("tune: {num_samples: 0}\ntrain.lr: 1.0e-3", ["tune.num_samples=0"]),
    ("tune: {search: bayes}\ntrain.lr: 1.0e-3", ["tune.search='bayes'"]),
    ("tune: {metric: val_los}\ntrain.lr: 1.0e-3", ["tune.metric='val_los'", "expected one of val_loss, val_ppl"]),
    ("tune: {search: grid}\ntrain.lr: loguniform(1e-4, 3e-3)", ["tune.search=grid", "train.lr"]),
    ("tune: {search: optuna}\ntrain.lr: grid_search([1.0e-3])", ["optuna", "train.lr is a grid_search"]),
    ("[1, 2]", ["expected a mapping"]),
    ("train.lr: [", ["not valid YAML"]),
    ("train.lr: 1.0e-3\ntrain.lr: loguniform(1e-4, 3e-3)", ["not valid YAML", "duplicate key 'train.lr'"]),
])
def test_bad_space_is_one_line_error_before_any_trial(tmp_path, monkeypatch, text, words):
    """tune.tune itself refuses the space: nothing is written to the search's storage and Ray
    is never joined or started (the checks run before both). Whether Ray is up says nothing
    here (a test session's cluster may be), so the one way in, `init_ray_for`, is made to fail."""
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    cfg = load_config(overrides=[f"storage={tmp_path / 'runs'}", "name=s"])

    def no_ray(*_, **__):
        raise AssertionError("the search reached Ray before refusing its space")

    monkeypatch.setattr(tune, "init_ray_for", no_ray)
    with pytest.raises(ConfigError) as e:
        tune.tune(cfg, str(path))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not (tmp_path / "runs").exists()


def test_cli_prints_the_error_as_one_line(tmp_path, capsys):
    from raylm.cli import main

    path = tmp_path / "space.yaml"
    path.write_text("train.lr: loguniform(1e-4)\n")
    assert main(["tune", "--space", str(path), f"storage={tmp_path}", "name=s", "tune.num_samples=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr" in err[0] and str(path) in err[0], err
    path.write_text("train.lr: loguniform(1e-4, 1e-3)\n")
    assert main(["tune", "--space", str(path), f"storage={tmp_path}", "tune.max_concurrent_trials=0"]) == 2
    assert "tune.max_concurrent_trials=0" in capsys.readouterr().err
    assert main(["tune", "--resume", f"storage={tmp_path}", "name=nothing-here"]) == 2
    assert "no search under" in capsys.readouterr().err


def test_space_file_that_is_not_utf8_is_named(tmp_path, capsys):
    from raylm.cli import main

    path = tmp_path / "bin.yaml"
    path.write_bytes(b"train.lr: 1.0e-3\n\xff\xfe\n")
    cfg = load_config(overrides=[f"storage={tmp_path / 'runs'}", "name=s"])
    with pytest.raises(ConfigError, match=r"search space .*bin.yaml: not UTF-8 text"):
        tune.tune(cfg, str(path))
    assert main(["tune", "--space", str(path), f"storage={tmp_path / 'runs'}", "name=s"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bin.yaml: not UTF-8 text" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_metric_typo_in_an_override_is_refused_before_anything_is_saved(tmp_path, monkeypatch):
    path = tmp_path / "space.yaml"
    path.write_text("train.lr: loguniform(1e-4, 1e-3)\n")
    cfg = load_config(overrides=[f"storage={tmp_path / 'runs'}", "name=s"])
    monkeypatch.setattr(tune, "init_ray_for", lambda *_, **__: pytest.fail("the search reached Ray"))
    with pytest.raises(ConfigError, match=r"^tune.metric='val_los': expected one of val_loss, val_ppl$"):
        tune.tune(cfg, str(path), {"metric": "val_los"})
    assert not (tmp_path / "runs").exists()


def test_metrics_of_in_training_tasks_are_allowed():
    cfg = load_config(overrides=["eval.every=10", "eval.mc_tasks=[tasks/arc.jsonl]", "eval.gen_tasks=[gsm.jsonl]"])
    assert tune.trial_metrics(cfg) == ["val_loss", "val_ppl", "eval_arc_acc", "eval_arc_acc_norm",
                                       "eval_gsm_exact_match", "eval_gsm_contains"]
    tune.check_metric(TuneConfig(metric="eval_arc_acc", mode="max"), cfg)
    with pytest.raises(ConfigError, match="tune.metric='eval_arc_acc'"):  # not run without eval.every
        tune.check_metric(TuneConfig(metric="eval_arc_acc", mode="max"), load_config(overrides=[
            "eval.mc_tasks=[tasks/arc.jsonl]"]))


def test_resume_refuses_a_search_saved_with_a_bad_metric(tmp_path, monkeypatch):
    """A search.json written before the metric was checked: --resume names it, before Ray."""
    import json

    cfg = load_config(overrides=[f"storage={tmp_path}", "name=s"])
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / tune.SEARCH_FILE).write_text(json.dumps({"base": to_dict(cfg),
                                                               "tune": to_dict(TuneConfig(metric="val_los"))}))
    monkeypatch.setattr(tune, "init_ray_for", lambda *_, **__: pytest.fail("the search reached Ray"))
    with pytest.raises(ConfigError) as e:
        tune.resume(cfg)
    msg = str(e.value)
    assert "--resume" in msg and "search.json" in msg and "tune.metric='val_los'" in msg and "\n" not in msg, msg


def test_missing_space_file_is_named(tmp_path):
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=s"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        tune.tune(cfg, str(tmp_path / "nope.yaml"))


def test_domains_are_tunes_own_and_draws_are_valid_configs():
    from ray import tune as rt
    from ray.tune.search.sample import Domain

    space = _space("train.lr: loguniform(1e-4, 3e-3)\ntrain.warmup_steps: randint(0, 5)\n"
                   "model.n_layers: choice([1, 2])\ntrain.weight_decay: 0.05")
    domains = {k: d.domain() for k, d in space.items()}
    assert isinstance(domains["train.lr"], Domain) and domains["train.weight_decay"] == 0.05
    for _ in range(20):
        draw = {k: tune.plain(v.sample() if isinstance(v, Domain) else v) for k, v in domains.items()}
        cfg = load_config(overrides=list(draw.items()))
        assert 1e-4 <= cfg.train.lr <= 3e-3 and 0 <= cfg.train.warmup_steps < 5
    assert rt.grid_search([1, 2]) == _space("train.warmup_steps: grid_search([1, 2])")["train.warmup_steps"].domain()


def test_optuna_tpe_draws_from_the_space():
    """tune.search=optuna: the searcher takes the space's Tune domains and suggests configs
    the config accepts (no cluster: the searcher alone)."""
    pytest.importorskip("optuna")
    space = _space("train.lr: loguniform(1e-4, 3e-3)\ntrain.warmup_steps: randint(0, 5)\n"
                   "model.n_layers: choice([1, 2])")
    searcher = tune._searcher(TuneConfig(search="optuna", seed=3))
    assert searcher.set_search_properties("val_loss", "min", {k: d.domain() for k, d in space.items()})
    for i in range(3):
        draw = {k: tune.plain(v) for k, v in searcher.suggest(f"t{i}").items()}
        cfg = load_config(overrides=list(draw.items()))
        assert 1e-4 <= cfg.train.lr <= 3e-3 and cfg.model.n_layers in (1, 2)


def test_asha_lets_a_trial_that_reaches_max_steps_end_by_itself():
    """Stopped by Tune at max_t (ASHA's default), a trial's actor was killed while its Train run
    wound down: Ray Train's cleaner then freed the run's placement group with a warning, for
    every trial that ran to the end. Rungs below max_t still stop poor trials."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    base = load_config(overrides=["train.max_steps=8", "train.eval_every=2"])
    sched = tune._scheduler(TuneConfig(scheduler="asha", grace_period=2, reduction_factor=2), base)
    sched.set_search_properties("val_loss", "min", config={})
    good, bad = Trial("fn", stub=True), Trial("fn", stub=True)
    for t in (good, bad):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, good, {"step": 2, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, bad, {"step": 2, "val_loss": 9.0}) == TrialScheduler.STOP
    for step in (4, 6, 8):
        assert sched.on_trial_result(None, good, {"step": step, "val_loss": 1.0}) == TrialScheduler.CONTINUE


def test_search_state_is_written_without_the_endpoints_password_and_trials_get_it(tmp_path, monkeypatch):
    """search.json held an S3 endpoint's password in the clear (run records are redacted)."""
    secret = "PlantedPw123"
    endpoint = f"http://AKID:{secret}@127.0.0.1:9000"
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: loguniform(1e-4, 3e-3)\n")
    cfg = load_config(overrides=[f"s3.endpoint_url={endpoint}", f"storage={tmp_path}/runs", "name=s"])
    # Stand-ins for the parts that need Ray and data: the state is written before them.
    monkeypatch.setattr(tune, "prepare_search", lambda c, tc: (c, str(tmp_path / "data"), {"key": "k"}))
    real_run, ran = tune._run, {}
    monkeypatch.setattr(tune, "_run", lambda state, c, resume, log: ran.update(state=state, cfg=c) or {})
    tune.tune(cfg, str(space), log=lambda *_: None)
    text = (tmp_path / "runs" / "s" / tune.SEARCH_FILE).read_text()
    assert secret not in text and "***@127.0.0.1:9000" in text

    class Given(Exception):
        pass

    def trainable(state, search_dir):
        raise Given(state["base"]["s3"]["endpoint_url"])

    monkeypatch.setattr(tune, "_trainable", trainable)  # what the trials would be given
    with pytest.raises(Given) as e:
        real_run(ran["state"], ran["cfg"], resume=False, log=lambda *_: None)
    assert str(e.value) == endpoint  # from the command line's S3 settings
