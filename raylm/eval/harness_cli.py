"""lm-eval's own command line with the `raylm` model registered.

    python -m raylm.eval.harness_cli run --model raylm --model_args path=runs/x --tasks hellaswag

lm-eval 0.4.13 finds models only in its own registry and has no option that imports a
plugin (see raylm/eval/harness.py), so plain `lm_eval --model raylm` does not work with it;
this module imports raylm.eval.harness, which registers the model, then runs lm-eval's CLI.
"""

import sys

import raylm.eval.harness  # noqa: F401  (registers --model raylm)
from lm_eval.__main__ import cli_evaluate


def main() -> int:
    """lm-eval's command line; a mistake of the user's in raylm's part (a path that holds no
    checkpoint, a bad model_args value) is one line and exit status 2, as in `raylm eval`."""
    from raylm.cli import USER_ERRORS, _root_cause, user_error_line

    try:
        cli_evaluate()
    except Exception as e:
        cause = _root_cause(e)
        if not isinstance(cause, USER_ERRORS):
            raise
        print(user_error_line(cause), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
