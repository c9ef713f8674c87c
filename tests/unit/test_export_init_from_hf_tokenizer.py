"""`raylm pretrain --init-from-hf` from a raylm export with another tokenizer of the same size
is refused in one line before any cluster work. The export's marker records the sha256 of
the tokenizer its weights were trained with; a tokenizer of the same vocabulary size numbers
its pieces differently, and the run trained on from embedding rows that meant other tokens."""

from __future__ import annotations

import itertools
import json

import pytest

from raylm import cli
from raylm.errors import ConfigError


@pytest.fixture(scope="module")
def export(tiny_run, tmp_path_factory):
    from raylm.export.hf import export_run

    return export_run(tiny_run, str(tmp_path_factory.mktemp("hf") / "hf"))


@pytest.fixture(scope="module")
def other_tokenizer(tiny_run, tmp_path_factory):
    """A tokenizer of the tiny run's size, trained on other text."""
    from raylm.corpus import iter_builtin_documents
    from raylm.tokenizer import Tokenizer, train_tokenizer

    ours = Tokenizer.load(f"{tiny_run}/tokenizer")
    texts = list(itertools.islice(iter_builtin_documents(), 200, 400))
    path = str(tmp_path_factory.mktemp("tok") / "other")
    theirs = train_tokenizer(texts, path, ours.vocab_size)
    assert theirs.vocab_size == ours.vocab_size and theirs.sha256 != ours.sha256
    return path


def _config(export: str, tokenizer: str, tmp_path):
    args = cli.build_parser().parse_args(["pretrain", "--init-from-hf", export, f"tokenizer.path={tokenizer}",
                                          f"storage={tmp_path}", "name=from-hf", "data.seq_len=64"])
    return cli._pretrain_config(args)


def test_another_tokenizer_of_the_same_size_is_refused(export, other_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"tokenizer\.path=.*: tokenizer sha256 .* says its weights were "
                                          r"trained with") as e:
        _config(export, other_tokenizer, tmp_path)
    assert "\n" not in str(e.value) and "raylm_export.json" in str(e.value)


def test_the_runs_own_tokenizer_is_taken(export, tiny_run, tmp_path):
    assert _config(export, f"{tiny_run}/tokenizer", tmp_path).init_from == export


def test_an_hf_directory_without_raylms_marker_is_not_checked(export, other_tokenizer, tmp_path):
    """Another producer's Llama has no marker: nothing to compare with, as before."""
    import shutil

    d = tmp_path / "plain"
    shutil.copytree(export, d)
    (d / "raylm_export.json").unlink()
    assert _config(str(d), other_tokenizer, tmp_path).init_from == str(d)
    assert json.loads((d / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_init_from_as_a_setting_is_checked_before_ray(export, other_tokenizer, tmp_path):
    """`init_from=EXPORT` (a recipe's pretrain stage, or the setting on the command line)
    loads the same weights as --init-from-hf: the same tokenizer check, in the pre-flight."""
    from raylm.config import load_config
    from raylm.pipeline import preflight

    cfg = load_config(overrides=[f"init_from={export}", f"tokenizer.path={other_tokenizer}", f"storage={tmp_path}"])
    with pytest.raises(ConfigError, match=r"tokenizer sha256 .* says its weights were trained with"):
        preflight(cfg)
