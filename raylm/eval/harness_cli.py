"""lm-eval's own command line with the `raylm` model registered.

    python -m raylm.eval.harness_cli run --model raylm --model_args path=runs/x --tasks hellaswag

lm-eval 0.4.13 finds models only in its own registry; newer versions also load the
`lm_eval.models` entry point that raylm's pyproject declares, and then plain
`lm_eval --model raylm ...` works. Importing raylm.eval.harness registers the model either way.
"""

import raylm.eval.harness  # noqa: F401  (registers --model raylm)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
