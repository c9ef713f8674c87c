"""A path option given empty (`--data "$CORPUS"` with CORPUS unset) is refused on the command
line, naming the option. It was read as no option at all: `pretrain --data ""` trained on the
built-in corpus, `--config ""` on the defaults, `--from-record ""` and `--init-from-hf ""`
from scratch, without a word. In process, without Ray: the library call each subcommand ends
in is replaced by one that stops before any work."""

from __future__ import annotations

import pytest

from raylm.cli import main


class Reached(BaseException):
    """Raised where the library would start work; main() lets it through (not an Exception)."""


@pytest.fixture(autouse=True)
def no_work(monkeypatch, tmp_path):
    def reached(*args, **kwargs):
        raise Reached()

    monkeypatch.chdir(tmp_path)
    for target in ("raylm.pipeline.pretrain", "raylm.pipeline.init_ray", "raylm.pipeline.ensure_corpus",
                   "raylm.pipeline.train_tokenizer_from", "raylm.posttrain.posttrain", "raylm.tune.tune",
                   "raylm.data.prepare", "raylm.eval.run.evaluate_run", "raylm.eval.report.write_report",
                   "raylm.plan.write_recipe"):
        monkeypatch.setattr(target, reached)


@pytest.mark.parametrize("argv, option", [
    (["pretrain", "--data", ""], "--data"),
    (["pretrain", "--config", ""], "--config"),
    (["pretrain", "--from-record", ""], "--from-record"),
    (["pretrain", "--init-from-hf", "  "], "--init-from-hf"),
    (["quickstart", "--config="], "--config"),
    (["sft", "--from", "", "--data", "chat.jsonl"], "--from"),
    (["dpo", "--from", "runs/chat", "--data", ""], "--data"),
    (["tune", "--space", "", "--data", "corpus.txt"], "--space"),
    (["tokenizer", "train", "--data", "", "--out", "tok"], "--data"),
    (["data", "prepare", "--data", "corpus.txt", "--out", "prepared", "--tokenizer", ""], "--tokenizer"),
    (["eval", "runs/x", "--corpus", ""], "--corpus"),
    (["eval", "runs/x", "--out", ""], "--out"),
    (["export", "runs/x", "--out", "e", "--checkpoint", ""], "--checkpoint"),
    (["report", "runs/x", "--out", ""], "--out"),
    (["plan", "--size", "tiny", "--gpus", "1xCPU", "--out", ""], "--out"),
    (["plan", "--size", "tiny", "--gpus", "1xCPU", "--data", ""], "--data"),
])
def test_an_empty_path_option_is_refused_naming_it(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {option}" in err and "empty" in err, err


def test_a_given_path_option_still_reaches_the_work():
    with pytest.raises(Reached):
        main(["pretrain", "--data", "corpus.txt"])
