"""`raylm eval` results of a checkpoint's earlier weights go, whichever directory it runs from,
and results of other tasks that an evaluation replaces are named before it starts.

A run evaluated by a relative path (`raylm eval runs/x`) recorded that relative path as the
results' `checkpoint`; evaluated again from another directory, the old results no longer
named the checkpoint, so those of its earlier weights stayed, and an evaluation that then
failed left them to be taken for the new weights'. No Ray (eval.workers=0), the tiny run.
"""

from __future__ import annotations

import json
import os

import pytest

from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.eval.results import forget_other_results

MC = '{"context": "The cat", "choices": [" sat", " flew"], "gold": 0}\n'


def evaluate(run: str, tmp, out: str, *more, name: str = "mc", log=lambda *_: None):
    from raylm.eval.run import evaluate_run

    mc = tmp / f"{name}.jsonl"
    mc.write_text(MC * 2)
    cfg = load_config(overrides=[("eval.mc_tasks", [str(mc)]), "eval.workers=0", *more])
    return evaluate_run(run, cfg, out=out, log=log)


def test_results_of_earlier_weights_go_when_evaluated_from_another_directory(tiny_run, tmp_path, monkeypatch,
                                                                                one_thread):
    out = str(tmp_path / "out")
    monkeypatch.chdir(os.path.dirname(tiny_run))
    evaluate(os.path.basename(tiny_run), tmp_path, out)  # `raylm eval tiny`, from the run's parent
    path = os.path.join(out, "results.json")
    with open(path) as f:
        doc = json.load(f)
    doc["checkpoint_sha256"] = "0" * 64  # as if the checkpoint were written again since, with other weights
    with open(path, "w") as f:
        json.dump(doc, f)
    monkeypatch.chdir(tmp_path)
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"context": "2 + 2 =", "answer": "4"}\n')
    # Fails once the model is loaded (no room for a prompt), after the earlier results are judged.
    with pytest.raises(ConfigError, match="max_new_tokens"):
        evaluate(tiny_run, tmp_path, out, ("eval.gen_tasks", [str(gen)]), "eval.max_new_tokens=128")
    assert not os.path.exists(path) and not os.path.exists(os.path.join(out, "results.md"))


def test_a_relative_checkpoint_of_an_older_results_file_is_matched_by_its_tail(tmp_path):
    ckpt = tmp_path / "runs" / "x" / "ckpt-00000200"
    ckpt.mkdir(parents=True)
    for recorded, gone in (("runs/y/ckpt-00000200", False), ("x/ckpt-00000200/", True)):
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        (out / "results.json").write_text(json.dumps({"checkpoint": recorded, "checkpoint_sha256": "0" * 64}))
        (out / "results.md").write_text("table")
        assert forget_other_results(str(out), str(ckpt), "1" * 64) is gone
        assert (out / "results.json").exists() is not gone


def test_an_evaluation_names_the_other_tasks_results_it_replaces(tiny_run, tmp_path, one_thread):
    out = str(tmp_path / "out")
    lines = []
    evaluate(tiny_run, tmp_path, out, name="first", log=lines.append)
    evaluate(tiny_run, tmp_path, out, name="first", log=lines.append)  # the same task again: nothing lost
    assert not [line for line in lines if "holds results of" in line]
    evaluate(tiny_run, tmp_path, out, name="second", log=lines.append)
    assert f"eval: {out} holds results of first, which this evaluation replaces with its own when it ends; " \
           f"pass --out DIR to keep both" in lines
    with open(os.path.join(out, "results.json")) as f:
        assert {r["task"] for r in json.load(f)["results"]} == {"second"}
