"""The quickstart as a Ray job: tokenizer, data and a tiny model, end to end.

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/quickstart.py storage=/tmp/runs

Arguments are config overrides, as for `raylm quickstart --help`.
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
