"""The quickstart as a Ray job: tokenizer, data and a tiny model, end to end.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/quickstart.py --config run.yaml storage=/tmp/runs

Arguments are config overrides, as for `raylm quickstart --help`.
`run.yaml` is any raylm config file in the working directory (see README.md,
Configuration); `--config` may be left out, and dotted overrides apply on top of it.
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
