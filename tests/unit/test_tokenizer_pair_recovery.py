"""raylm.pipeline.keep_in_run replacing a run's tokenizer (allowed only while the run has no
complete checkpoint) and cut between its two writes: the model file, then its sidecar
tokenizer.json. The old sidecar beside the new model was a pair that did not belong
together, and every later run stopped on it ("the files do not belong together") until the
user deleted <run>/tokenizer. Now the old sidecar goes first, so a cut leaves a model
without a sidecar, which counts as no tokenizer; and a mismatched pair in a run without a
complete checkpoint (left by an older raylm) is replaced. Under a checkpoint it still stops.
Real files; the cut is the second write raising, as a kill between the two would leave it.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest

from raylm import checkpoint, storage
from raylm.config import load_config
from raylm.errors import ConfigError
from raylm.generate import load_tokenizer
from raylm.pipeline import ensure_tokenizer, keep_in_run
from raylm.tokenizer import META_FILE, MODEL_FILE


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    from raylm.corpus import iter_builtin_documents
    from raylm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("toks")
    texts = list(itertools.islice(iter_builtin_documents(), 150))
    return (train_tokenizer(texts, str(root / "a"), 420), train_tokenizer(texts[::-1][:120], str(root / "b"), 400))


class Cut(Exception):
    pass


def _cut_before_sidecar(monkeypatch):
    """The sidecar's write (storage.write_text of tokenizer.json) fails: the process ended there."""
    real = storage.write_text

    def write_text(uri, text, s3=None, *a, **k):
        if str(uri).endswith(META_FILE):
            raise Cut(uri)
        return real(uri, text, s3, *a, **k)

    monkeypatch.setattr(storage, "write_text", write_text)


def test_a_replacement_cut_midway_is_replaced_by_the_next_run(tmp_path, two_tokenizers, monkeypatch):
    a, b = two_tokenizers
    first = load_config(overrides=[f"storage={tmp_path}", "name=r", f"tokenizer.path={a.path}"])
    ensure_tokenizer(first)
    target = os.path.join(first.run_dir, "tokenizer")
    second = load_config(overrides=[f"storage={tmp_path}", "name=r", f"tokenizer.path={b.path}"])
    with monkeypatch.context() as m:
        _cut_before_sidecar(m)
        with pytest.raises(Cut):
            ensure_tokenizer(second)
    with open(os.path.join(target, MODEL_FILE), "rb") as f:
        assert f.read() == b.model_bytes  # the first write happened
    # The next run (the same settings) carries on, with the tokenizer it names.
    _, tok = ensure_tokenizer(second)
    assert tok.sha256 == b.sha256
    assert load_tokenizer(target).sha256 == b.sha256


def test_a_mismatched_pair_without_checkpoints_is_replaced(tmp_path, two_tokenizers):
    """The pair an older raylm's cut left (b's model, a's sidecar), in a run with no checkpoint."""
    a, b = two_tokenizers
    target = str(tmp_path / "r" / "tokenizer")
    keep_in_run(a, target, None)
    with open(os.path.join(target, MODEL_FILE), "wb") as f:
        f.write(b.model_bytes)
    with pytest.raises(ConfigError, match="do not belong together"):
        load_tokenizer(target)
    keep_in_run(b, target, None)
    assert load_tokenizer(target).sha256 == b.sha256


def test_a_mismatched_pair_under_a_checkpoint_still_stops(tmp_path, two_tokenizers):
    """A checkpoint trained with the run's tokenizer: nothing is replaced, the run stops in one line."""
    a, b = two_tokenizers
    run_dir = tmp_path / "r"
    target = str(run_dir / "tokenizer")
    keep_in_run(a, target, None)
    ck = os.path.join(str(run_dir), checkpoint.checkpoint_name(4))
    os.makedirs(ck)
    with open(os.path.join(ck, checkpoint.COMMIT_MARKER), "w") as f:
        json.dump({"step": 4}, f)
    with open(os.path.join(target, MODEL_FILE), "wb") as f:
        f.write(b.model_bytes)
    with pytest.raises(ConfigError, match="do not belong together"):
        keep_in_run(b, target, None)
    with open(os.path.join(target, MODEL_FILE), "rb") as f:
        assert f.read() == b.model_bytes  # left as it was
    with open(os.path.join(target, META_FILE)) as f:
        assert json.load(f)["sha256"] == a.sha256
