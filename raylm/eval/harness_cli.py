"""lm-eval's own command line with the `raylm` model registered.

    python -m raylm.eval.harness_cli run --model raylm --model_args path=runs/x --tasks hellaswag

lm-eval 0.4.13 finds models only in its own registry and has no option that imports a
plugin (see raylm/eval/harness.py), so plain `lm_eval --model raylm` does not work with it;
this module imports raylm.eval.harness, which registers the model, then runs lm-eval's CLI.
"""

import raylm.eval.harness  # noqa: F401  (registers --model raylm)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
