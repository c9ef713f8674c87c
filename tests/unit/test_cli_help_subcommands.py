"""`--help` of every subcommand works and says what it does; `raylm tokenizer` and `raylm data`
without their command name it as the top level does ("required: COMMAND"), not by argparse's
internal name ("required: sub")."""

from __future__ import annotations

import pytest

from raylm.cli import main

COMMANDS = [["quickstart"], ["pretrain"], ["sft"], ["dpo"], ["tune"], ["tokenizer"], ["tokenizer", "train"],
            ["data"], ["data", "prepare"], ["export"], ["run"], ["eval"], ["generate"], ["serve"], ["report"],
            ["plan"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_of_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: raylm {' '.join(argv)} ") and "options:" in out
    assert len(out.splitlines()) > 6, out


@pytest.mark.parametrize("group", ["tokenizer", "data"])
def test_a_group_without_its_command_names_it(group, capsys):
    with pytest.raises(SystemExit) as e:
        main([group])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(f"raylm {group}: error: the following arguments are required: COMMAND"), err
    assert f"usage: raylm {group} [-h] COMMAND ..." in err
