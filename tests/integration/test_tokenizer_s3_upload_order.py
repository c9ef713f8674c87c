"""A tokenizer trained into `s3://` is uploaded model first, sidecar last: a directory holding
`tokenizer.json` is taken for a trained tokenizer (raylm.pipeline.ensure_tokenizer), so an
upload cut between the two files must leave no `tokenizer.json` behind. Uploaded in sorted
order, the .json went first, and the run then neither retrained nor loaded."""

from __future__ import annotations

import pytest

from raylm import storage
from raylm.config import load_config
from raylm.pipeline import ensure_tokenizer, train_tokenizer_from
from raylm.tokenizer import META_FILE, MODEL_FILE

pytestmark = pytest.mark.integration


def test_an_upload_cut_before_the_sidecar_leaves_a_tokenizer_to_train_again(s3_prefix, tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200 + "pack my box with five dozen jugs\n" * 200)
    cfg = load_config(overrides=[f"storage={s3_prefix}", "name=r", f"data.path={corpus}", "tokenizer.vocab_size=300"])
    target = storage.join(cfg.run_dir, "tokenizer")
    real = storage.write_bytes

    def cut(uri, data, s3=None):
        if uri.endswith("/" + META_FILE):
            raise OSError("connection reset (the upload is cut here)")
        return real(uri, data, s3)

    with monkeypatch.context() as m:
        m.setattr(storage, "write_bytes", cut)
        with pytest.raises(OSError, match="connection reset"):
            train_tokenizer_from(cfg, target)
    assert storage.exists(storage.join(target, MODEL_FILE), cfg.s3)
    assert not storage.exists(storage.join(target, META_FILE), cfg.s3)
    _, tok = ensure_tokenizer(cfg)  # trained again, not taken as trained
    assert storage.exists(storage.join(target, META_FILE), cfg.s3) and tok.vocab_size == 300
