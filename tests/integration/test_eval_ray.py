"""raylm eval end to end on a real local Ray cluster: lm-eval tasks from local task YAMLs
(nothing downloaded) through the `raylm` harness model, the actor pool against one process,
the CLI, and lm-eval's own command line."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from raylm.eval.loglik import encode_pair
from raylm.eval.pool import LocalRunner, PoolSpec, RayPoolRunner

pytestmark = pytest.mark.integration

ITEMS = [("The cat sat on the", [" mat", " moon", " dog and the cat"], 0),
         ("reverse: abc", [" cba", " abc"], 0), ("word after sun: red sun cat", [" cat", " red", " moon"], 0),
         ("add: 2 + 2", [" 4", " 5"], 0), ("The quick brown", [" fox", " cow jumps"], 1)]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three lm-eval tasks over local jsonl: multiple choice, rolling log-likelihood, generation."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps({"context": c, "choices": ch, "gold": g}) + "\n"
                                        for c, ch, g in ITEMS))
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                          ["The cat sat on the mat. " * 30, "reverse: abc\ncba"]))
    (d / "gen.jsonl").write_text("".join(json.dumps({"q": c, "a": ch[g].strip()}) + "\n" for c, ch, g in ITEMS))

    def task(name, data, **kw):
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(d / data)}},
                "test_split": "test", **kw}
        (d / f"{name}.yaml").write_text(yaml.safe_dump(spec))

    task("raylm_t_mc", "mc.jsonl", output_type="multiple_choice", doc_to_text="{{context}}",
         doc_to_choice="{{choices}}", doc_to_target="{{gold}}",
         target_delimiter="",  # the choices carry their own leading space, as the built-in format does
         metric_list=[{"metric": "acc"}, {"metric": "acc_norm"}])
    task("raylm_t_rolling", "text.jsonl", output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
         metric_list=[{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}])
    task("raylm_t_gen", "gen.jsonl", output_type="generate_until", doc_to_text="{{q}}", doc_to_target="{{a}}",
         generation_kwargs={"until": ["\n"], "max_gen_toks": 6},
         metric_list=[{"metric": "exact_match"}])
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return str(d)


@pytest.fixture(scope="module")
def local_model(tiny_run):
    import torch

    from raylm.generate import load_for_inference

    torch.set_num_threads(1)  # what each pool actor with one CPU runs on
    model, tok, _ = load_for_inference(tiny_run)
    return model, tok


def test_actor_pool_equals_one_process_exactly(ray_local, tiny_run, local_model, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from raylm.eval.harness import RayLM

    model, tok = local_model
    local = LocalRunner(model, tok, batch_tokens=64)
    # The actors alone first (the driver helps only while it would wait, which varies).
    pool = RayPoolRunner(tiny_run, tok, model.cfg.max_seq_len, PoolSpec(workers=2, num_cpus=1), batch_tokens=64,
                         driver_scores=False)
    tasks = ["raylm_t_mc", "raylm_t_rolling", "raylm_t_gen"]
    results = {}
    for name, runner in (("local", local), ("pool", pool)):
        out = lm_eval.simple_evaluate(model=RayLM(runner=runner), tasks=tasks,
                                      task_manager=TaskManager(include_path=task_dir), log_samples=False)
        results[name] = {t: {k: v for k, v in m.items() if k != "alias"} for t, m in out["results"].items()}
    assert results["pool"] == results["local"]  # floats compared exactly
    # One pool, started with the runner, served all three request kinds: its two actors
    # computed every unit of the three calls.
    actors = pool.info()
    assert len(pool.timings) == 3 and len({a["pid"] for a in actors}) == 2
    assert sum(a["units"] for a in actors) == sum(t["units"] for t in pool.timings)
    # The driver scoring beside the actors: more units than the actors' 2 x 2 slots, so it takes
    # some (from the back of the queue), and the results still land in their places.
    pool.driver_scores = True
    pairs = [encode_pair(tok, f"{k} {c}", ch) for k in range(4) for c, chs, _ in ITEMS for ch in chs]  # 15 units
    assert pool.loglikelihood(pairs) == local.loglikelihood(pairs)
    assert pool.timings[-1]["driver_units"] >= 1 and pool.timings[-1]["units"] > 4
    assert sum(a["units"] for a in pool.info()) + pool.timings[-1]["driver_units"] == \
        sum(t["units"] for t in pool.timings)
    pool.close()
    mc = results["local"]["raylm_t_mc"]
    assert set(mc) >= {"acc,none", "acc_norm,none", "acc_stderr,none"}
    assert results["local"]["raylm_t_rolling"]["bits_per_byte,none"] > 0
    assert 0 <= results["local"]["raylm_t_gen"]["exact_match,none"] <= 1


@pytest.fixture
def stored_run(request, ray_local, tiny_run):
    """The tiny run in object storage, where a cluster's actors read it; the local directory
    where no S3 server can start (the actors then read that)."""
    from tests.s3server import WeedNotFound, weed_binary

    try:
        weed_binary()
    except WeedNotFound:
        return tiny_run
    from raylm import storage

    run = f"{request.getfixturevalue('s3_prefix')}/tiny"
    storage.upload_dir(tiny_run, run)
    return run


def test_pool_actors_load_a_large_model_from_the_checkpoint_exactly(stored_run, local_model):
    """A model over PoolSpec.ship_weights_max_bytes (0 here: any model) is not shipped: each
    actor reads the checkpoint itself (UnitActor.load(None)), and scores and generates as one
    process does."""
    model, tok = local_model
    spec = PoolSpec(workers=1, num_cpus=1, ship_weights_max_bytes=0)
    pool = RayPoolRunner(stored_run, tok, model.cfg.max_seq_len, spec, batch_tokens=64)
    local = LocalRunner(model, tok, batch_tokens=64)
    try:
        assert pool.model is None and not pool.driver_scores  # nothing read or shipped by the driver
        pairs = [encode_pair(tok, c, ch) for c, chs, _ in ITEMS for ch in chs]
        requests = [(tok.encode(c), ["\n"], 6, 0.0, 0, 0) for c, _, _ in ITEMS] + \
            [(tok.encode(ITEMS[0][0]), ["\n"], 6, 0.9, 20, 7)]  # sampled: the actor's own tokenizer and RNG
        assert pool.loglikelihood(pairs) == local.loglikelihood(pairs)  # floats compared exactly
        assert pool.complete(requests) == local.complete(requests)
        (actor,) = pool.info()
        assert actor["weights_from"].startswith(f"{stored_run}/ckpt-")  # the checkpoint, not "driver"
        assert actor["units"] == sum(t["units"] for t in pool.timings) > 0
    finally:
        pool.close()


def test_a_pool_actor_restarted_by_ray_reloads_its_model(ray_local, tiny_run, local_model, monkeypatch):
    """On a cluster (actor_restarts() is -1) Ray restarts a lost actor by running __init__ only,
    not `load`: the retried unit reads the model from the checkpoint and scores as one process does."""
    import ray

    model, tok = local_model
    monkeypatch.setenv("RAYLM_LOCAL_CLUSTER", "0")  # a cluster's restart policy, not the local one's
    pool = RayPoolRunner(tiny_run, tok, model.cfg.max_seq_len, PoolSpec(workers=1, num_cpus=1), batch_tokens=64,
                         driver_scores=False)
    pairs = [encode_pair(tok, c, ch) for c, chs, _ in ITEMS for ch in chs]
    try:
        expected = LocalRunner(model, tok, batch_tokens=64).loglikelihood(pairs)
        assert pool.loglikelihood(pairs) == expected
        (before,) = pool.info()
        ray.kill(pool.actors[0], no_restart=False)  # its process lost (a node gone, an OOM kill)
        assert pool.loglikelihood(pairs) == expected
        (after,) = pool.info()
        assert after["pid"] != before["pid"] and before["weights_from"] == "driver"
        assert after["weights_from"].startswith(f"{tiny_run}/ckpt-")
    finally:
        pool.close()


def test_pool_larger_than_the_local_cluster_is_a_config_error(ray_local, tiny_run):
    from raylm.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.workers=1000 x eval.cpus_per_worker=1 needs 1000 CPUs"):
        RayPoolRunner(tiny_run, None, 128, PoolSpec(workers=1000, num_cpus=1))


def test_raylm_eval_cli_writes_json_and_markdown(ray_local, tiny_run, task_dir, tmp_path, capsys):
    from raylm.cli import main

    corpus = tmp_path / "held.txt"
    corpus.write_text("The cat sat on the mat. The dog sat on the log.\n" * 40)
    out = tmp_path / "eval"
    rc = main(["eval", "--tasks", "raylm_t_mc", "--include-path", task_dir, "--mc", f"{task_dir}/mc.jsonl",
               "--corpus", str(corpus), "--workers", "0", "--out", str(out), tiny_run])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["task"], r["metric"]): r for r in doc["results"]}
    harness, builtin = rows[("raylm_t_mc", "acc")], rows[("mc", "acc")]
    assert harness["n"] == builtin["n"] == len(ITEMS)
    assert harness["value"] == builtin["value"]  # the same model, the same scored tokens
    assert harness["stderr"] == pytest.approx(builtin["stderr"])
    assert rows[(f"corpus:{corpus}", "bpb")]["value"] > 0
    import lm_eval

    for r in doc["results"]:
        assert r["checkpoint"].endswith("ckpt-00000200") and len(r["tokenizer_sha256"]) == 64
    assert harness["harness"] == f"lm-eval {lm_eval.__version__}" and builtin["harness"] == "raylm"
    md = (out / "results.md").read_text()
    assert "| raylm_t_mc | acc |" in md and "| mc | acc_norm |" in md
    assert "| raylm_t_mc | acc |" in capsys.readouterr().out


def test_bad_task_file_is_one_line_naming_the_line(tiny_run, tmp_path, capsys):
    from raylm.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a", "b"], "gold": 0}\n{"context": "x", "choices": ["a"], "gold": 5}\n')
    assert main(["eval", "--mc", str(bad), "--workers", "0", tiny_run]) == 2
    assert f"{bad}:2: " in capsys.readouterr().err


def test_lm_eval_command_line_runs_the_raylm_model(tiny_run, task_dir, tmp_path):
    out = tmp_path / "lm-eval-out"
    proc = subprocess.run([sys.executable, "-m", "raylm.eval.harness_cli", "run", "--model", "raylm",
                           "--model_args", f"path={tiny_run}", "--tasks", "raylm_t_mc", "--include_path", task_dir,
                           "--output_path", str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "raylm_t_mc" in proc.stdout and "acc" in proc.stdout


def sharded_eval_worker(config: dict) -> None:
    """One Ray Train worker: the tiny run's weights in an FSDP2-sharded model, then the
    in-training suite, which needs every rank (a sharded forward pass all-gathers)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from raylm.config import load_config
    from raylm.eval.in_training import TrainingEval
    from raylm.generate import load_for_inference
    from raylm.parallel import build_parallel_model

    torch.set_num_threads(1)
    reference, tok, _ = load_for_inference(config["run"])
    model = build_parallel_model(reference.cfg, torch.device("cpu"), "fp32", seed=1)
    set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    row = TrainingEval(load_config(overrides=config["overrides"]), tok)(model, step=3)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:  # Ray Train v2 keeps metrics only with checkpoints: hand results over by file
        with open(config["out"], "w") as f:
            json.dump(rows, f)


def test_in_training_suite_on_two_fsdp_workers_equals_one_process(ray_local, tiny_run, local_model, tmp_path):
    """Items dealt over 2 ranks (5 items: one rank scores a padding item at weight 0), sums
    all-reduced: every rank returns the row that one unsharded process computes."""
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from raylm.config import load_config
    from raylm.eval.in_training import TrainingEval

    mc, gen = tmp_path / "mc.jsonl", tmp_path / "gen.jsonl"
    mc.write_text("".join(json.dumps({"context": c, "choices": ch, "gold": g}) + "\n" for c, ch, g in ITEMS))
    gen.write_text("".join(json.dumps({"context": c, "answer": ch[g].strip()}) + "\n" for c, ch, g in ITEMS))
    overrides = ["eval.every=1", f"eval.mc_tasks=[{mc}]", f"eval.gen_tasks=[{gen}]", "eval.max_new_tokens=4",
                 "model.max_seq_len=128"]
    model, tok = local_model
    expected = TrainingEval(load_config(overrides=overrides), tok)(model, step=3)

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    out = tmp_path / "rows.json"
    trainer = TorchTrainer(sharded_eval_worker,
                           train_loop_config={"run": tiny_run, "overrides": overrides, "out": str(out)},
                           scaling_config=ray.train.ScalingConfig(num_workers=2),
                           run_config=ray.train.RunConfig(name="eval-fsdp", storage_path=str(tmp_path)))
    assert trainer.fit().error is None
    rows = json.loads(out.read_text())
    assert expected["eval_mc_n"] == len(ITEMS) and expected["eval_gen_n"] == len(ITEMS)
    assert rows == [expected, expected]
