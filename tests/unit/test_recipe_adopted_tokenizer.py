"""A recipe with no tokenizer stage reads a trained tokenizer from tokenizer.path: one
trained again in that directory runs the data and pre-training stages again
(raylm.recipe.input_files lists it for them). They were skipped, the data tokenized and the
model trained with the old one, while the recipe reported everything done. No Ray: the first
pre-training is a stand-in that leaves a checkpoint as a real one would; the real stage is
stopped where it would start Ray."""

from __future__ import annotations

import pytest

import raylm.pipeline as P
from raylm.recipe import load_recipe, run_recipe
from raylm.tokenizer import train_tokenizer
from tests.unit.test_recipe_pretrain_after_corpus_edit import ReachedRay, _fake_pretrain, _run_data_without_ray, _use


def _tokenizer(out, words: str) -> None:
    texts = [f"{words} {i} " * 8 for i in range(300)]
    train_tokenizer(texts, str(out), 300, sample_bytes=20000)


def test_a_tokenizer_trained_again_at_its_path_runs_data_and_pretrain_again(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus about ray, tokens and tests" for i in range(400)))
    tok = tmp_path / "tok"
    _tokenizer(tok, "line of a small corpus about ray tokens and tests")
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {tmp_path / 'runs'}\ndata: {{path: {corpus}, seq_len: 32}}\n"
                    f"tokenizer: {{path: {tok}}}\nmodel: {{max_seq_len: 32}}\nstages:\n  data: {{}}\n  pretrain: {{}}\n")
    _use(monkeypatch, {"data": _run_data_without_ray, "pretrain": _fake_pretrain})
    first = run_recipe(load_recipe(str(path)), log=lambda m: None)
    again = run_recipe(load_recipe(str(path)), log=lambda m: None)
    assert all(r["skipped"] for r in again.values())  # nothing changed: nothing runs

    _use(monkeypatch, {"data": _run_data_without_ray})  # the real pre-training stage from now on

    def no_ray(*_, **__):
        raise ReachedRay()

    monkeypatch.setattr(P, "beside_ray_start", no_ray)
    _tokenizer(tok, "zebra quartz jumping vexed wizards fjord nymph")  # trained again, in place
    logs: list[str] = []
    with pytest.raises(ReachedRay):  # it used to skip both stages: data and model of the old tokenizer
        run_recipe(load_recipe(str(path)), log=logs.append)
    assert f"recipe: data: {tok} changed since it ran, running it again" in logs, logs
    assert any(m.startswith("recipe: pretrain: removing") for m in logs), logs
    assert first["pretrain"]["outputs"]["path"] in next(m for m in logs if m.startswith("recipe: pretrain: removing"))
