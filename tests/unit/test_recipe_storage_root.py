"""A recipe's local storage is read as the storage layer and `raylm pretrain` read it:
`~/runs` is the home directory's runs and `file:///x` is /x. The recipe made it absolute as
written, so its stages wrote under a `./~/runs` (or `./file:/x`) directory of the working
directory, and a rerun from another directory found none of them."""

from __future__ import annotations

import pytest

from raylm.errors import StorageError
from raylm.recipe import load_recipe, run_recipe


def _recipe(tmp_path, storage: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(f"name: t\nstorage: {storage}\nstages:\n  tokenizer: {{tokenizer.vocab_size: 384, "
                    f"tokenizer.sample_bytes: 20000}}\n")
    return str(path)


def test_home_and_file_urls_name_the_places_they_mean(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert load_recipe(_recipe(tmp_path, f"file://{tmp_path}/runs")).root == f"{tmp_path}/runs/t"
    recipe = load_recipe(_recipe(tmp_path, "~/runs"))
    assert recipe.root == f"{tmp_path}/home/runs/t"
    done = run_recipe(recipe, log=lambda m: None)
    assert done["tokenizer"]["outputs"]["path"].startswith(f"{tmp_path}/home/runs/t/tokenizer-")
    assert list(work.iterdir()) == []  # no ./~ directory
    monkeypatch.chdir(tmp_path)  # from another directory: the same stage, done
    assert run_recipe(load_recipe(_recipe(tmp_path, "~/runs")), log=lambda m: None)["tokenizer"]["skipped"]


def test_a_storage_of_another_scheme_is_refused_in_one_line(tmp_path):
    with pytest.raises(StorageError, match=r"^gs://b/runs: unsupported scheme"):
        load_recipe(_recipe(tmp_path, "gs://b/runs"))
