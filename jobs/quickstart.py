"""The quickstart as a Ray job: tokenizer, data and a tiny model, end to end.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/quickstart.py --config run.yaml storage=s3://bucket/runs

storage is s3:// (or other storage every node shares), not a local path such as /tmp/runs:
on a cluster the training workers run on the worker nodes (the heads in cluster/ take no
tasks) and write checkpoints to their own node's disk, while the driver on the head reads
the run back from its own.

Arguments are config overrides, as for `raylm quickstart --help`.
`run.yaml` is any raylm config file in the working directory (see README.md,
Configuration); `--config` may be left out, and dotted overrides apply on top of it.
"""

import sys

from raylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
