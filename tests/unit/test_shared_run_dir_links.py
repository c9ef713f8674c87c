"""A run directory others can write to (a shared filesystem): a link planted where raylm is
about to write a checkpoint's file must be replaced, not written through, which overwrote the
file it names (anywhere the user running raylm could write)."""

import dataclasses
import itertools
import os

import numpy as np

from raylm import storage

VICTIM = b"a file of the user's own, outside any run\n"


def test_upload_dir_replaces_a_planted_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    src = tmp_path / "local-ckpt"
    src.mkdir()
    (src / "__0_0.distcp").write_bytes(b"shard bytes")
    dst = tmp_path / "runs" / "x" / "ckpt-00000004"
    dst.mkdir(parents=True)
    os.symlink(victim, dst / "__0_0.distcp")
    storage.upload_dir(str(src), str(dst))
    assert victim.read_bytes() == VICTIM, "the checkpoint was written through a planted link"
    assert not os.path.islink(dst / "__0_0.distcp") and (dst / "__0_0.distcp").read_bytes() == b"shard bytes"


def test_a_training_run_never_writes_its_checkpoint_through_planted_links(tmp_path):
    import torch

    from raylm.config import load_config
    from raylm.corpus import iter_builtin_documents
    from raylm.tokenizer import train_tokenizer
    from raylm.train import train_local
    from tests.tiny_run import TINY

    victim = tmp_path / "victim.txt"
    victim.write_bytes(VICTIM)
    texts = list(itertools.islice(iter_builtin_documents(), 100))
    tok = train_tokenizer(texts, str(tmp_path / "tok"), 384)
    cfg = load_config(overrides=[f"storage={tmp_path / 'runs'}", "name=shared", f"tokenizer.path={tmp_path / 'tok'}",
                                 *TINY, "train.max_steps=4", "train.ckpt_every=4", "train.eval_every=100"])
    cfg = dataclasses.replace(cfg, model=cfg.model.with_vocab(tok.vocab_size))
    ckpt = os.path.join(cfg.run_dir, "ckpt-00000004")
    os.makedirs(ckpt)
    for name in ("__0_0.distcp", ".metadata"):
        os.symlink(victim, os.path.join(ckpt, name))
    ids = [i for t in texts for i in tok.encode(t)[:200] + [tok.eos_id]]
    T = cfg.data.seq_len + 1
    rows = np.asarray(ids[: len(ids) // T * T], dtype=np.int32).reshape(-1, T)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_local(cfg, rows[:-8], rows[-8:], log=lambda *_: None,
                    manifest={"tokenizer_sha256": tok.sha256, "eos_id": tok.eos_id, "columns": ["tokens"]})
    finally:
        torch.set_num_threads(threads)
        assert victim.read_bytes() == VICTIM, "the checkpoint was written through a planted link"
    assert not any(os.path.islink(os.path.join(ckpt, n)) for n in os.listdir(ckpt))
    from raylm.checkpoint import latest_complete
    assert latest_complete(cfg.run_dir) == ckpt
