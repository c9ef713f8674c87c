"""`--model raylm`'s model_args as lm-eval's command line passes them, and its mistakes as one
line: a device named in model_args, a value that is not a number, a path with no checkpoint
(no Ray: workers=0)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from raylm.errors import ConfigError  # noqa: E402
from raylm.eval.harness import RayLM  # noqa: E402

# What lm-eval's command line adds to every model's model_args (lm_eval/evaluator.py).
CLI_EXTRA = {"batch_size": 1, "max_batch_size": None, "device": "cuda"}


def test_a_device_in_model_args_is_the_users(tiny_run, one_thread):
    lm = RayLM.create_from_arg_string(f"path={tiny_run},workers=0,device=cpu", CLI_EXTRA)
    assert lm.runner.model.tok_embeddings.weight.device.type == "cpu"
    lm = RayLM.create_from_arg_obj({"path": tiny_run, "workers": 0, "device": "cpu"}, CLI_EXTRA)
    assert lm.runner.model.tok_embeddings.weight.device.type == "cpu"


@pytest.mark.parametrize("arg, shown", [("workers=abc", "workers=abc"), ("workers=1.5", "workers=1.5"),
                                        ("cpus_per_worker=x", "cpus_per_worker=x"),
                                        ("cpus_per_worker=0", "cpus_per_worker=0"),
                                        ("gpus_per_worker=-1", "gpus_per_worker=-1"),
                                        ("batch_tokens=0", "batch_tokens=0")])
def test_a_bad_model_args_value_names_it(tiny_run, arg, shown):
    with pytest.raises(ConfigError, match=rf"^--model_args {shown}: expected "):
        RayLM.create_from_arg_string(f"path={tiny_run},{arg}", CLI_EXTRA)


def test_lm_eval_command_line_gives_a_users_mistake_in_one_line(tmp_path):
    missing = tmp_path / "no-run"
    proc = subprocess.run([sys.executable, "-m", "raylm.eval.harness_cli", "run", "--model", "raylm",
                           "--model_args", f"path={missing},workers=0", "--tasks", "arc_easy", "--limit", "1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"raylm: error: {missing}: no complete checkpoint (neither a " \
                                                   f"checkpoint nor a run directory with one)"


def test_an_include_path_that_is_no_directory_is_named(tiny_run, tmp_path):
    from raylm.config import load_config
    from raylm.eval.run import evaluate_run

    for path in (tmp_path / "no-tasks", tmp_path / "task.yaml"):
        if path.suffix:
            path.write_text("task: mine\n")  # a file: lm-eval loads YAMLs from directories only
        with pytest.raises(ConfigError, match=rf"^--include-path {path}: not a directory"):
            evaluate_run(tiny_run, load_config(overrides=["eval.workers=0"]), tasks=["mine"], include_path=str(path),
                         out=str(tmp_path / "out"), log=lambda *_: None)
