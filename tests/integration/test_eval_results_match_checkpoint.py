"""`raylm eval` results name the weights they scored, not only the checkpoint's path and step.

A run directory reused after its checkpoints were removed writes `ckpt-N` again, with other
weights; `<run>/eval/ckpt-N/results.json` of the old weights had the same checkpoint path and
step, so nothing told them apart, and an evaluation of the new weights that failed left them
there to be taken for the new checkpoint's. Now each results file records the sha256 of the
checkpoint's COMMITTED marker (which lists every file's sha256), and evaluating a checkpoint
removes results of its earlier weights before it starts. Also: a write cut between
results.json and results.md left the old table beside the new results.

One real tiny run (tests/tiny_run.py, no Ray: eval.workers=0), trained twice in one directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from raylm import checkpoint, storage
from raylm.config import load_config
from raylm.errors import ConfigError

pytestmark = pytest.mark.integration

MC = '{"context": "The cat", "choices": [" sat", " flew"], "gold": 0}\n'
GEN = '{"context": "2 + 2 =", "answer": "4"}\n'


def marker_sha(ckpt: str) -> str:
    with open(os.path.join(ckpt, checkpoint.COMMIT_MARKER), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def evaluate(run: str, tmp, *more):
    from raylm.eval.run import evaluate_run

    mc = tmp / "mc.jsonl"
    mc.write_text(MC * 3)
    cfg = load_config(overrides=[("eval.mc_tasks", [str(mc)]), "eval.workers=0", *more])
    return evaluate_run(run, cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def reused_run(tmp_path_factory):
    """(run dir, results of the first weights of ckpt-200, its marker's sha256 then), after the
    checkpoint was removed and the run trained again to the same step."""
    from tests.tiny_run import make_tiny_run

    root = tmp_path_factory.mktemp("reused")
    run = make_tiny_run(str(root))
    ckpt = checkpoint.latest_complete(run)
    first = evaluate(run, root)
    with open(first["paths"]["json"]) as f:
        written = json.load(f)
    old_sha = marker_sha(ckpt)
    shutil.rmtree(ckpt)
    make_tiny_run(str(root))  # the same directory, its checkpoints gone: ckpt-200 again
    assert checkpoint.latest_complete(run) == ckpt
    return run, ckpt, written, old_sha


def test_results_record_the_weights_they_scored(reused_run):
    run, ckpt, written, old_sha = reused_run
    assert written["checkpoint"] == ckpt
    assert written["checkpoint_sha256"] == old_sha
    assert all(r["checkpoint_sha256"] == old_sha for r in written["results"])
    # The checkpoint written again at the same step is told apart from the one scored.
    assert marker_sha(ckpt) != old_sha


def test_a_failed_evaluation_leaves_no_results_of_the_earlier_weights(reused_run, tmp_path):
    run, ckpt, written, old_sha = reused_run
    out = os.path.join(run, "eval", os.path.basename(ckpt))
    assert os.path.exists(os.path.join(out, "results.json"))  # the first weights' results
    gen = tmp_path / "gen.jsonl"
    gen.write_text(GEN)
    # Fails once the model is loaded (no room for a prompt in its max_seq_len=128), after the checks of the files.
    with pytest.raises(ConfigError, match="max_new_tokens"):
        evaluate(run, tmp_path, ("eval.gen_tasks", [str(gen)]), "eval.max_new_tokens=128")
    assert not os.path.exists(os.path.join(out, "results.json"))
    assert not os.path.exists(os.path.join(out, "results.md"))
    # Evaluated again, the results are the new weights'.
    done = evaluate(run, tmp_path)
    with open(done["paths"]["json"]) as f:
        assert json.load(f)["checkpoint_sha256"] == marker_sha(ckpt)
    # And results of the same weights are not removed by the next evaluation's start.
    from raylm.eval.results import forget_other_results

    assert not forget_other_results(out, ckpt, marker_sha(ckpt))
    assert os.path.exists(os.path.join(out, "results.json"))


def test_a_write_cut_before_the_table_leaves_no_old_table(tmp_path, monkeypatch):
    from raylm.eval.results import write_results

    out = str(tmp_path / "out")
    row = {"task": "t", "metric": "acc", "value": 0.5, "stderr": None, "n": 2}
    write_results(out, [row], {"checkpoint": "old"})
    real = storage.write_text

    def write_text(uri, text, s3=None, *a, **k):
        if uri.endswith("results.md"):
            raise OSError("cut")
        return real(uri, text, s3, *a, **k)

    monkeypatch.setattr(storage, "write_text", write_text)
    with pytest.raises(OSError, match="cut"):
        write_results(out, [{**row, "value": 1.0}], {"checkpoint": "new"})
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["checkpoint"] == "new"
    assert not os.path.exists(os.path.join(out, "results.md"))  # not the old run's table
