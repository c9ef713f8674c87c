"""What the Tune integration tests share: the data their trials train on, and one finished
2-trial search whose state tests copy and change (each search costs a minute on 2 cores:
tests/integration/conftest.py makes each once a session)."""

from __future__ import annotations

import json

from tests.small import SMALL

# A 2-trial random search, one trial at a time, 4 steps each: the smallest search with a
# state of several trials.
SPACE = """\
train.lr: loguniform(1.0e-3, 1.0e-2)
tune: {scheduler: fifo, search: random, max_concurrent_trials: 1, num_samples: 2}
"""
SCHEDULE = ["train.num_workers=1", "train.max_steps=4", "train.eval_every=2", "train.log_every=1",
            "train.ckpt_every=100", "train.timeout_s=300"]


def write_corpus_slice(path) -> None:
    """A 200 kB slice of the built-in corpus as jsonl at `path`: trials train a few steps, so
    the full corpus's minute of preparation would buy nothing."""
    from raylm.corpus import iter_builtin_documents

    lines, size = [], 0
    for text in iter_builtin_documents():
        lines.append(json.dumps({"text": text}))
        size += len(text)
        if size > 200_000:
            break
    path.write_text("\n".join(lines) + "\n")


def prepare_tune_data(root):
    """The corpus slice (`write_corpus_slice`), its tokenizer and prepared blocks (local) under
    `root`: (base config, prepared data directory, manifest)."""
    from raylm.config import load_config
    from raylm.pipeline import ensure_data, ensure_tokenizer

    write_corpus_slice(root / "corpus.jsonl")
    cfg = load_config(overrides=[f"storage={root}", "name=base", *SMALL, "data.dedup=none", "data.val_fraction=0.1",
                                 ("data.path", str(root / "corpus.jsonl"))])
    cfg, tok = ensure_tokenizer(cfg)
    data_dir, manifest = ensure_data(cfg, tok)
    return cfg, data_dir, manifest


def run_finished_search(prepared, root, name: str = "finished"):
    """The 2-trial search (SPACE, SCHEDULE) run to its end with its storage under `root`:
    (its config, its summary). Tests change only copies of it."""
    from raylm import tune
    from raylm.config import load_config

    base, data_dir, _ = prepared
    (root / "space.yaml").write_text(SPACE)
    cfg = load_config(overrides=[f"storage={root / 'searches'}", f"name={name}", f"tokenizer.path={base.tokenizer.path}",
                                 *SMALL, *SCHEDULE, ("data.path", data_dir)])
    summary = tune.tune(cfg, str(root / "space.yaml"), log=lambda *_: None)
    assert summary["trials"] == 2 and not summary["errors"], summary
    return cfg, summary
