"""`raylm eval --num-fewshot N` records N: results.json's header and each lm-eval task row say
how many examples preceded each item (lm-eval's n-shot), and results.md names it, so a 5-shot
score is not read as a 0-shot one (no Ray: eval.workers=0, a local task YAML)."""

import json

import pytest

pytest.importorskip("lm_eval")

from raylm.config import load_config  # noqa: E402

YAML = """task: raylm_shots
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
"""


def test_num_fewshot_is_recorded(tiny_run, tmp_path, monkeypatch, one_thread):
    from raylm.eval.run import evaluate_run

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "shots.jsonl"
    data.write_text("".join(json.dumps({"context": f"The cat sat on the {i}", "choices": [" mat", " moon"],
                                        "gold": i % 2}) + "\n" for i in range(4)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "raylm_shots.yaml").write_text(YAML.format(data=data))
    out = tmp_path / "out"
    evaluate_run(tiny_run, load_config(overrides=["eval.workers=0"]), tasks=["raylm_shots"], include_path=str(tasks),
                 limit=2, num_fewshot=1, out=str(out), log=lambda *_: None)
    doc = json.loads((out / "results.json").read_text())
    assert doc["num_fewshot"] == 1
    assert doc["results"] and all(r["num_fewshot"] == 1 for r in doc["results"])
    assert "--num-fewshot 1" in (out / "results.md").read_text().splitlines()[0]
