"""best.yaml keeps the worker settings the search was given ("auto" by default), not a
trial's share of the search's cluster: `raylm pretrain --config best.yaml` then takes the
whole machine, as the README's next step expects."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.small import SMALL

pytestmark = pytest.mark.integration


def test_best_yaml_keeps_the_given_worker_settings(ray_local, tmp_path):
    from raylm import tune
    from raylm.config import load_config
    from raylm.corpus import iter_builtin_documents

    lines, size = [], 0
    for text in iter_builtin_documents():
        lines.append(json.dumps({"text": text}))
        size += len(text)
        if size > 100_000:
            break
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: grid_search([1.0e-2])\ntune: {scheduler: fifo, max_concurrent_trials: 2}\n")
    cfg = load_config(overrides=[f"storage={tmp_path}", "name=s", *SMALL, "train.num_workers=auto",
                                 "train.cpus_per_worker=auto", "data.dedup=none", "train.max_steps=2",
                                 "train.eval_every=2", "train.timeout_s=300",
                                 ("data.path", str(tmp_path / "corpus.jsonl"))])
    assert (cfg.train.num_workers, cfg.train.cpus_per_worker) == ("auto", "auto")
    summary = tune.tune(cfg, str(space), {})
    best = yaml.safe_load(open(summary["best_config"]))
    assert (best["train"]["num_workers"], best["train"]["cpus_per_worker"]) == ("auto", "auto")
    assert best["train"]["lr"] == 1.0e-2
