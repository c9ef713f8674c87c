"""A built-in task file whose JSON escapes a lone UTF-16 surrogate ("\\ud800") is refused
when read, naming the file, line and field: the tokenizer cannot encode such text, and its
error, raised later, named neither the file nor the line."""

import pytest

from raylm.errors import DataError
from raylm.eval.tasks import read_gen_task, read_mc_task

GOOD_MC = '{"context": "The cat", "choices": [" sat", " flew"], "gold": 0}\n'
GOOD_GEN = '{"context": "2 + 2 =", "answer": "4"}\n'


@pytest.mark.parametrize("line, field", [
    ('{"context": "a \\ud800", "choices": ["x", "y"], "gold": 0}', "context"),
    ('{"context": "a", "choices": ["x", "\\udfff y"], "gold": 0}', "choices"),
])
def test_mc_line_with_a_lone_surrogate_is_named(tmp_path, line, field):
    path = tmp_path / "mc.jsonl"
    path.write_text(GOOD_MC + line + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: field '{field}' holds a lone UTF-16 surrogate"):
        read_mc_task(str(path))


@pytest.mark.parametrize("line, field", [('{"context": "\\ud83d", "answer": "4"}', "context"),
                                         ('{"context": "2 + 2 =", "answer": ["4", "\\ud83d"]}', "answer")])
def test_gen_line_with_a_lone_surrogate_is_named(tmp_path, line, field):
    path = tmp_path / "gen.jsonl"
    path.write_text(GOOD_GEN + line + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: field '{field}' holds a lone UTF-16 surrogate"):
        read_gen_task(str(path))


def test_a_surrogate_pair_is_text(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"context": "smile \\ud83d\\ude42", "choices": ["x", "y"], "gold": 1}\n')
    assert read_mc_task(str(path))[0].context == "smile \U0001F642"
