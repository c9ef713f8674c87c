"""Every subcommand takes relative paths, run from a working directory of their own.

One chain, each step a `raylm` subcommand run in-process (on the session's Ray cluster) from
a fresh directory that is not the repository: corpus -> `tokenizer train` -> `data prepare`
-> `pretrain` (data, tokenizer and storage relative) -> `sft`, then `export` and `generate`,
every path relative (some `./`-prefixed). `dpo --from` resolves its run with the same code
as `sft --from`, so one post-training stage stands for both (a Ray Train run each costs a
minute of CI). Ray workers run elsewhere, and
`storage.list_files` answers with absolute paths, so a relative path that is not resolved on
the driver, or compared unresolved with a listing, fails here. Smallest settings: 1 worker,
2 steps per stage.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
from pathlib import Path

import pytest

from raylm import cli
from tests.small import SMALL

pytestmark = pytest.mark.integration

STEPS = ["train.num_workers=1", "train.micro_batch_size=4", "train.global_batch_size=8", "train.max_steps=2",
         "train.ckpt_every=2", "train.eval_every=2", "train.log_every=1", "train.async_checkpoint=false"]


def last_json(out: str) -> dict:
    """The JSON summary a subcommand prints last, after its progress lines."""
    return json.loads(out[out.rindex("\n{") + 1 if not out.startswith("{") else 0:])


def raylm(*argv: str) -> str:
    """`raylm ARGV` in this process; its stdout. A failure shows what the command printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    assert rc == 0, f"raylm {' '.join(argv)} -> {rc}\n{err.getvalue()[-3000:]}"
    return out.getvalue()


@pytest.fixture(scope="module")
def home(ray_local, tmp_path_factory):
    """The working directory of the whole chain, holding a small corpus and chat/preference
    records; everything the commands write lands under it, addressed relatively."""
    from raylm import synthetic as S
    from raylm.corpus import iter_builtin_documents

    home = tmp_path_factory.mktemp("cwd")
    (home / "corpus").mkdir()
    docs = [d[:2000] for d in itertools.islice(iter_builtin_documents(), 100)]  # ~40k tokens: enough blocks
    (home / "corpus" / "docs.txt").write_text("\n\n".join(docs))
    S.write_jsonl(str(home / "records"), "reverse", 64, 8, seed=0, length=3)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        yield home


@pytest.fixture(scope="module")
def tokenizer(home):
    raylm("tokenizer", "train", "--data", "corpus", "--out", "tok", *SMALL)
    return home / "tok"


@pytest.fixture(scope="module")
def prepared(tokenizer):
    out = raylm("data", "prepare", "--data", "./corpus", "--out", "prepared", "--tokenizer", "tok", *SMALL)
    return last_json(out)


@pytest.fixture(scope="module")
def base(prepared):
    raylm("pretrain", "--data", "prepared", "tokenizer.path=./tok", "storage=./runs", "name=base", "--no-samples",
          *SMALL, *STEPS)
    return "runs/base"


@pytest.fixture(scope="module")
def sft(base):
    raylm("sft", "--from", f"./{base}", "--data", "records/reverse.train.messages.jsonl", "storage=runs",
          "data.val_fraction=0.1", *STEPS)
    return "runs/base-sft"


def _committed(home: Path, run: str) -> list[str]:
    return sorted(p.parent.name for p in (home / run).glob("ckpt-*/COMMITTED"))


def test_tokenizer_train(home, tokenizer):
    assert (tokenizer / "tokenizer.model").is_file() and (tokenizer / "tokenizer.json").is_file()


def test_data_prepare(home, prepared):
    assert prepared["out"] == "prepared" and prepared["train_blocks"] > 0
    assert (home / "prepared" / "manifest.json").is_file()


def test_pretrain(home, base):
    assert _committed(home, base) == ["ckpt-00000002"]
    assert json.loads((home / base / "ckpt-00000002" / "meta.json").read_text())["tokenizer"] == "tokenizer"


def test_sft_from_a_dot_relative_run(home, sft):
    assert _committed(home, sft) == ["ckpt-00000002"]
    record = json.loads((home / sft / "record.json").read_text())
    assert record["parent"]["checkpoint"] == str(home / "runs" / "base" / "ckpt-00000002")


def test_export_to_a_relative_directory(home, base):
    out = last_json(raylm("export", base, "--format", "hf", "--out", "exported/hf"))
    assert out["out"] == "exported/hf"
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in (home / "exported/hf").iterdir()}
    raylm("export", f"./{base}", "--format", "gguf", "--checkpoint", "ckpt-00000002", "--out", "exported/m.gguf")
    assert (home / "exported" / "m.gguf").stat().st_size > 0


def test_generate_from_a_relative_run(home, sft):
    text = raylm("generate", sft, "--prompt", "The ", "--max-new-tokens", "4", "--temperature", "0")
    assert text.startswith("The ") and "---" in text
    assert os.getcwd() == str(home)


def test_generate_says_what_fits_in_the_models_context(home, sft):
    """A prompt longer than the context was cut to its last tokens, and --max-new-tokens to
    what was left, without a word: the output showed the whole prompt and one new token."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["generate", sft, "--prompt", "the cat " * 200]) == 2
    assert err.getvalue().startswith("raylm: error: --prompt #1 is ") and "the model's context is" in err.getvalue()
    with contextlib.redirect_stderr(err := io.StringIO()), contextlib.redirect_stdout(out := io.StringIO()):
        assert cli.main(["generate", sft, "--prompt", "The ", "--max-new-tokens", "100000", "--temperature", "0"]) == 0
    assert out.getvalue().startswith("The ")
    assert "new tokens fit after its" in err.getvalue() and "not --max-new-tokens 100000" in err.getvalue()


def test_dpo_resolves_a_dot_relative_run(home, sft):
    """`raylm dpo --from` goes through the same resolution as `sft --from` (a DPO run of its
    own would cost a minute of CI for the same code): its parent, tokenizer and checkpoint
    resolve from a `./`-prefixed run, before any cluster work."""
    from raylm.cli import STAGE_DEFAULTS
    from raylm.config import load_config
    from raylm.pipeline import absolute_paths
    from raylm.posttrain import parent_of

    cfg = load_config(overrides=["stage=dpo", f"init_from=./{sft}", "storage=runs", *SMALL],
                      base=STAGE_DEFAULTS["dpo"])
    resolved, facts = parent_of(absolute_paths(cfg))  # the first two steps of `posttrain`
    assert facts["checkpoint"] == str(home / sft / "ckpt-00000002") and facts["stage"] == "sft"
    assert resolved.tokenizer.path == str(home / sft / "tokenizer")
