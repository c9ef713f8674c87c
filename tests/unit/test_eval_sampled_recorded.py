"""`raylm eval --gen TASK eval.temperature=0.8` wrote results that did not say the generation
tasks were sampled, nor with which seed: a sampled score read like a greedy (repeatable) one."""

from __future__ import annotations

import json

from raylm.config import load_config
from raylm.eval.run import evaluate_run


def _gen_task(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text(json.dumps({"context": "The ", "answer": "cat"}) + "\n")
    return str(path)


def test_a_sampled_generation_score_says_so(tiny_run, tmp_path):
    cfg = load_config(overrides=["eval.workers=0", "eval.max_new_tokens=4", "eval.temperature=0.8", "seed=7",
                                 f"eval.gen_tasks=[{_gen_task(tmp_path)}]"])
    out = evaluate_run(str(tiny_run), cfg, out=str(tmp_path / "s"), log=lambda *_: None)
    doc = json.load(open(out["paths"]["json"]))
    assert (doc["gen_temperature"], doc["seed"]) == (0.8, 7)
    assert "generation tasks sampled at eval.temperature=0.8, seed 7" in open(out["paths"]["markdown"]).read()


def test_a_greedy_generation_score_adds_nothing(tiny_run, tmp_path):
    cfg = load_config(overrides=["eval.workers=0", "eval.max_new_tokens=4", f"eval.gen_tasks=[{_gen_task(tmp_path)}]"])
    out = evaluate_run(str(tiny_run), cfg, out=str(tmp_path / "g"), log=lambda *_: None)
    assert "gen_temperature" not in json.load(open(out["paths"]["json"]))
    assert "sampled" not in open(out["paths"]["markdown"]).read()
