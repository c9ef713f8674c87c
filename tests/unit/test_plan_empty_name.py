"""`raylm plan --name "$NAME"` with NAME unset took the default run name without a word, as the
path options did before they refused an empty value."""

import pytest

from raylm.cli import main


def test_an_empty_plan_name_is_refused(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        main(["plan", "--size", "125m", "--gpus", "8xH100", "--name", ""])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--name" in err and "'': empty; give a name" in err, err
