"""`raylm plan --language`: English however it is written gets English's bytes per token;
an empty name is refused in one line."""

import pytest

from raylm.cli import main
from raylm.config import ConfigError
from raylm.plan import make_plan


@pytest.mark.parametrize("language", ["EN", "English", "english", " en ", "en-US", "en_GB", "eng", "English (UK)",
                                      "english-us"])
def test_english_spelled_any_way_is_english(language):
    en = make_plan("tiny", "1xCPU", language="en")
    plan = make_plan("tiny", "1xCPU", language=language)
    assert plan.bytes_per_token == en.bytes_per_token
    assert plan.language == "en"


def test_other_languages_keep_their_factor_and_name():
    en, fr = make_plan("tiny", "1xCPU", language="en"), make_plan("tiny", "1xCPU", language="fr")
    assert fr.bytes_per_token == pytest.approx(0.75 * en.bytes_per_token)
    assert fr.language == "fr"
    for other in ("Entish", "fr-en"):  # not English, nor a region of it
        assert make_plan("tiny", "1xCPU", language=other).language == other


@pytest.mark.parametrize("language", ["", "   "])
def test_empty_language_is_refused_in_one_line(language, capsys):
    with pytest.raises(ConfigError, match="--language=.*expected a language name or code") as e:
        make_plan("tiny", "1xCPU", language=language)
    assert "\n" not in str(e.value)
    assert main(["plan", "--size", "tiny", "--gpus", "1xCPU", "--language", language]) != 0
    err = capsys.readouterr().err
    assert "--language" in err and "Traceback" not in err


def test_cli_prints_english_for_a_capitalised_name(capsys):
    assert main(["plan", "--size", "tiny", "--gpus", "1xCPU", "--language", "English"]) in (0, None)
    out = capsys.readouterr().out
    assert "bytes/token, en/web" in out
